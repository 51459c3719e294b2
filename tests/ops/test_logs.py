"""The log on stdout: priority prefixes, levels, quiet factory lines, JSON lines, and
how twistd gets the observer."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from conftest import write_config
from twisted.internet.protocol import Factory
from twisted.logger import Logger, LogLevel, LogPublisher
from twisted.python.components import Componentized
from twisted.python.failure import Failure

from dpatia_daemon.config import ConfigError, LogFormat, load_config
from dpatia_daemon.lifecycle import OrderedRoot
from dpatia_daemon.ops.logs import StdoutObserver, stdout_observer


def logged(observer: StdoutObserver) -> Logger:
    """A Logger whose events go to ``observer`` only."""
    publisher = LogPublisher(observer)
    return Logger(namespace="dpatia.test", observer=publisher)


@pytest.mark.parametrize(
    ("level", "prefix"),
    [("debug", "<7>"), ("info", "<6>"), ("warn", "<4>"), ("error", "<3>"), ("critical", "<2>")],
)
def test_each_level_has_its_sd_daemon_prefix(level: str, prefix: str) -> None:
    """One line per event, prefixed with the syslog priority of its level."""
    out = io.StringIO()
    log = logged(StdoutObserver(out, LogFormat.JOURNAL, LogLevel.debug))
    getattr(log, level)("job {job_id} went {how}", job_id="j1", how="somewhere")
    assert out.getvalue() == f"{prefix}[dpatia.test] job j1 went somewhere\n"


def test_every_line_of_a_traceback_is_an_error() -> None:
    """A failure's traceback lines all carry <3>, so journalctl -p err shows them all."""
    out = io.StringIO()
    log = logged(StdoutObserver(out))
    try:
        raise ValueError("boom")
    except ValueError:
        log.failure("storing the result failed", Failure(), level=LogLevel.error)
    lines = out.getvalue().splitlines()
    assert len(lines) > 3
    assert all(line.startswith("<3>") for line in lines)
    assert lines[0] == "<3>[dpatia.test] storing the result failed"
    assert lines[-1] == "<3>builtins.ValueError: boom"


def test_events_below_the_level_are_dropped() -> None:
    """[log] level = warn: info and debug events are not written."""
    out = io.StringIO()
    log = logged(StdoutObserver(out, LogFormat.JOURNAL, LogLevel.warn))
    log.debug("d")
    log.info("i")
    log.warn("w")
    log.error("e")
    assert out.getvalue() == "<4>[dpatia.test] w\n<3>[dpatia.test] e\n"


@pytest.mark.parametrize(("level", "written"), [(LogLevel.info, ""), (LogLevel.debug, "<7>")])
def test_factory_lines_are_debug(level: LogLevel, written: str) -> None:
    """Twisted's "Starting factory" / "Stopping factory" lines count as debug."""
    from twisted.logger import globalLogPublisher

    out = io.StringIO()
    observer = StdoutObserver(out, LogFormat.JOURNAL, level)
    globalLogPublisher.addObserver(observer)
    try:
        factory = Factory()
        factory.doStart()
        factory.doStop()
    finally:
        globalLogPublisher.removeObserver(observer)
    lines = [line for line in out.getvalue().splitlines() if "factory" in line]
    assert len(lines) == (2 if written else 0)
    assert all(line.startswith(written) for line in lines)


