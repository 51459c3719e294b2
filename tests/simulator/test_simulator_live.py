"""The simulator through real sockets: driving a real ``twistd dpatia`` child, a download
cut mid-way, the ``twistd dpatia-sps`` plugin with the command line, and the web page in
headless Chromium."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytest_twisted
import treq
from conftest import write_config
from PIL import Image
from twisted.internet.threads import deferToThread
from twisted.web.client import Agent, HTTPConnectionPool, ResponseFailed
from twisted.web.resource import Resource
from twisted.web.server import Site

from dpatia_daemon.models import result_from_json
from dpatia_daemon.simulator.daemon_process import DaemonProcess
from dpatia_daemon.simulator.driver import DriverError
from dpatia_daemon.simulator.fake import BASE_PATH
from dpatia_daemon.simulator.page import FRAME_COLOUR
from dpatia_daemon.simulator.process import simulator_process
from dpatia_daemon.simulator.server import SimulatorConfig, SimulatorService, start_simulator
from dpatia_daemon.simulator.slides import SlideSet
from dpatia_daemon.simulator.testing import SMALL_SCALE, small_slide_set

pytestmark = pytest.mark.integration

CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="session")
def slide_set(tmp_path_factory: pytest.TempPathFactory) -> SlideSet:
    """The small stock slides, generated once per session (later modules reuse them)."""
    return small_slide_set(tmp_path_factory.getbasetemp() / "sps-slides")


def config_for(slide_set: SlideSet, **kwargs: Any) -> SimulatorConfig:
    return SimulatorConfig(
        listen="tcp:0:interface=127.0.0.1",
        data=str(slide_set.directory),
        scale=SMALL_SCALE,
        **kwargs,
    )


@pytest.fixture
def daemon_config(tmp_path: Path) -> str:
    return write_config(tmp_path)


@pytest_twisted.ensureDeferred
async def test_driver_registers_creates_notifies_and_cancels_with_a_real_daemon(
    reactor: Any, slide_set: SlideSet, daemon_config: str, tmp_path: Path
) -> None:
    """Against ``twistd dpatia`` on loopback: register returns the registration, create
    stores a "Queued" result in the simulator, a notification is 200 {}, cancel is 200 []."""
    daemon = DaemonProcess(reactor=reactor, config=daemon_config, cwd=str(tmp_path))
    await daemon.start()
    sim: SimulatorService = await start_simulator(reactor, config_for(slide_set))
    try:
        assert sim.simulator is not None
        driver = sim.simulator.driver
        registration = await driver.register(daemon.url + "/dpatia")
        assert registration["applicationId"] == "dpatia"
        assert registration["url"] == daemon.url + "/dpatia"

        created = await driver.create("sim-colon-1")
        assert created.status == 200
        assert created.body["displayProperties"]["Status"] == "Queued"
        stored = sim.simulator.sps.results[created.body["id"]]
        assert stored.slideId == "sim-colon-1"
        assert stored.versionId is not None

        notified = await driver.notify("sim-breast-1")
        assert (notified.status, notified.body) == (200, {})

        cancelled = await driver.cancel("sim-colon-1")
        assert (cancelled.status, cancelled.body) == (200, [])
        assert [e.action for e in driver.events] == ["register", "create", "notify", "cancel"]
        assert driver.results("sim-colon-1")[0]["id"] == created.body["id"]
    finally:
        await sim.stopService()
        await daemon.kill(signal.SIGTERM)


@pytest_twisted.ensureDeferred
async def test_driver_reports_an_unreachable_app(reactor: Any, slide_set: SlideSet) -> None:
    """Registering with an app that is not listening raises DriverError and is logged."""
    sim = await start_simulator(reactor, config_for(slide_set))
    try:
        assert sim.simulator is not None
        with pytest.raises(DriverError):
            await sim.simulator.driver.register("http://127.0.0.1:1/dpatia")
        assert sim.simulator.driver.last_error is not None
    finally:
        await sim.stopService()


@pytest_twisted.ensureDeferred
async def test_app_url_registers_at_start_once_the_app_answers(
    reactor: Any, slide_set: SlideSet
) -> None:
    """With app_url set the simulator keeps trying to register until the app is up."""
    probe = reactor.listenTCP(0, Site(Resource()), interface="127.0.0.1")
    port = probe.getHost().port
    await probe.stopListening()  # a free port nobody listens on yet
    app = Resource()
    app.putChild(b"dpatia", _Registration(f"http://127.0.0.1:{port}/dpatia"))
    sim = await start_simulator(
        reactor,
        config_for(slide_set, app_url=f"http://127.0.0.1:{port}/dpatia", register_interval=0.1),
    )
    listening = None
    try:
        assert sim.simulator is not None
        driver = sim.simulator.driver
        # Two attempts fail while nothing listens: the second proves it keeps trying.
        for _ in range(2):
            await driver.next_event(lambda e: e.status is None).addTimeout(10, reactor)
        assert driver.registration is None
        registered = driver.next_event(lambda e: e.action == "register")
        listening = reactor.listenTCP(port, Site(app), interface="127.0.0.1")
        await registered.addTimeout(10, reactor)
        assert driver.registration == {
            "applicationId": "dpatia",
            "url": f"http://127.0.0.1:{port}/dpatia",
        }
    finally:
        await sim.stopService()
        if listening is not None:
            await listening.stopListening()


class _Registration(Resource):
    isLeaf = True

    def __init__(self, url: str) -> None:
        super().__init__()
        self.url = url

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"applicationId": "dpatia", "url": self.url}).encode()


@pytest_twisted.ensureDeferred
async def test_download_cut_mid_way_over_tcp(reactor: Any, slide_set: SlideSet) -> None:
    """--drop-download-after closes the TCP connection after that many body bytes; the
    client sees a short body and an error, and the next download (drop count 1) is whole."""
    sim = await start_simulator(
        reactor, config_for(slide_set, drop_after_bytes=300_000, drop_count=1)
    )
    pool = HTTPConnectionPool(reactor, persistent=False)
    client = treq.client.HTTPClient(Agent(reactor, pool=pool))
    try:
        assert sim.simulator is not None
        slide = next(s for s in slide_set.slides if s.layout == "single")
        size = slide_set.path(slide.tiff).stat().st_size
        token = sim.simulator.sps.issue_token()
        url = sim.callback_url + f"/slides/{slide.slide_id}/files"
        headers = {"Authorization": [f"Bearer {token}"]}
        response = await client.get(url, headers=headers, unbuffered=True)
        assert response.code == 200 and response.length == size
        received: list[bytes] = []
        with pytest.raises(ResponseFailed):
            await treq.collect(response, received.append)
        assert len(b"".join(received)) == 300_000
        again = await client.get(url, headers=headers)
        assert await again.content() == slide_set.path(slide.tiff).read_bytes()
    finally:
        await pool.closeCachedConnections()
        await sim.stopService()


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dpatia_daemon.simulator", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )


@pytest_twisted.ensureDeferred
async def test_twistd_plugin_and_command_line(
    reactor: Any, slide_set: SlideSet, tmp_path: Path
) -> None:
    """``twistd -n dpatia-sps`` starts the simulator and logs the callback URL and a token
    that works; the command line reads results, changes faults and writes an overlay PNG,
    and exits 1 when the app cannot be reached."""
    proc = simulator_process(
        reactor,
        str(slide_set.directory),
        ["--scale", str(SMALL_SCALE), "--token-lifetime", "300"],
        cwd=str(tmp_path),
    )
    await proc.start()
    try:
        output = bytes(proc.output).decode()
        assert f"callback base URL: {proc.url}{BASE_PATH}" in output
        token = output.split("token for manual calls (valid 300 s): ")[1].split()[0]
        response = await treq.get(
            proc.url + BASE_PATH + "/slides/sim-colon-1/info",
            headers={"Authorization": [f"Bearer {token}"]},
        )
        assert response.code == 200
        assert json.loads(await response.content())["id"] == "sim-colon-1"

        sps = ["--sps-url", proc.url]
        results = await deferToThread(run_cli, "results", *sps)
        assert results.returncode == 0, results.stderr
        faults = await deferToThread(run_cli, "faults", *sps, "--latency", "0.01")
        assert faults.returncode == 0 and json.loads(faults.stdout)["latency"] == 0.01
        png = tmp_path / "out" / "overlay.png"
        overlay = await deferToThread(run_cli, "overlay", "sim-colon-2", *sps, "--out", str(png))
        assert overlay.returncode == 0, overlay.stderr
        assert Image.open(png).size[0] == 512
        refused = await deferToThread(
            run_cli, "register", *sps, "--app-url", "http://127.0.0.1:1/x"
        )
        assert refused.returncode == 1 and "error" in refused.stdout + refused.stderr
    finally:
        await proc.kill(signal.SIGTERM)
    assert b"Traceback" not in proc.output


def frame_box(pixels: np.ndarray, colour: str) -> tuple[int, int, int, int]:
    """The bounding box (x0, y0, x1, y1) of the pixels of ``colour`` (±12 per channel)."""
    rgb = np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)])
    hits = np.all(np.abs(pixels[:, :, :3].astype(int) - rgb) <= 12, axis=2)
    ys, xs = np.nonzero(hits)
    assert len(xs), f"no {colour} pixels in the screenshot"
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


@pytest.mark.skipif(
    not CHROMIUM.exists(), reason="Debian's chromium is not installed (apt-get install -y chromium)"
)
@pytest_twisted.ensureDeferred
async def test_page_in_headless_chromium_draws_the_result_overlay(
    reactor: Any, slide_set: SlideSet, tmp_path: Path
) -> None:
    """The page shows the slide's thumbnail with the stored result drawn over it: a green
    filled polygon where its width-normalised coordinates put it, and the result text."""
    sim = await start_simulator(reactor, config_for(slide_set))
    try:
        assert sim.simulator is not None
        slide_id = "sim-colon-1"
        x0, x1, y0, y1 = 0.30, 0.60, 0.20, 0.45  # y is normalised by the width too
        square = [{"x": x, "y": y} for x, y in ((x0, y0), (x1, y0), (x1, y1), (x0, y1))]
        content = [
            {
                "style": {"strokeStyle": "#00C000", "fillStyle": "#00FF00", "size": 2},
                "polygons": [{"points": square}],
            },
            {
                "style": {"strokeStyle": "#FFFF00"},
                "labels": [{"location": {"x": 0.05, "y": 0.05}, "label": "Tumour 42 %"}],
            },
        ]
        sim.simulator.sps.store_result(
            "dpatia",
            result_from_json(
                {
                    "slideId": slide_id,
                    "displayResult": "Tissue: 1.23 mm²",
                    "displayProperties": {"Status": "Done"},
                    "data": {"result": {"type": "primitive", "content": content}},
                }
            ),
        )
        shot = tmp_path / "page.png"
        command = [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--force-device-scale-factor=1",
            f"--user-data-dir={tmp_path / 'chrome'}",
            "--virtual-time-budget=3000",
            f"--screenshot={shot}",
            "--window-size=900,800",
            sim.url + f"?slide={slide_id}",
        ]
        run = await deferToThread(subprocess.run, command, capture_output=True, timeout=90)
        assert shot.exists(), run.stderr.decode(errors="replace")[-2000:]
        pixels = np.asarray(Image.open(shot).convert("RGB"))
        fx0, fy0, fx1, fy1 = frame_box(pixels, FRAME_COLOUR)
        # The outline is 3 px outside the thumbnail, which is 512 px wide.
        left, top, width = fx0 + 3, fy0 + 3, fx1 - fx0 - 5
        assert abs(width - 512) <= 2
        green = (pixels[:, :, 1].astype(int) - np.maximum(pixels[:, :, 0], pixels[:, :, 2])) > 20
        inside = green[
            round(top + y0 * width) + 4 : round(top + y1 * width) - 4,
            round(left + x0 * width) + 4 : round(left + x1 * width) - 4,
        ]
        assert inside.mean() > 0.95
        ys, xs = np.nonzero(green[fy0:fy1, fx0:fx1])
        assert abs(fx0 + xs.min() - (left + x0 * width)) <= 4
        assert abs(fx0 + xs.max() - (left + x1 * width)) <= 4
        assert abs(fy0 + ys.min() - (top + y0 * width)) <= 4
        assert abs(fy0 + ys.max() - (top + y1 * width)) <= 4
        outside = green[top + 2 : round(top + y0 * width) - 6, left + 200 : left + 300]
        assert outside.mean() < 0.01
    finally:
        await sim.stopService()


@pytest_twisted.ensureDeferred
async def test_overlay_png_endpoint(reactor: Any, slide_set: SlideSet) -> None:
    """GET /ui/slides/{id}/overlay.png is the thumbnail with the result and a caption."""
    sim = await start_simulator(reactor, config_for(slide_set))
    try:
        assert sim.simulator is not None
        response = await treq.get(sim.url + "ui/slides/sim-breast-1/overlay.png")
        image = Image.open(io.BytesIO(await response.content()))
        assert response.code == 200 and image.format == "PNG"
        assert image.size[0] == round(512 * 5001 / 7003)
    finally:
        await sim.stopService()
