"""Workers inside the real daemon: ``twistd -n dpatia`` as a subprocess, a fake SPS on
loopback, the test analysis in the workers (``[app] analysis =
tests.analyses_for_tests:run``; the supervisor puts the checkout first on the workers'
PYTHONPATH, so ``tests`` imports there as a namespace package).

Waits are on the daemon's own log lines (with bounded timeouts), never sleeps.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from conftest import Loopback, write_config

from dpatia_daemon.jobs import Job, JobState
from dpatia_daemon.simulator.daemon_process import DaemonProcess
from dpatia_daemon.sps.results import Status, frame_status

pytestmark = pytest.mark.integration

APP = "dpatia"


def config(tmp_path: Path, **workers: Any) -> str:
    settings = {"count": 1, "shutdown_grace": 0.5, "kill_grace": 2, **workers}
    return write_config(
        tmp_path,
        {
            "app": {"analysis": "tests.analyses_for_tests:run"},
            # These tests are about supervision: the fake slides have no WSI files.
            "pipeline": {"download_wsi": "false"},
            "workers": settings,
        },
    )


def body(sps: Loopback, slide: str, action: str | None = None, **test: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "applicationId": APP,
        "slideId": slide,
        "callbackInfo": {"url": sps.url, "token": sps.token},
        "cancellationToken": f"ct-{slide}",
        "context": {"test": test},
    }
    if action is None:
        payload["action"] = "newImageFiles"
        payload["imageInfo"] = {"imageSize": {"width": 1000, "height": 500}}
    else:
        payload["action"] = action
        payload["input"] = {"type": "wholeSlide"}
    return payload


async def post(url: str, payload: Any) -> tuple[int, Any]:
    response = await treq.post(
        url, json.dumps(payload).encode(), headers={"Content-Type": ["application/json"]}
    )
    return response.code, json.loads(await response.content())


def jobs_in(spool: Path, state: str) -> list[Job]:
    return [Job.from_json(p.read_bytes()) for p in sorted((spool / state).glob("*.json"))]


@pytest_twisted.ensureDeferred
async def test_sigterm_mid_job_then_restart_completes_the_job_once(
    reactor: Any, sps: Loopback, tmp_path: Path
) -> None:
    """SIGTERM while a job runs: after shutdown_grace the job goes back to the queue
    (no attempt spent, nothing failed); the restarted daemon runs it; it completes
    exactly once and the slide has one result."""
    sps.fake.add_slide("slide-term")
    record = tmp_path / "completed.txt"
    ini = config(tmp_path)
    daemon = DaemonProcess(reactor=reactor, config=ini, cwd=str(tmp_path))
    await daemon.start()
    try:
        code, _ = await post(
            daemon.url + "/dpatia/imagenotification",
            body(sps, "slide-term", seconds=1.5, record=str(record)),
        )
        assert code == 200
        await daemon.wait_for(rb"job \w+: running on worker", since=0)
    finally:
        await daemon.kill(signal.SIGTERM)
    assert daemon.exit_code == 0 or daemon.exit_signal == signal.SIGTERM
    assert b"Traceback" not in daemon.output
    [queued] = jobs_in(tmp_path / "spool", "queued")
    assert (queued.attempts, queued.state) == (0, JobState.QUEUED)
    assert not jobs_in(tmp_path / "spool", "failed")
    assert not record.exists()

    restarted = DaemonProcess(reactor=reactor, config=ini, cwd=str(tmp_path))
    await restarted.start()
    try:
        await restarted.wait_for(rb"job %s done" % queued.job_id.encode(), since=0)
    finally:
        await restarted.kill(signal.SIGTERM)
    assert record.read_text().split() == [queued.job_id]
    [done] = jobs_in(tmp_path / "spool", "done")
    assert done.job_id == queued.job_id
    results = sps.fake.results_for("slide-term", APP)
    assert len(results) == 1
    assert results[0].displayResult == "test answer"
    assert frame_status(results[0]) is Status.DONE


@pytest_twisted.ensureDeferred
async def test_cancel_through_the_api_stops_the_running_job(
    reactor: Any, sps: Loopback, tmp_path: Path
) -> None:
    """POST /dpatia create, then cancel with its cancellationToken while it runs: the
    analysis stops within seconds and the slide's one result says Cancelled."""
    sps.fake.add_slide("slide-cancel")
    daemon = DaemonProcess(reactor=reactor, config=config(tmp_path), cwd=str(tmp_path))
    await daemon.start()
    try:
        code, created = await post(
            daemon.url + "/dpatia", body(sps, "slide-cancel", "create", seconds=60)
        )
        assert code == 200
        assert created["id"] is not None
        await daemon.wait_for(rb"job \w+: running on worker", since=0)
        asked = reactor.seconds()
        code, answer = await post(daemon.url + "/dpatia", body(sps, "slide-cancel", "cancel"))
        assert (code, answer) == (200, [])
        await daemon.wait_for(rb"job \w+ cancelled", since=0, timeout=10)
        assert reactor.seconds() - asked < 5
    finally:
        await daemon.kill(signal.SIGTERM)
    results = sps.fake.results_for("slide-cancel", APP)
    assert len(results) == 1
    assert results[0].id == created["id"]
    assert frame_status(results[0]) is Status.CANCELLED
    [cancelled] = jobs_in(tmp_path / "spool", "cancelled")
    assert cancelled.state is JobState.CANCELLED