def test_json_lines_carry_plain_fields_and_never_secrets() -> None:
    """format = json: one object per line with the message and the event's plain
    fields; fields named like secrets and objects are left out."""
    out = io.StringIO()
    log = logged(StdoutObserver(out, LogFormat.JSON))

    class Opaque:
        def __repr__(self) -> str:
            return "Opaque(token=s3cr3t)"

    log.warn(
        "job {job_id} attempt {attempt} took {duration} s",
        job_id="j1",
        attempt=2,
        duration=1.5,
        token="s3cr3t",
        client_secret="s3cr3t",
        authorization="Bearer s3cr3t",
        thing=Opaque(),
    )
    [line] = out.getvalue().splitlines()
    record = json.loads(line)
    assert "s3cr3t" not in line
    assert {k: record[k] for k in ("level", "priority", "namespace", "message")} == {
        "level": "warn",
        "priority": 4,
        "namespace": "dpatia.test",
        "message": "job j1 attempt 2 took 1.5 s",
    }
    assert (record["job_id"], record["attempt"], record["duration"]) == ("j1", 2, 1.5)
    assert isinstance(record["time"], float)
    assert "thing" not in record


def test_json_failures_have_their_traceback() -> None:
    """A failure's traceback is one field of its JSON line, not extra lines."""
    out = io.StringIO()
    log = logged(StdoutObserver(out, LogFormat.JSON))
    try:
        raise ZeroDivisionError("no")
    except ZeroDivisionError:
        log.failure("oops")
    [line] = out.getvalue().splitlines()
    record = json.loads(line)
    assert record["level"] == "critical"
    assert "ZeroDivisionError" in record["traceback"]


def test_text_format_is_twistds_classic_line() -> None:
    """format = text: a time stamp, the system, the text (no priority prefix)."""
    out = io.StringIO()
    logged(StdoutObserver(out, LogFormat.TEXT)).info("hello {who}", who="you")
    text = out.getvalue()
    assert text.endswith(" [dpatia.test#info] hello you\n")
    assert text[:4].isdigit()


def test_the_log_section_is_read_and_checked(tmp_path: Path) -> None:
    """[log] format and level come from the file; a bad level names the key."""
    config = load_config(write_config(tmp_path, {"log": {"format": "json", "level": "warn"}}))
    observer = stdout_observer(config.log, io.StringIO())
    assert (observer.format, observer.level) == (LogFormat.JSON, LogLevel.warn)
    with pytest.raises(ConfigError) as info:
        load_config(write_config(tmp_path, {"log": {"level": "loud"}}))
    assert "[log] level: must be one of debug, info, warn, error, critical" in str(info.value)


def test_the_root_gives_twistd_its_observer() -> None:
    """The tree's root sets its observer as the application's ILogObserver, which is
    what twistd logs to (unless its command line names another)."""
    from twisted.application.service import Application
    from twisted.logger import ILogObserver

    root = OrderedRoot()
    observer = StdoutObserver(io.StringIO())
    root.log_observer = observer
    application: Any = Application("dpatia")
    assert isinstance(application, Componentized)
    root.setServiceParent(application)
    assert application.getComponent(ILogObserver) is observer


@pytest.mark.parametrize(
    ("twistd_args", "ours"),
    [
        (["--nodaemon"], True),
        (["--nodaemon", "--logfile=-"], True),
        (["--nodaemon", "--logfile=twistd.log"], False),
        (["--nodaemon", "--syslog"], False),
        (["--nodaemon", "--logger=twisted.logger.textFileLogObserver"], False),
        ([], False),
    ],
)
def test_twistd_logs_through_the_observer_unless_told_otherwise(
    tmp_path: Path, twistd_args: list[str], ours: bool
) -> None:
    """twistd -n dpatia logs through [log]'s observer; --logfile, --syslog, --logger
    (or daemonising) are the operator's choice and keep twistd's own."""
    from twisted.scripts.twistd import ServerOptions

    from dpatia_daemon.tap import makeService

    ini = write_config(tmp_path, {"workers": {"count": 0}, "log": {"format": "json"}})
    options = ServerOptions()
    options.parseOptions([*twistd_args, "dpatia", "--config", ini])
    root = makeService(options.subOptions)
    assert isinstance(root, OrderedRoot)
    if ours:
        assert isinstance(root.log_observer, StdoutObserver)
        assert root.log_observer.format is LogFormat.JSON
    else:
        assert root.log_observer is None
