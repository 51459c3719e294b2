"""``dpatia check-config``: the daemon's start-time checks, without starting it.

The same checks the daemon makes before it listens (:func:`~dpatia_daemon.config.load_config`
with its cross-key checks, :func:`~dpatia_daemon.frontdoor.listening.endpoint` and
``check_processes``, :func:`~dpatia_daemon.workers.interpreter.check_workers_python`),
and what the start would find: whether the spool and work directories can be used,
whether the analysis imports, how much room the spool has.  Each check is a row: ``ok``,
``warn`` (the daemon starts, but look) or ``fail`` (it would not start, or not work);
the exit status is 1 if any failed.
"""

from __future__ import annotations

import argparse
import errno
import os
import socket
from collections.abc import Callable
from typing import TextIO

from attrs import frozen
from twisted.python.filepath import FilePath

from ..analyses.loader import AnalysisLoadError, load_analysis
from ..config import Config, ConfigError, load_config
from ..frontdoor.listening import check_processes, endpoint
from ..spool.lockprobe import journal_warning, mount_warnings
from ..workers.interpreter import check_workers_python
from .output import clip, size, table, write_json
from .spoolview import FAILED, OK


@frozen
class Check:
    """One row of the report."""

    name: str
    result: str  # "ok", "warn" or "fail"
    detail: str


def _run(name: str, check: Callable[[], str | tuple[str, str]]) -> Check:
    """Run ``check``: its detail (or (result, detail)); a ConfigError or OSError fails it."""
    try:
        found = check()
    except (ConfigError, OSError, AnalysisLoadError) as e:
        return Check(name, "fail", str(e))
    if isinstance(found, tuple):
        return Check(name, *found)
    return Check(name, "ok", found)


def _directory(path: FilePath[str]) -> str | tuple[str, str]:
    """A directory the daemon writes: there and writable, or creatable."""
    if path.isdir():
        if not os.access(path.path, os.W_OK | os.X_OK):
            return "fail", f"{path.path} is not writable by this user"
        return f"{path.path}"
    if path.exists():
        return "fail", f"{path.path} exists and is not a directory"
    parent = path.parent()
    while not parent.exists() and parent.parent() != parent:
        parent = parent.parent()
    if not os.access(parent.path, os.W_OK | os.X_OK):
        return "fail", f"{path.path} does not exist and {parent.path} is not writable"
    return f"{path.path} (created at the start)"


def _listen(config: Config) -> str | tuple[str, str]:
    from twisted.internet import reactor

    listen = config.server.listen
    if listen.startswith("systemd:") and not os.environ.get("LISTEN_FDS"):
        return f"{listen} (socket activation: systemd passes the socket; not checked here)"
    found = endpoint(reactor, config)
    check_processes(config)
    detail = f"{listen}, {config.server.processes} front-door process(es)"
    port, interface = getattr(found, "_port", None), getattr(found, "_interface", "")
    if not isinstance(port, int) or port == 0:
        return detail
    family = socket.AF_INET6 if ":" in (interface or "") else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((interface or "", port))
        except PermissionError:
            return "fail", f"{detail}: port {port} needs privileges this user lacks"
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return "warn", f"{detail}: port {port} is in use (by the running daemon?)"
            raise
    return detail


def _analysis(config: Config) -> str | tuple[str, str]:
    if not config.workers.count:
        return "warn", "[workers] count = 0: this daemon only accepts jobs, others run them"
    if config.workers.python is not None:
        check_workers_python(config)
        return f"{config.app.analysis!r} loads in {config.workers.python}"
    load_analysis(config.app.analysis)
    return f"{config.app.analysis!r} imports, {config.workers.count} workers"


def _room(config: Config) -> str | tuple[str, str]:
    directory = config.spool.directory
    probe = directory if directory.exists() else directory.parent()
    while not probe.exists() and probe.parent() != probe:
        probe = probe.parent()
    st = os.statvfs(probe.path)
    free = st.f_bavail * st.f_frsize
    if free < config.spool.min_free_bytes:
        return "warn", (
            f"{size(free)} free, below [spool] min_free_bytes ({size(config.spool.min_free_bytes)}): "
            "new jobs would be refused with 503"
        )
    return f"{size(free)} free"


def _filesystem(config: Config) -> str | tuple[str, str]:
    """What the daemon warns of at start about the spool's filesystem (host-only
    locks, an ext4 without a journal)."""
    probe = config.spool.directory
    while not probe.exists() and probe.parent() != probe:
        probe = probe.parent()
    warnings = mount_warnings(probe.path)
    journal = journal_warning(probe.path)
    if journal is not None:
        warnings.append(journal)
    if warnings:
        return "warn", "; ".join(warnings)
    return "no host-only lock options, not an ext4 without a journal"


def _tls(config: Config) -> str | tuple[str, str]:
    if not config.sps.verify_tls:
        return "warn", "[sps] verify_tls = false: SPS certificates are not checked"
    return "SPS certificates verified" + (
        f" against {config.sps.ca_file.path}" if config.sps.ca_file else ""
    )


def run_checks(path: str) -> list[Check]:
    """Every check of the config at ``path`` (only the first if it does not load)."""
    try:
        config = load_config(path)
    except ConfigError as e:
        return [Check("config file", "fail", str(e))]
    return [
        Check("config file", "ok", f"{path} loads, every key valid"),
        _run("listen", lambda: _listen(config)),
        _run("spool directory", lambda: _directory(config.spool.directory)),
        _run("spool free space", lambda: _room(config)),
        _run("spool filesystem", lambda: _filesystem(config)),
        _run("work directory", lambda: _directory(config.workers.work_directory)),
        _run("analysis", lambda: _analysis(config)),
        _run("SPS TLS", lambda: _tls(config)),
    ]


def check_config(options: argparse.Namespace, out: TextIO) -> int:
    """``dpatia check-config``: the report, exit status 1 if any check failed."""
    checks = run_checks(options.config)
    if options.json:
        write_json(out, [{"check": c.name, "result": c.result, "detail": c.detail} for c in checks])
    else:
        table(
            out,
            ("CHECK", "RESULT", "DETAIL"),
            [(c.name, c.result, clip(c.detail, 200)) for c in checks],
        )
    return FAILED if any(c.result == "fail" for c in checks) else OK
