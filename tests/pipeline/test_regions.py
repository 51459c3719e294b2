"""job.read_region / job.tiles over the SPS's DZI tiles (pipeline/regions.py).

The reader runs against the in-memory simulator (tiles rendered from the generated
slide's pyramid, re-encoded as JPEG) and is compared with OpenSlide reading the same
region from the slide file: equal within JPEG tolerance.  A reactor whose
``callFromThread`` runs at once stands in for the worker's: every fetch then completes
in the calling thread, so no real reactor or thread is needed here (the benchmark and
the live test run the threaded path).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import openslide
import pytest
from PIL import Image
from treq.client import HTTPClient
from treq.testing import RequestTraversalAgent

from dpatia_daemon.analyses import AnalysisCancelled, AnalysisJob, NoPixels
from dpatia_daemon.jobs import Callback
from dpatia_daemon.pipeline.regions import RegionReader
from dpatia_daemon.simulator.server import Simulator
from dpatia_daemon.simulator.slides import SlideSet
from dpatia_daemon.simulator.testing import memory_simulator, small_slide_set
from dpatia_daemon.sps.client import SPSClient

SLIDE = "sim-colon-1"  # not tile-aligned, odd sizes


class _AtOnce:
    """``callFromThread`` runs the call at once (the fetch completes synchronously)."""

    def __init__(self, limit: int | None = None) -> None:
        self.calls = 0

    def callFromThread(self, f: Any, *args: Any) -> None:  # noqa: N802 - Twisted's name
        self.calls += 1
        f(*args)


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> SlideSet:
    return small_slide_set(tmp_path_factory.getbasetemp() / "sps-slides")


def _reader(slides: SlideSet, **kwargs: Any) -> tuple[Simulator, RegionReader]:
    simulator = memory_simulator(slides)
    sps = SPSClient(
        http=HTTPClient(RequestTraversalAgent(simulator.sps.resource())),
        clock=simulator.sps.clock,
        software_version="1",
        retries=0,
    )
    callback = Callback(simulator.driver.callback_url, simulator.sps.issue_token())
    reader = RegionReader(
        reactor=_AtOnce(),
        sps=sps,
        callback=callback,
        slide_id=SLIDE,
        info=simulator.sps.slides[SLIDE].info,
        **kwargs,
    )
    return simulator, reader


def _from_file(slides: SlideSet, x: int, y: int, w: int, h: int) -> np.ndarray:
    path: Path = slides.path(slides.get(SLIDE).tiff)
    with openslide.OpenSlide(str(path)) as slide:
        return np.asarray(slide.read_region((x, y), 0, (w, h)).convert("RGB")).astype(int)


def _close(a: np.ndarray, b: np.ndarray, mean: float = 4.0) -> None:
    assert a.shape == b.shape
    diff = np.abs(a.astype(int) - b.astype(int))
    assert diff.mean() < mean, diff.mean()


def test_a_full_resolution_region_equals_the_file_within_jpeg_tolerance(
    slides: SlideSet,
) -> None:
    """A region across tile borders, at the scan's resolution, matches OpenSlide's."""
    _, reader = _reader(slides)
    x, y, w, h = 200, 130, 700, 420
    got = reader.read_region(x, y, w, h)
    assert got.dtype == np.uint8 and got.shape == (h, w, 3)
    _close(got, _from_file(slides, x, y, w, h))
    assert reader.fetched == 4 * 3  # tiles of 256 px covering [200, 900) x [130, 550)


def test_a_coarser_resolution_reads_a_coarser_level(slides: SlideSet) -> None:
    """At 2x the scan's µm/px: level max-1 is read (a quarter of the tiles) and the
    answer matches the file's region box-downsampled by 2."""
    _, reader = _reader(slides)
    mpp = reader.dzi.microns_per_pixel
    assert mpp is not None
    got = reader.read_region(256, 256, 300, 200, resolution=2 * mpp)
    assert got.shape == (200, 300, 3)
    full = Image.fromarray(_from_file(slides, 256, 256, 600, 400).astype(np.uint8))
    expected = np.asarray(full.resize((300, 200), Image.Resampling.BOX))
    _close(got, expected)
    assert reader.fetched <= 4


def test_outside_the_slide_is_white(slides: SlideSet) -> None:
    """A region over the right edge: the part beyond the slide is white."""
    _, reader = _reader(slides)
    width = reader.dzi.width
    got = reader.read_region(width - 50, 0, 100, 60)
    assert (got[:, 60:] == 255).all()
    _close(got[:, :50], _from_file(slides, width - 50, 0, 50, 60))


def test_tiles_cover_the_level_once_with_bounded_fetches(slides: SlideSet) -> None:
    """The tile iterator yields every tile of the level once, decoded to its size."""
    _, reader = _reader(slides, concurrency=3)
    level = reader.level_for(8 * (reader.dzi.microns_per_pixel or 1))
    seen = {(t.col, t.row): t for t in reader.tiles(8 * (reader.dzi.microns_per_pixel or 1))}
    assert set(seen) == {(c, r) for c, r, _ in reader.dzi.tiles(level)}
    for tile in seen.values():
        assert tile.image.shape == (tile.rect.height, tile.rect.width, 3)


def test_focal_plane_and_optical_path_reach_the_tile_url(slides: SlideSet) -> None:
    """focal_plane/optical_path name the tile's focal plane suffix and opticalPath."""
    simulator, reader = _reader(slides)
    reader.read_region(0, 0, 10, 10, focal_plane="0", optical_path="0")
    [request] = [r for r in simulator.sps.requests if "_files/" in r.path]
    assert request.path.endswith("/0_0_0.jpg")
    assert request.query.get("opticalPath") == ["0"]


def test_a_missing_tile_is_an_error_and_cancellation_stops_the_read(slides: SlideSet) -> None:
    """Through AnalysisJob: a tile the SPS refuses is NoPixels; a cancelled job's read
    raises AnalysisCancelled; a job without tile access says so."""
    simulator, reader = _reader(slides)
    job = AnalysisJob(job_id="j", slide_id=SLIDE, input={}, work_dir=".", pixels=reader)
    simulator.sps.fail_next = [404]
    with pytest.raises(NoPixels, match="could not be had"):
        job.read_region(0, 0, 10, 10)
    cancelled = AnalysisJob(
        job_id="j", slide_id=SLIDE, input={}, work_dir=".", pixels=reader, cancelled=lambda: True
    )
    reader.cancelled = lambda: True
    with pytest.raises(AnalysisCancelled):
        cancelled.read_region(0, 0, 600, 10)
    with pytest.raises(NoPixels):
        AnalysisJob(job_id="j", slide_id=SLIDE, input={}, work_dir=".").read_region(0, 0, 1, 1)
    assert job.case_images() == []
