"""The real daemon under the eyes of operations: ``twistd -n dpatia`` as a subprocess
that believes systemd started it (NOTIFY_SOCKET, WATCHDOG_USEC), and a full job with
PHI fetched whose whole log is searched for the token and the PHI."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from conftest import Loopback, write_config
from notify_helpers import NotifyReceiver
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol

from dpatia_daemon.simulator.daemon_process import TWISTD, DaemonProcess
from dpatia_daemon.simulator.fake import PHI_FIELDS
from dpatia_daemon.sps.results import Status, frame_status

pytestmark = pytest.mark.integration


@pytest_twisted.ensureDeferred
async def test_systemd_hears_ready_status_watchdog_then_stopping(
    reactor: Any, tmp_path: Path
) -> None:
    """Started as by systemd: READY=1 once the workers are up, then STATUS= with the
    queue and the workers, WATCHDOG=1 pings, and STOPPING=1 at SIGTERM, in that
    order; every line on stdout has its priority prefix."""
    name = f"dpatia-test-{uuid.uuid4().hex}"
    systemd = NotifyReceiver(reactor, "\0" + name)
    ini = write_config(
        tmp_path, {"app": {"analysis": "tests.analyses_for_tests:noop"}, "workers": {"count": 1}}
    )
    env = {**os.environ, "NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "400000"}
    daemon = DaemonProcess(reactor=reactor, config=ini, cwd=str(tmp_path), env=env)
    try:
        await daemon.start()
        await systemd.wait_for(lambda m: m.startswith("READY=1"))
        status = await systemd.wait_for(lambda m: m.startswith("STATUS=jobs:"))
        await systemd.wait_for(lambda m: m == "WATCHDOG=1\n")
    finally:
        await daemon.kill(signal.SIGTERM)
    try:
        await systemd.wait_for(lambda m: m.startswith("STOPPING=1"), 10)
    finally:
        systemd.close()
    assert status.startswith("STATUS=jobs: 0 queued, 0 running")
    assert status.endswith("; workers: 0 of 1 busy\n")
    kinds = [m.split("=")[0] for m in systemd.messages if not m.startswith("WATCHDOG")]
    assert kinds[0] == "READY"
    assert kinds[-1] == "STOPPING"
    assert set(kinds[1:-1]) == {"STATUS"}
    lines = [line for line in bytes(daemon.output).decode().splitlines() if line]
    assert lines and all(re.match(r"<[2-7]>\[", line) for line in lines), lines[:5]
    assert any(line.startswith("<6>") and "dpatia ready" in line for line in lines)


#: Patient identifiers of the test slide: none may appear in the log.
PHI = {
    "accessionNumber": "ACC-PHI-93127",
    "lisSlideId": "LIS-PHI-55012",
    "examId": "EXAM-PHI-77801",
    "seriesInstanceUid": "1.2.826.0.1.999.93127",
    "studyInstanceUid": "1.2.826.0.1.999.55012",
    "accessionNumberIssuer": "ISSUER-PHI-1",
    "examDateTime": "1961-07-04T11:12:13",
    "examFreeFields": [{"Referrer": "Dr. Phineas Privatename"}],
}


def phi_strings(value: Any) -> list[str]:
    """Every text in ``value`` (the PHI fields' values, nested ones too)."""
    if isinstance(value, dict):
        return [s for v in value.values() for s in phi_strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in phi_strings(v)]
    return [str(value)]


@pytest_twisted.ensureDeferred
async def test_a_full_job_with_phi_logs_no_token_and_no_phi(
    reactor: Any, sps: Loopback, tmp_path: Path
) -> None:
    """[app] include_phi on, [log] level = debug in JSON, every request in the access
    log: a job fetches the slide's PHI and ends Done, and nothing logged holds the
    callback token, the cancellation token or any PHI value."""
    assert set(PHI) == PHI_FIELDS
    sps.fake.add_slide("slide-phi", **PHI)
    ini = write_config(
        tmp_path,
        {
            "app": {"analysis": "tests.analyses_for_tests:run", "include_phi": "true"},
            "pipeline": {"download_wsi": "false"},
            "workers": {"count": 1},
            "server": {"access_log": "all"},
            "log": {"format": "json", "level": "debug"},
        },
    )
    daemon = DaemonProcess(reactor=reactor, config=ini, cwd=str(tmp_path))
    cancellation = f"ct-{uuid.uuid4().hex}"
    await daemon.start()
    try:
        response = await treq.post(
            daemon.url + "/dpatia",
            json.dumps(
                {
                    "action": "create",
                    "applicationId": "dpatia",
                    "slideId": "slide-phi",
                    "callbackInfo": {"url": sps.url, "token": sps.token},
                    "cancellationToken": cancellation,
                    "input": {"type": "wholeSlide"},
                    "context": {},
                }
            ).encode(),
            headers={"Content-Type": ["application/json"]},
        )
        assert response.code == 200, await response.content()
        await daemon.wait_for(rb"job \w+ done", since=0)
    finally:
        await daemon.kill(signal.SIGTERM)

    [result] = sps.fake.results_for("slide-phi", "dpatia")
    assert frame_status(result) is Status.DONE
    asked = [r for r in sps.fake.requests if r.path.endswith("/slides/slide-phi/info")]
    assert any(r.query.get("includePHI") == ["true"] for r in asked), asked

    output = bytes(daemon.output).decode()
    records = [json.loads(line) for line in output.splitlines() if line.strip()]
    assert any(r["message"].startswith("job ") for r in records)
    for secret in [sps.token, cancellation, *phi_strings(PHI)]:
        assert secret not in output, f"{secret!r} was logged"
    factory = [
        r for r in records if r["message"].startswith(("Starting factory", "Stopping factory"))
    ]
    assert all(r["level"] == "debug" for r in factory)


class _Activator(ProcessProtocol):
    """systemd-socket-activate and the daemon it execs: output kept, the first line
    saying it listens, and the end."""

    def __init__(self) -> None:
        self.output = b""
        self.heard = False
        self.listening: Deferred[None] = Deferred()
        self.ended: Deferred[None] = Deferred()

    def childDataReceived(self, fd: int, data: bytes) -> None:
        self.output += data
        if b"Listening on" in self.output and not self.heard:
            self.heard = True
            self.listening.callback(None)

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(None)


@pytest.mark.skipif(
    shutil.which("systemd-socket-activate") is None,
    reason="systemd-socket-activate is not installed (Debian's systemd package has it)",
)
@pytest_twisted.ensureDeferred
async def test_socket_activation_answers_the_connection_that_started_it(
    reactor: Any, tmp_path: Path
) -> None:
    """listen = systemd:domain=INET:index=0 takes the socket systemd passes (as
    dpatia.socket does): the request made before the daemon ran waits in the backlog
    and is answered, which is what keeps an upgrade from refusing connections."""
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    ini = write_config(
        tmp_path, {"server": {"listen": "systemd:domain=INET:index=0"}, "workers": {"count": 0}}
    )
    activate = shutil.which("systemd-socket-activate")
    assert activate is not None
    passed = [
        arg for name in ("PYTHONPATH", "PATH", "HOME") if name in os.environ for arg in ("-E", name)
    ]
    # --fdname: systemd names every socket it passes (the socket unit's name by
    # default), and Twisted's systemd: endpoint wants the names.
    argv = [
        activate,
        "-l",
        f"127.0.0.1:{port}",
        "--fdname=dpatia.socket",
        "-E",
        "PYTHONUNBUFFERED=1",
        *passed,
        sys.executable,
        *TWISTD,
        "--nodaemon",
        "--pidfile=",
        "dpatia",
        "--config",
        ini,
    ]
    activator = _Activator()
    process = reactor.spawnProcess(
        activator, activate, argv, env=dict(os.environ), path=str(tmp_path)
    )
    try:
        await activator.listening.addTimeout(30, reactor)
        try:
            response = await treq.get(f"http://127.0.0.1:{port}/").addTimeout(60, reactor)
        except Exception as e:
            raise AssertionError(activator.output.decode(errors="replace")) from e
        assert response.code == 200
        assert "jobs" in json.loads(await response.content())
    finally:
        try:
            process.signalProcess("TERM")
        except ProcessExitedAlready:
            pass  # the assertions above say why
        await activator.ended.addTimeout(60, reactor)
    assert b"Traceback" not in activator.output
