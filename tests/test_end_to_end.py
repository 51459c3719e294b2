"""The whole product through real sockets: the SPS simulator in this process, the daemon
as a real ``twistd dpatia`` child on the shipped config, real workers running the
tissue analysis on generated slides, and the final results checked against the
simulator's ground truth."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import pytest
import pytest_twisted
from PIL import Image, ImageDraw

from dpatia_daemon.models import Result
from dpatia_daemon.simulator.daemon_process import DaemonProcess
from dpatia_daemon.simulator.server import SimulatorConfig, start_simulator
from dpatia_daemon.sps.results import Status, frame_status

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
FINAL = {Status.DONE, Status.FAILED, Status.CANCELLED}


async def wait_final(reactor: Any, simulator: Any, slide_id: str, timeout: float) -> Result:
    """The slide's result once it is final (bounded: fails after ``timeout`` s)."""
    seen: list[str] = []

    def final(result: Result) -> bool:
        if result.slideId != slide_id:
            return False
        if not seen or seen[-1] != result.displayResult:
            seen.append(result.displayResult)
        return frame_status(result) in FINAL

    current = simulator.latest_result(slide_id)
    if current is not None and final(current):
        return current  # type: ignore[no-any-return]

    def expired(result: object, timeout: float) -> NoReturn:
        raise AssertionError(f"{slide_id}: no final result within {timeout} s; saw {seen}")

    stored: Result = await simulator.sps.next_stored(final).addTimeout(
        timeout, reactor, onTimeoutCancel=expired
    )
    return stored


def polygons_of(result: Result) -> list[list[tuple[float, float]]]:
    assert result.data.result is not None and result.data.result.type == "primitive"
    return [
        [(p["x"], p["y"]) for p in polygon["points"]]
        for item in result.data.result.content
        for polygon in item["polygons"]
    ]


def raster(polygon: list[tuple[float, float]], scale: float, size: tuple[int, int]) -> np.ndarray:
    image = Image.new("L", size, 0)
    ImageDraw.Draw(image).polygon([(x * scale, y * scale) for x, y in polygon], fill=255)
    return np.asarray(image) > 0


@pytest_twisted.ensureDeferred
async def test_tissue_analysis_end_to_end_matches_the_known_tissue(
    reactor: Any, tmp_path: Path
) -> None:
    """A manual create and an image notification on generated slides: both end Done,
    one result per slide, tissue area within 5 % of the truth, one outline per blob,
    each blob covered (IoU >= 0.8), every point inside the slide."""
    sim = await start_simulator(
        reactor,
        SimulatorConfig(listen="tcp:0:interface=127.0.0.1", data=str(tmp_path / "sps"), scale=0.25),
    )
    daemon = DaemonProcess(
        reactor=reactor,
        config=str(ROOT / "etc" / "dpatia.ini"),
        args=["--spool", str(tmp_path / "spool")],
        cwd=str(tmp_path),
    )
    await daemon.start()
    try:
        simulator = sim.simulator
        registration = await simulator.driver.register(daemon.url + "/dpatia")
        assert registration["applicationId"] == "dpatia"
        await simulator.driver.create("sim-colon-1")
        await simulator.driver.notify("sim-breast-1")
        results = {
            slide: await wait_final(reactor, simulator, slide, timeout=90)
            for slide in ("sim-colon-1", "sim-breast-1")
        }
    finally:
        await daemon.kill(signal.SIGTERM)
        await sim.stopService()

    slide_set = simulator.slide_set
    for slide_id, result in results.items():
        assert frame_status(result) is Status.DONE, result.displayProperties
        assert len(simulator.sps.results_for(slide_id)) == 1
        truth = slide_set.get(slide_id).truth
        width, height = truth["imageSize"]["width"], truth["imageSize"]["height"]
        context = result.data.context or {}
        assert context["tissue"]["areaMm2"] == pytest.approx(truth["tissueAreaMm2"], rel=0.05)
        assert result.displayProperties["Fragments"] == len(truth["regions"])
        polygons = polygons_of(result)
        assert len(polygons) == len(truth["regions"])
        for polygon in polygons:
            assert all(0 <= x <= 1 and 0 <= y <= height / width for x, y in polygon)
        mask = Image.open(slide_set.path(truth["mask"]["path"]))
        scale = width / truth["mask"]["downsample"]
        detected = [raster(p, scale, mask.size) for p in polygons]
        for region in truth["regions"]:
            blob = raster([(p["x"], p["y"]) for p in region["points"]], scale, mask.size)
            best = max(float((blob & d).sum() / max(1, (blob | d).sum())) for d in detected)
            assert best >= 0.8, (slide_id, best)
    assert b"Traceback" not in daemon.output
