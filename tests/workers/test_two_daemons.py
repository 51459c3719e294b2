"""Two real daemons on one spool, as two hosts would run them: one is SIGKILLed (its
whole process group, workers and all) while jobs run, and the survivor finishes every
job, each slide with exactly one result at the fake SPS.

Each daemon is a real ``twistd dpatia`` in a session of its own (so ``killpg`` takes
its workers with it and nothing else), with its own work folder and a short
``[spool] sweep_interval``: the survivor's sweep finds the dead daemon's running jobs
(their run locks are free once the kernel drops the dead holder's locks) and requeues
them.
"""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from conftest import write_config
from twisted.internet import defer

from dpatia_daemon.models import Result
from dpatia_daemon.simulator.daemon_process import DaemonProcess
from dpatia_daemon.sps.results import Status, frame_status

pytestmark = pytest.mark.integration

#: ``twistd`` in a new session: the daemon leads its own process group (its workers
#: join it), so the test can SIGKILL the group without touching itself.
SESSION_TWISTD = (
    "-c",
    "import os, sys; os.setsid(); from twisted.scripts.twistd import run; run()",
)
SWEEP = 1.0
SLIDES = [f"slide-two-{n}" for n in range(6)]
FINAL = {Status.DONE, Status.FAILED, Status.CANCELLED}


def daemon(reactor: Any, tmp_path: Path, name: str, workers: int = 2) -> DaemonProcess:
    config = write_config(
        tmp_path,
        {
            "app": {"analysis": "tests.analyses_for_tests:run"},
            "spool": {"sweep_interval": SWEEP},
            "pipeline": {"download_wsi": "false"},
            "workers": {
                "count": workers,
                "work_directory": f"{{tmp}}/work-{name}",
                "heartbeat_interval": 0.5,
                "min_backoff": 0.5,
                "shutdown_grace": 2,
            },
        },
        name=f"{name}.ini",
    )
    return DaemonProcess(
        reactor=reactor,
        config=config,
        cwd=str(tmp_path),
        command=(
            *SESSION_TWISTD,
            "--nodaemon",
            "--pidfile=",
            "dpatia",
            "--config",
            config,
            "--listen",
            "tcp:0:interface=127.0.0.1",
        ),
    )


def notification(
    sps: Any, slide_id: str, seconds: float, token: str | None = None, **test: Any
) -> dict[str, Any]:
    return {
        "action": "newImageFiles",
        "applicationId": "dpatia",
        "slideId": slide_id,
        "callbackInfo": {"url": sps.url, "token": token or sps.token},
        "cancellationToken": f"ct-{slide_id}",
        "context": {"test": {"seconds": seconds, **test}},
        "imageInfo": {"imageSize": {"width": 1000, "height": 500}, "micronsPerPixel": 0.25},
    }


async def notify(door: DaemonProcess, body: Any) -> None:
    response = await treq.post(
        door.url + "/dpatia/imagenotification",
        json.dumps(body).encode(),
        headers={"Content-Type": ["application/json"]},
    )
    assert response.code == 200, await response.content()
    await response.content()


def kill_group(process: DaemonProcess) -> None:
    """SIGKILL the daemon's whole process group: the daemon and its workers at once."""
    assert process.pid is not None
    os.killpg(process.pid, signal.SIGKILL)


async def all_final(reactor: Any, sps: Any, timeout: float) -> dict[str, list[Result]]:
    """Every slide's results once each slide has a final one (bounded by ``timeout``)."""

    def finished() -> bool:
        return all(
            any(frame_status(r) in FINAL for r in sps.fake.results_for(s, "dpatia"))
            for s in SLIDES
        )

    deadline = reactor.seconds() + timeout
    while not finished():
        left = deadline - reactor.seconds()
        if left <= 0:
            seen = {
                s: [frame_status(r) for r in sps.fake.results_for(s, "dpatia")] for s in SLIDES
            }
            raise AssertionError(f"not every slide final within {timeout} s: {seen}")
        # Wait for the next stored result (an event), never for a fixed time.
        waiting = sps.fake.next_stored(lambda r: True)
        try:
            await waiting.addTimeout(left, reactor)
        except defer.TimeoutError:
            pass
    return {s: sps.fake.results_for(s, "dpatia") for s in SLIDES}


