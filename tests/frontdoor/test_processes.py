"""``[server] processes``: extra front-door processes on the same port (SO_REUSEPORT).

The real daemon as a subprocess, a fake SPS on loopback.  Waits are on the daemon's
own log lines and on answers, with bounded timeouts, never sleeps.
"""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
import treq
from conftest import Loopback, write_config
from twisted.internet.defer import DeferredList, gatherResults
from twisted.python.filepath import FilePath
from twisted.web.client import Agent, HTTPConnectionPool

from dpatia_daemon.config import Config, ServerConfig
from dpatia_daemon.frontdoor.listening import noticed as _noticed
from dpatia_daemon.jobs import Callback, Job, JobKind
from dpatia_daemon.service import build_service
from dpatia_daemon.simulator.daemon_process import DaemonProcess
from dpatia_daemon.spool import DirectorySpool, SpoolStore
from dpatia_daemon.sps.tokens import TokenBook

pytestmark = pytest.mark.integration

APP = "dpatia"


def body(sps: Loopback, slide: str) -> dict[str, Any]:
    return {
        "action": "newImageFiles",
        "applicationId": APP,
        "slideId": slide,
        "callbackInfo": {"url": sps.url, "token": sps.token},
        "cancellationToken": f"ct-{slide}",
        "context": {"test": {}},
        "imageInfo": {"imageSize": {"width": 1000, "height": 500}},
    }


def config(tmp_path: Path, workers: int, sweep_interval: float = 3600) -> str:
    return write_config(
        tmp_path,
        {
            "server": {"processes": 2},
            "app": {"analysis": "tests.analyses_for_tests:run"},
            "pipeline": {"download_wsi": "false"},
            # Only the copies' notices can get their jobs to the workers quickly.
            "spool": {"sweep_interval": sweep_interval},
            "workers": {"count": workers, "shutdown_grace": 0.5},
        },
    )


@pytest_twisted.ensureDeferred
async def test_a_front_door_answers_while_the_main_process_is_stopped_and_its_jobs_run_at_once(
    reactor: Any,
    sps: Loopback,
    tmp_path: Path,
) -> None:
    """With the main process stopped (SIGSTOP), the copy still acknowledges the
    connections the kernel gives it; once the main process continues, every job runs,
    well before any sweep (an hour away) could have found the copy's jobs."""
    slides = [f"slide-door-{i}" for i in range(16)]
    for slide in slides:
        sps.fake.add_slide(slide)
    daemon = DaemonProcess(reactor=reactor, config=config(tmp_path, workers=2), cwd=str(tmp_path))
    await daemon.start()
    await daemon.wait_for(rb"dpatia front door 1 ready", since=0)
    # A connection per request, so the kernel spreads them over both processes.
    pool = HTTPConnectionPool(reactor, persistent=False)
    client = treq.client.HTTPClient(Agent(reactor, pool=pool))
    url = daemon.url + "/dpatia/imagenotification"
    assert daemon.pid is not None
    os.kill(daemon.pid, signal.SIGSTOP)
    try:
        posts = [
            client.post(
                url,
                json.dumps(body(sps, slide)).encode(),
                headers={"Content-Type": ["application/json"]},
            )
            for slide in slides
        ]
        # Each connection lands on either socket: all 16 on the stopped one is a
        # 1-in-65536 chance.
        first = DeferredList(posts, fireOnOneCallback=True, fireOnOneErrback=True)
        await first.addTimeout(20, reactor)
    finally:
        os.kill(daemon.pid, signal.SIGCONT)
    try:
        responses = await gatherResults(posts).addTimeout(20, reactor)
        assert [r.code for r in responses] == [200] * len(slides)
        # Both processes log to the same output; each accepted job says so before its
        # answer is sent.
        accepted = dict(
            (m.group(2).decode(), m.group(1))
            for m in re.finditer(
                rb"job (\w+) accepted: image notification for slide (slide-door-\d+)",
                bytes(daemon.output),
            )
        )
        assert sorted(accepted) == sorted(slides)
        # At least one was acknowledged by the copy, which told the main process.
        assert b"front door 1 reports the jobs it queues" in daemon.output
        for job_id in accepted.values():
            await daemon.wait_for(rb"job %s done" % job_id, since=0, timeout=30)
    finally:
        await daemon.kill(signal.SIGTERM)
    assert b"Traceback" not in daemon.output
    # The copy stopped with the main process, told so by its link.
    assert b"the main process closed our link: stopping this front door" in daemon.output


