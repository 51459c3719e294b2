"""The real daemon: ``twistd -n dpatia`` as a subprocess on loopback, killed for real.

These tests start the daemon through its twistd plugin, talk to it over real sockets,
and use a fake SPS listening on loopback in the test process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
import treq
from conftest import write_config
from twisted.internet import defer
from twisted.internet.defer import DeferredSemaphore, ensureDeferred
from twisted.web.server import Site

from dpatia_daemon.jobs import Job
from dpatia_daemon.simulator.daemon_process import TWISTD, DaemonProcess
from dpatia_daemon.simulator.fake import FakeSPS

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
APP = "dpatia"


@attrs.frozen
class LoopbackSPS:
    fake: FakeSPS
    test_url: str
    test_token: str


@pytest.fixture
def fake_sps(reactor: Any) -> Any:
    """A fake SPS on a free loopback port, with one accepted token."""
    fake = FakeSPS()
    port = reactor.listenTCP(0, Site(fake.resource()), interface="127.0.0.1")
    yield LoopbackSPS(
        fake=fake,
        test_url=f"http://127.0.0.1:{port.getHost().port}/SectraPathologyServer/external/imageanalysis/v1",
        test_token=fake.issue_token(),
    )
    port.stopListening()


@pytest.fixture
def config_file(tmp_path: Path) -> str:
    # Real workers run a quick test analysis: these tests are about acceptance.
    return write_config(tmp_path, {"app": {"analysis": "tests.analyses_for_tests:noop"}})


def notification(fake: Any, slide_id: str) -> dict[str, Any]:
    return {
        "action": "newImageFiles",
        "applicationId": APP,
        "slideId": slide_id,
        "callbackInfo": {"url": fake.test_url, "token": fake.test_token},
        "cancellationToken": f"ct-{slide_id}",
        "context": {},
        "imageInfo": {"imageSize": {"width": 1000, "height": 500}, "micronsPerPixel": 0.25},
    }


def queued_jobs(spool: Path) -> list[Job]:
    return [Job.from_json(p.read_bytes()) for p in sorted((spool / "queued").glob("*.json"))]


def all_jobs(spool: Path) -> list[Job]:
    """Every job record in every state directory (workers move jobs along meanwhile)."""
    states = ("queued", "running", "done", "failed", "cancelled")
    return [
        Job.from_json(p.read_bytes()) for s in states for p in sorted((spool / s).glob("*.json"))
    ]


async def post_json(url: str, body: Any) -> tuple[int, Any]:
    response = await treq.post(
        url, json.dumps(body).encode(), headers={"Content-Type": ["application/json"]}
    )
    return response.code, json.loads(await response.content())


@pytest_twisted.ensureDeferred
async def test_job_survives_sigkill_right_after_the_acknowledgement(
    reactor: Any, fake_sps: Any, config_file: str, tmp_path: Path
) -> None:
    """A notification answered 200 is still in the spool after SIGKILL and a restart."""
    daemon = DaemonProcess(reactor=reactor, config=config_file, cwd=str(tmp_path))
    await daemon.start()
    try:
        code, body = await post_json(
            daemon.url + "/dpatia/imagenotification", notification(fake_sps, "slide-kill-1")
        )
        assert (code, body) == (200, {})
    finally:
        await daemon.kill(signal.SIGKILL)

    jobs = queued_jobs(tmp_path / "spool")
    assert [j.slide_id for j in jobs] == ["slide-kill-1"]

    restarted = DaemonProcess(reactor=reactor, config=config_file, cwd=str(tmp_path))
    await restarted.start()
    try:
        response = await treq.get(restarted.url + "/")
        status = json.loads(await response.content())
        # The job is there: still queued, or already taken by a worker.
        assert sum(status["jobs"].values()) == 1
        assert [j.job_id for j in all_jobs(tmp_path / "spool")] == [jobs[0].job_id]
    finally:
        await restarted.kill(signal.SIGTERM)


@pytest_twisted.ensureDeferred
async def test_500_notifications_from_32_clients_are_all_on_disk_once(
    reactor: Any, fake_sps: Any, config_file: str, tmp_path: Path
) -> None:
    """500 concurrent notifications: 500 acknowledged, 500 jobs on disk, none twice."""
    daemon = DaemonProcess(reactor=reactor, config=config_file, cwd=str(tmp_path))
    await daemon.start()
    semaphore = DeferredSemaphore(32)
    codes: Counter[int] = Counter()

    async def one(i: int) -> None:
        code, _ = await post_json(
            daemon.url + "/dpatia/imagenotification", notification(fake_sps, f"slide-{i:04d}")
        )
        codes[code] += 1

    try:
        await defer.gatherResults(
            [semaphore.run(lambda i=i: ensureDeferred(one(i))) for i in range(500)],
            consumeErrors=True,
        )
    finally:
        await daemon.kill(signal.SIGTERM)
    assert codes == Counter({200: 500})
    slides = Counter(j.slide_id for j in all_jobs(tmp_path / "spool"))
    assert len(slides) == 500
    assert max(slides.values()) == 1


@pytest_twisted.ensureDeferred
async def test_sigterm_stops_the_daemon_cleanly(
    reactor: Any, config_file: str, tmp_path: Path
) -> None:
    """SIGTERM shuts the daemon down cleanly: its services stop, no traceback."""
    daemon = DaemonProcess(reactor=reactor, config=config_file, cwd=str(tmp_path))
    await daemon.start()
    await daemon.kill(signal.SIGTERM)
    assert daemon.exit_code == 0 or daemon.exit_signal == signal.SIGTERM
    assert b"Server Shut Down." in daemon.output
    assert b"Traceback" not in daemon.output


@pytest.mark.parametrize(
    ("ini", "args", "expected"),
    [
        ("[workers]\ncount = two\n", [], "[workers] count: 'two' is not a number"),
        ("[spool]\nfrobnicate = 1\n", [], "[spool] frobnicate: unknown key"),
        (None, [], "no such file"),
        (
            "[sps]\nallowed_callback_urls = http://127.0.0.1:*/\n",
            ["--workers", "-1"],
            "command line --workers",
        ),
    ],
)
def test_bad_config_stops_the_daemon_with_one_line(
    tmp_path: Path, ini: str | None, args: list[str], expected: str
) -> None:
    """twistd exits non-zero and prints one line naming the problem, no usage text."""
    path = tmp_path / "dpatia.ini"
    if ini is not None:
        path.write_text(ini)
    run = subprocess.run(
        [
            sys.executable,
            *TWISTD,
            "--nodaemon",
            "--pidfile=",
            "dpatia",
            "--config",
            str(path),
            *args,
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert run.returncode != 0
    lines = [line for line in (run.stdout + run.stderr).splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert expected in lines[0]
    assert str(path) in lines[0] or "command line" in lines[0]


def test_plugin_is_found_from_a_built_wheel(tmp_path: Path) -> None:
    """A wheel carries twisted/plugins/dpatia_plugin.py and no twisted/__init__.py, and
    twistd finds the plugin when only the wheel's files (not the checkout) are importable."""
    import zipfile

    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        timeout=240,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("dpatia-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "twisted/plugins/dpatia_plugin.py" in names
    assert "twisted/__init__.py" not in names
    assert "twisted/plugins/__init__.py" not in names

    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)
    import twisted

    deps = str(Path(twisted.__file__).resolve().parent.parent)
    probe = (
        "from twisted.plugin import getPlugins; from twisted.application.service import IServiceMaker;"
        "import dpatia_daemon;"
        f"assert dpatia_daemon.__file__.startswith({str(target)!r}), dpatia_daemon.__file__;"
        "print(sorted(p.tapname for p in getPlugins(IServiceMaker)))"
    )
    run = subprocess.run(
        [sys.executable, "-S", "-c", probe],
        env={
            "PYTHONPATH": os.pathsep.join([str(target), deps]),
            "PATH": os.environ.get("PATH", ""),
        },
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert "'dpatia'" in run.stdout


def test_unusable_spool_stops_the_start_with_one_line(tmp_path: Path) -> None:
    """A spool directory that cannot be created ends the start: exit != 0, one clear
    line, no traceback, instead of a daemon that answers but cannot keep jobs."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    config = tmp_path / "dpatia.ini"
    config.write_text(
        f"[spool]\ndirectory = {blocker / 'spool'}\n[sps]\nallowed_callback_urls = http://127.0.0.1:*/\n"
    )
    run = subprocess.run(
        [
            sys.executable,
            *TWISTD,
            "--nodaemon",
            "--pidfile=",
            "dpatia",
            "--config",
            str(config),
            "--listen",
            "tcp:0:interface=127.0.0.1",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = run.stdout + run.stderr
    assert run.returncode != 0
    assert f"dpatia: cannot start: spool directory {blocker / 'spool'} is not usable" in output
    assert "Traceback" not in output
