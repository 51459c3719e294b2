"""The status page of the admin listener (``ops/status.py``): the board's memory of the
workers' events in memory, and a real daemon's ``/status`` in headless Chromium, with
neither the token nor any PHI in the page or its JSON."""

from __future__ import annotations

import json
import signal
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from conftest import Loopback, success_result_of, write_config
from test_daemon_ops import PHI, phi_strings
from test_metrics import ADMIN_LINE, create, scrape_until
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread

from dpatia_daemon.jobs import Callback, Deferral, DeferralKind, Job, JobKind
from dpatia_daemon.ops.metrics import SpoolView
from dpatia_daemon.ops.status import StatusBoard
from dpatia_daemon.simulator.daemon_process import DaemonProcess
from dpatia_daemon.spool import MemorySpool
from dpatia_daemon.workers.events import SupervisorEvent

CHROMIUM = Path("/usr/bin/chromium")


def test_the_board_follows_running_jobs_and_remembers_failures() -> None:
    """job-started/progress/ended events make the running list (progress and step),
    and failed or deferred endings the recent failures with their reasons; deferred
    queued jobs show their next try; no callback or token in the document."""
    clock = Clock()
    clock.advance(500)
    spool = MemorySpool()
    spool.startService()
    waiting = Job(
        slide_id="slide-w",
        application_id="dpatia",
        kind=JobKind.CREATE,
        callback=Callback("http://sps/?q=1", "secret-token-1"),
        created=400.0,
    )
    job = success_result_of(spool.add(waiting))
    success_result_of(spool.claim(job.job_id))
    deferral = Deferral(not_before=560.0, reason="SPS answered 503", kind=DeferralKind.SPS)
    success_result_of(spool.release(job.job_id, count_attempt=False, deferral=deferral))
    board = StatusBoard(
        clock, SpoolView(spool, clock), failing=lambda: {"http://sps/api?x=secret": "HTTP 503"}
    )
    board.event(SupervisorEvent("job-started", "1.1", "a" * 32, {"attempt": 1}))
    board.event(
        SupervisorEvent("job-progress", "1.1", "a" * 32, {"percent": 42, "text": "Fetching label"})
    )
    board.event(
        SupervisorEvent("job-ended", None, "b" * 32, {"state": "failed", "error": "ValueError: x"})
    )
    board.event(
        SupervisorEvent(
            "job-ended", None, "c" * 32, {"state": "queued", "deferral": "error", "error": "boom"}
        )
    )
    board.event(SupervisorEvent("job-ended", None, "d" * 32, {"state": "done"}))
    clock.advance(10)
    document = success_result_of(ensureDeferred(board.document()))
    [running] = document["running"]
    assert (running["percent"], running["step"], running["seconds"]) == (42, "Fetching label", 10)
    assert [f["what"] for f in document["failures"]] == ["attempt failed, retried later", "failed"]
    assert document["failures"][1]["reason"] == "ValueError: x"
    [deferred] = document["deferred"]
    assert deferred["next_try_in"] == 50 and deferred["why"] == "sps"
    assert deferred["reason"] == "SPS answered 503"
    assert document["queue"] == []
    assert document["sps"]["failing"] == [{"sps": "http://sps/api", "reason": "HTTP 503"}]
    text = json.dumps(document)
    assert "secret" not in text


def _chromium(tmp_path: Path, url: str, *args: str) -> list[str]:
    return [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        "--force-device-scale-factor=1",
        f"--user-data-dir={tmp_path / 'chrome'}",
        "--virtual-time-budget=3000",
        "--window-size=1100,1000",
        *args,
        url,
    ]


@pytest.mark.integration
@pytest.mark.skipif(
    not CHROMIUM.exists(), reason="Debian's chromium is not installed (apt-get install -y chromium)"
)
@pytest_twisted.ensureDeferred
async def test_the_status_page_in_headless_chromium_shows_no_token_and_no_phi(
    reactor: Any, sps: Loopback, tmp_path: Path
) -> None:
    """A daemon with include_phi on runs a job (its PHI fetched) while another failed:
    headless Chromium renders /status from /status.json (the running job with its
    progress and step, the worker busy, the failure with its reason, SPS healthy), and
    neither the page nor the JSON holds the callback token, a cancellation token or any
    PHI value.  The screenshot is kept in the test's tmp_path."""
    sps.fake.add_slide("slide-phi", **PHI)
    sps.fake.add_slide("slide-bad")
    ini = write_config(
        tmp_path,
        {
            "app": {"analysis": "tests.analyses_for_tests:run", "include_phi": "true"},
            "pipeline": {"download_wsi": "false"},
            "workers": {"count": 1, "max_attempts": 1},
            "admin": {"listen": "tcp:0"},
        },
    )
    daemon = DaemonProcess(reactor=reactor, config=ini, cwd=str(tmp_path))
    secrets = [sps.token, *phi_strings(PHI)]
    await daemon.start()
    try:
        match = await daemon.wait_for(ADMIN_LINE, since=0)
        admin = f"http://127.0.0.1:{int(match.group(1))}"
        bad = f"ct-{uuid.uuid4().hex}"
        secrets.append(bad)
        headers = {"Content-Type": ["application/json"]}
        answer = await treq.post(
            daemon.url + "/dpatia",
            create(sps, "slide-bad", bad, {"fail": "broken on purpose"}),
            headers=headers,
        )
        assert answer.code == 200
        await daemon.wait_for(rb"job \w+ failed|attempt 1 of 1 failed", since=0)
        good = f"ct-{uuid.uuid4().hex}"
        secrets.append(good)
        mark = len(daemon.output)
        answer = await treq.post(
            daemon.url + "/dpatia",
            create(sps, "slide-phi", good, {"seconds": 60, "progress_every": 0.2}),
            headers=headers,
        )
        assert answer.code == 200
        await daemon.wait_for(rb"analysis started", since=mark)
        # Its first progress report follows the log line over AMP.
        text = await scrape_until(
            reactor,
            admin + "/status.json",
            lambda t: any(r["percent"] >= 60 for r in json.loads(t)["running"]),
        )
        document = json.loads(text)
        dom = await deferToThread(
            subprocess.run,
            _chromium(tmp_path, admin + "/status", "--dump-dom"),
            capture_output=True,
            timeout=90,
        )
        shot = tmp_path / "status.png"
        run = await deferToThread(
            subprocess.run,
            _chromium(tmp_path, admin + "/status", f"--screenshot={shot}"),
            capture_output=True,
            timeout=90,
        )
    finally:
        await daemon.kill(signal.SIGKILL)
    print(f"status page screenshot: {shot}")
    assert shot.exists() and shot.stat().st_size > 5000, run.stderr.decode(errors="replace")[-2000:]

    [running] = document["running"]
    assert running["worker"] and running["percent"] >= 60  # past the pipeline's share
    assert document["workers"][0]["state"] == "busy"
    assert document["failures"][0]["what"] == "failed"
    assert "broken on purpose" in document["failures"][0]["reason"]
    assert document["sps"]["healthy"] is True

    page = dom.stdout.decode(errors="replace")
    assert running["job_id"] in page, page[-3000:]
    assert "broken on purpose" in page
    assert 'id="sps-state">healthy' in page
    assert 'id="count-failed">1<' in page
    text = json.dumps(document)
    for secret in secrets:
        assert secret not in text, f"{secret!r} in status.json"
        assert secret not in page, f"{secret!r} on the status page"