@pytest_twisted.ensureDeferred
async def test_a_killed_front_door_starts_again_and_copies_end_with_the_main_process(
    reactor: Any, tmp_path: Path
) -> None:
    daemon = DaemonProcess(reactor=reactor, config=config(tmp_path, workers=0), cwd=str(tmp_path))
    await daemon.start()
    started = await daemon.wait_for(rb"front door 1 started \(pid (\d+)\)", since=0)
    await daemon.wait_for(rb"dpatia front door 1 ready", since=0)
    first = int(started.group(1))
    mark = len(daemon.output)
    os.kill(first, signal.SIGKILL)
    await daemon.wait_for(rb"front door 1 ended", since=mark)
    again = await daemon.wait_for(rb"front door 1 started \(pid (\d+)\)", since=mark)
    assert int(again.group(1)) != first
    await daemon.wait_for(rb"dpatia front door 1 ready", since=mark)
    # The main process dies without a word: its copy sees its link close and stops.
    # ("ended" fires once every process holding the daemon's output has closed it.)
    await daemon.kill(signal.SIGKILL)
    await daemon.ended().addTimeout(20, reactor)
    tail = bytes(daemon.output[mark:])
    assert b"the main process closed our link: stopping this front door" in tail
    assert not re.search(rb"Traceback", tail)


@pytest.mark.parametrize(
    "listen", ["ssl:5443:privateKey=k.pem:certKey=c.pem", "systemd:domain=INET:index=0"]
)
def test_more_processes_need_a_plain_tcp_listener(listen: str, tmp_path: Path) -> None:
    from twisted.internet import reactor

    from dpatia_daemon.config import ConfigError

    source = tmp_path / "dpatia.ini"
    source.write_text("")
    config = Config(source=str(source), server=ServerConfig(listen=listen, processes=2))
    with pytest.raises(ConfigError, match=r"\[server\] processes: .*plain tcp: listener"):
        build_service(config, reactor)


@pytest_twisted.ensureDeferred
async def test_a_copys_job_is_announced_and_its_token_becomes_the_newest(
    reactor: Any, tmp_path: Path
) -> None:
    """What the main process does with a copy's notice: its dispatcher hears of the job,
    and running jobs of the slide write with the token the copy received."""
    directory = FilePath(str(tmp_path / "spool"))
    spool = DirectorySpool(directory=directory, reactor=reactor, sweep_interval=3600.0)
    spool.startService()
    try:
        seen: list[Job] = []
        spool.watch(seen.append)
        tokens = TokenBook()
        old = Job(
            slide_id="slide-1",
            application_id=APP,
            kind=JobKind.NOTIFICATION,
            callback=Callback("http://127.0.0.1:1/x", "old-token"),
            created=100.0,
        )
        tokens.record(APP, "slide-1", old.callback, old.created)
        copy = SpoolStore(directory, owner="copy")
        copy.open()
        try:
            theirs = copy.add(
                attrs.evolve(
                    old, callback=Callback("http://127.0.0.1:1/x", "new-token"), created=200.0
                )
            )
        finally:
            copy.close()
        await _noticed(spool, tokens, theirs.job_id, theirs.key)
        assert [job.job_id for job in seen] == [theirs.job_id]
        assert tokens.newest(old).token == "new-token"
    finally:
        await spool.stopService()
