"""The operator's commands beside a real running daemon (``twistd dpatia`` subprocess)."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from admin_spool import run, run_json
from conftest import write_config

from dpatia_daemon.simulator.daemon_process import DaemonProcess

pytestmark = pytest.mark.integration

JOB = rb"job ([0-9a-f]{32})"


async def notify(daemon: DaemonProcess, sps: Any, slide: str) -> None:
    sps.fake.add_slide(slide)
    body = {
        "action": "newImageFiles",
        "applicationId": "dpatia",
        "slideId": slide,
        "callbackInfo": {"url": sps.url, "token": sps.token},
        "cancellationToken": f"ct-{slide}",
        "context": {},
        "imageInfo": {"imageSize": {"width": 1000, "height": 500}},
    }
    response = await treq.post(
        daemon.url + "/dpatia/imagenotification",
        json.dumps(body).encode(),
        headers={"Content-Type": ["application/json"]},
    )
    assert response.code == 200, await response.text()


@pytest_twisted.ensureDeferred
async def test_retry_and_cancel_while_the_daemon_runs(
    reactor: Any, sps: Any, tmp_path: Path
) -> None:
    """dpatia retry of a failed job gets it run (and its result stored) by the running
    daemon; dpatia cancel of a job it is running makes the daemon stop it."""
    flag = tmp_path / "fail"
    flag.write_text("")
    config = write_config(
        tmp_path,
        {
            "app": {"analysis": "tests.admin.flaky_analysis:run"},
            "spool": {"sweep_interval": 0.5},
            "pipeline": {"download_wsi": "false"},
            "workers": {
                "count": 1,
                "max_attempts": 1,
                "environment": f"DPATIA_TEST_FAIL_FLAG={flag}",
            },
        },
    )
    daemon = DaemonProcess(reactor=reactor, config=config, cwd=str(tmp_path))
    await daemon.start()
    try:
        await notify(daemon, sps, "slide-retry")
        job_id = (await daemon.wait_for(JOB + rb" failed", since=0)).group(1).decode()
        status, view = run_json("show", job_id, "--config", config)
        assert (status, view["state"]) == (0, "failed")

        flag.unlink()
        since = len(daemon.output)
        status, text = run("retry", "--failed", "--config", config)
        assert status == 0 and job_id in text
        await daemon.wait_for(rb"job %s done" % job_id.encode(), since=since)
        assert run_json("show", job_id, "--config", config)[1]["state"] == "done"
        stored = [r for r in sps.fake.results.values() if r.slideId == "slide-retry"]
        assert [r.displayResult for r in stored] == ["flaky analysis: fine now"]

        since = len(daemon.output)
        await notify(daemon, sps, "hold-1")
        held = (await daemon.wait_for(JOB + rb" claimed", since=since)).group(1).decode()
        await daemon.wait_for(rb"job %s: analysis started" % held.encode(), since=since)
        status, text = run("cancel", held, "--config", config)
        assert status == 0 and "cancellation requested" in text
        await daemon.wait_for(rb"job %s cancelled" % held.encode(), since=since)
        status, report = run_json("status", "--config", config)
        assert report["counts"]["cancelled"] == 1 and report["counts"]["running"] == 0
    finally:
        await daemon.kill(signal.SIGTERM)