@pytest_twisted.ensureDeferred
async def test_the_survivor_finishes_the_killed_daemons_jobs_once_each(
    reactor: Any, sps: Any, tmp_path: Path
) -> None:
    """Daemon A runs jobs; A and its workers are SIGKILLed; daemon B, on the same spool,
    requeues A's running jobs at its next sweep and finishes every job: each slide ends
    with exactly one result, a final "done" one."""
    for slide in SLIDES:
        sps.fake.add_slide(slide, width=2000, height=1000)
    a, b = daemon(reactor, tmp_path, "a"), daemon(reactor, tmp_path, "b")
    await defer.gatherResults([defer.ensureDeferred(_start(a)), defer.ensureDeferred(_start(b))])
    try:
        for slide in SLIDES:
            await notify(a, notification(sps, slide, seconds=1.0))
        # Both daemons take jobs from the shared spool; wait until A runs two of them.
        running = re.compile(rb"job (\w+): running on worker")
        await a.wait_for(running, timeout=30, since=0)
        await a.wait_for(running, timeout=30, since=a.output.index(b"running on worker") + 1)
        kill_group(a)
        await a.ended()
        killed_at = reactor.seconds()
        finished_by_a = set(re.findall(rb"job (\w+) done", bytes(a.output)))
        held_by_a = set(running.findall(bytes(a.output))) - finished_by_a
        # The survivor's next sweep finds A's running jobs (a bounded wait on its log).
        await b.wait_for(rb"recovered from a dead holder", timeout=SWEEP + 30, since=0)
        recovered_after = reactor.seconds() - killed_at
        results = await all_final(reactor, sps, timeout=40)
    finally:
        if a.exit_code is None and a.exit_signal is None:
            kill_group(a)
            await a.ended()
        await b.kill(signal.SIGTERM)
        (tmp_path / "a.log").write_bytes(bytes(a.output))
        (tmp_path / "b.log").write_bytes(bytes(b.output))

    assert a.exit_signal == signal.SIGKILL
    for slide, stored in results.items():
        assert len(stored) == 1, (slide, stored)
        assert frame_status(stored[0]) is Status.DONE, (slide, stored[0].displayProperties)
    # B took over every job A still held, within a sweep of the kill (plus slack for
    # a loaded machine), and ran each of them.
    assert held_by_a
    assert recovered_after < SWEEP + 5, recovered_after
    requeued = set(re.findall(rb"job (\w+) recovered from a dead holder", bytes(b.output)))
    ran = set(re.findall(rb"job (\w+): running on worker", bytes(b.output)))
    assert requeued == held_by_a, (requeued, held_by_a)
    assert held_by_a <= ran, (held_by_a, ran)
    # Nothing is left running or queued in the spool.
    spool = tmp_path / "spool"
    assert list((spool / "running").glob("*.json")) == []
    assert list((spool / "queued").glob("*.json")) == []
    assert len(list((spool / "done").glob("*.json"))) == len(SLIDES)


async def _start(process: DaemonProcess) -> None:
    await process.start(timeout=60)


@pytest_twisted.ensureDeferred
async def test_a_running_job_hears_of_a_token_another_daemon_received(
    reactor: Any, sps: Any, tmp_path: Path
) -> None:
    """A job runs on daemon A; a newer request for its slide reaches daemon B (a front
    door only) with a new token, and the old token is revoked at the SPS: A's job
    finishes with the new token (A noticed the spool's record change at its heartbeat
    and pushed the token to its worker)."""
    slide = "slide-token"
    sps.fake.add_slide(slide, width=2000, height=1000)
    a, b = daemon(reactor, tmp_path, "a", workers=1), daemon(reactor, tmp_path, "b", workers=0)
    await defer.gatherResults([defer.ensureDeferred(_start(a)), defer.ensureDeferred(_start(b))])
    try:
        # Long enough that the job still runs when B's request is in (under load, B's
        # front door can take seconds): a job that ended first never hears of it.
        await notify(a, notification(sps, slide, seconds=8, progress_every=0.3))
        match = await a.wait_for(rb"job (\w+): running on worker", timeout=30, since=0)
        job_id = match.group(1)
        await a.wait_for(rb"analysis started", timeout=30, since=0)
        new_token = sps.fake.issue_token()
        await notify(b, notification(sps, slide, seconds=0, token=new_token))
        sps.fake.tokens.discard(sps.token)
        heard = await a.wait_for(rb"a newer callback token reached the spool", timeout=10)
        await a.wait_for(rb"job " + job_id + rb": result \d+ stored", timeout=30, since=0)
    finally:
        await defer.gatherResults([a.kill(signal.SIGTERM), b.kill(signal.SIGTERM)])
    assert heard is not None
    assert b"handed to its worker" in bytes(a.output)
    done = [p.name for p in (tmp_path / "spool" / "done").glob("*.json")]
    assert any(job_id.decode() in name for name in done), done
