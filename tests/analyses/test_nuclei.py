"""The ``nuclei`` analysis against the simulator's slides, whose nuclei are counted."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw
from skimage.color import rgb2hed

from dpatia_daemon.analyses import AnalysisCancelled, AnalysisJob, NoSlideFile
from dpatia_daemon.analyses.loader import load_analysis
from dpatia_daemon.analyses.nuclei import NucleiSettings, analyse, detect_nuclei, haematoxylin
from dpatia_daemon.analyses.nuclei.tiles import _bounded_map
from dpatia_daemon.cli import main
from dpatia_daemon.simulator.slides import GeneratedSlide, SlideSet
from dpatia_daemon.simulator.testing import small_slide_set, small_specs

SLIDE_IDS = [spec.slide_id for spec in small_specs()]


@pytest.fixture(scope="module")
def slide_set(tmp_path_factory: pytest.TempPathFactory) -> SlideSet:
    """The small stock slides, generated once (shared with other modules)."""
    return small_slide_set(tmp_path_factory.getbasetemp() / "sps-slides")


def _job(
    slide_set: SlideSet,
    slide: GeneratedSlide,
    progress: list[tuple[int, str]] | None = None,
    **settings: str,
) -> AnalysisJob:
    reports = progress if progress is not None else []
    return AnalysisJob(
        job_id="job-1",
        slide_id=slide.slide_id,
        input={"type": "wholeSlide"},
        work_dir="/nonexistent",
        slide_info=slide.info,
        settings=settings,
        progress=lambda percent, text: reports.append((percent, text)),
        files=(str(slide_set.path(slide.tiff)),),
    )


@pytest.mark.parametrize("slide_id", SLIDE_IDS)
def test_counts_the_painted_nuclei_of_every_slide(slide_set: SlideSet, slide_id: str) -> None:
    """The count is within 10 % of the ground truth (H&E and Ki-67), and the density is
    the count over the tissue area."""
    slide = slide_set.get(slide_id)
    result = analyse(_job(slide_set, slide))
    truth = slide.truth["nuclei"]
    count = result.display_properties["Nuclei"]
    assert isinstance(count, int)
    assert truth > 50
    assert abs(count - truth) <= 0.1 * truth
    context = result.context["nuclei"]
    assert context["perMm2"] == pytest.approx(count / context["tissueAreaMm2"])
    assert context["tissueAreaMm2"] == pytest.approx(slide.truth["tissueAreaMm2"], rel=0.05)


def test_small_tiles_in_threads_find_the_same_nuclei(slide_set: SlideSet) -> None:
    """Tile edges neither lose nor double nuclei, and threads change nothing; progress
    is reported per tile."""
    slide = slide_set.get(SLIDE_IDS[0])
    whole = analyse(_job(slide_set, slide))
    progress: list[tuple[int, str]] = []
    tiled = analyse(_job(slide_set, slide, progress, tile_px="128", cpu_threads="2"))
    assert tiled.display_properties["Nuclei"] == whole.display_properties["Nuclei"]
    assert tiled.display_properties["Threads"] == 2
    tile_reports = [p for p, text in progress if "of the tiles" in text]
    done, total = str(tiled.display_properties["Tiles analysed"]).split(" of ")
    assert len(tile_reports) == int(done) > 10
    assert int(total) > int(done)  # tiles off the tissue are skipped
    assert tile_reports == sorted(tile_reports)


def test_cancellation_between_tiles(slide_set: SlideSet) -> None:
    """Once cancelled, no further tile is started and the analysis stops."""
    slide = slide_set.get(SLIDE_IDS[0])
    progress: list[tuple[int, str]] = []
    job = _job(slide_set, slide, progress, tile_px="128")
    job = AnalysisJob(
        **{
            **{f: getattr(job, f) for f in ("job_id", "slide_id", "input", "work_dir")},
            "slide_info": job.slide_info,
            "settings": job.settings,
            "files": job.files,
            "progress": job.progress,
            "cancelled": lambda: sum("of the tiles" in t for _, t in progress) >= 3,
        },
    )
    with pytest.raises(AnalysisCancelled):
        analyse(job)
    # At most the tiles in flight (2 × 1 thread) finish after the cancellation.
    assert sum("of the tiles" in t for _, t in progress) <= 3 + 2


def test_at_most_twice_the_threads_tiles_are_in_flight() -> None:
    """Tiles are submitted as others finish: memory is bounded by a few tiles."""
    submitted: list[int] = []
    ahead = []
    results = _bounded_map(
        lambda item: np.zeros((2, 1), np.float32),
        [(i, 0) for i in range(40)],
        3,
        lambda: submitted.append(1),
    )
    for consumed, _ in enumerate(results):
        ahead.append(len(submitted) - consumed)
    assert len(ahead) == len(submitted) == 40
    assert max(ahead) == 6  # 2 × 3 threads, no more


def test_haematoxylin_is_rgb2hed_and_touching_nuclei_are_split() -> None:
    """H is skimage's first deconvolution channel; two overlapping nuclei count two,
    a speck counts none."""
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert haematoxylin(rgb) == pytest.approx(rgb2hed(rgb)[..., 0].astype(np.float32), abs=1e-5)
    image = Image.new("RGB", (120, 80), (230, 170, 210))
    draw = ImageDraw.Draw(image)
    draw.ellipse((20, 20, 36, 36), fill=(88, 50, 138))  # two touching, 8 px radius
    draw.ellipse((33, 20, 49, 36), fill=(88, 50, 138))
    draw.ellipse((80, 40, 96, 56), fill=(88, 50, 138))  # one alone
    draw.ellipse((60, 10, 61, 11), fill=(88, 50, 138))  # a speck
    centres = detect_nuclei(np.asarray(image), 0.5, NucleiSettings())
    assert len(centres) == 3
    assert sorted(round(c) for c in centres[:, 1]) == pytest.approx([28, 41, 88], abs=2)


def test_the_point_cap_draws_an_even_sample(slide_set: SlideSet) -> None:
    """Over max_points, fewer diamonds are drawn, the count still covers all, and the
    result says so."""
    slide = slide_set.get(SLIDE_IDS[0])
    result = analyse(_job(slide_set, slide, max_points="1000"))
    points = sum(len(p.points) for i in result.items for p in i.polygons)
    assert points <= 1000
    count = result.display_properties["Nuclei"]
    drawn = result.context["nuclei"]["drawn"]
    assert 0 < drawn < count
    assert result.display_properties["Nuclei drawn"] == f"{drawn} of {count} (an even sample)"


def test_each_nucleus_is_a_diamond_around_its_centre_in_short_numbers() -> None:
    """to_result draws a closed diamond of MARKER_UM around each centre, its corners
    rounded to COORDINATE_DIGITS decimals (short JSON numbers)."""
    from dpatia_daemon.analyses.nuclei.analysis import COORDINATE_DIGITS, MARKER_UM, to_result
    from dpatia_daemon.analyses.nuclei.tiles import NucleiCount
    from dpatia_daemon.analyses.tissue.detection import TissueFindings

    centres = np.array([[1234.567, 2000.25], [98765.4321, 3.0]], dtype=np.float32)
    counted = NucleiCount(x=centres[:, 0], y=centres[:, 1], tiles=1, tiles_in_grid=1, mpp=0.5)
    findings = TissueFindings(
        regions=[],
        tissue_pixels=1,
        tissue_area_mm2=1.0,
        tissue_fraction=0.1,
        analysis_mpp=8.0,
        threshold=0.1,
        tolerance_px=1.0,
        points=0,
    )
    width, mpp = 100_000, 0.25
    result = to_result(counted, findings, NucleiSettings(), image_width=width, mpp=mpp)
    (shapes,) = result.items
    half = MARKER_UM / mpp / width
    for (cx, cy), polygon in zip(centres.astype(float) / width, shapes.polygons, strict=True):
        corners = [(p.x, p.y) for p in polygon.points]
        expected = [(cx, cy - half), (cx + half, cy), (cx, cy + half), (cx - half, cy)]
        assert corners[0] == corners[-1]
        assert np.allclose(corners[:4], expected, rtol=0, atol=10**-COORDINATE_DIGITS)
        for x, y in corners:
            assert round(x, COORDINATE_DIGITS) == x and round(y, COORDINATE_DIGITS) == y


def test_without_the_slide_file_it_says_what_to_turn_on() -> None:
    """No WSI: a clear error naming [pipeline] download_wsi."""
    job = AnalysisJob(job_id="j", slide_id="s", input={"type": "wholeSlide"}, work_dir="/x")
    with pytest.raises(NoSlideFile, match="download_wsi"):
        analyse(job)


def test_settings_and_threads() -> None:
    """Defaults, bounds, and cpu_threads = 0 following [workers] cpu_threads' variable."""
    assert NucleiSettings.from_mapping({}) == NucleiSettings()
    assert NucleiSettings.from_mapping(NucleiSettings().to_mapping()) == NucleiSettings()
    with pytest.raises(ValueError, match="tile_px"):
        NucleiSettings.from_mapping({"tile_px": "10"})
    with pytest.raises(ValueError, match="min_area_um2"):
        NucleiSettings.from_mapping({"min_area_um2": "500"})
    assert NucleiSettings().threads({}) == 1
    assert NucleiSettings().threads({"OMP_NUM_THREADS": "3"}) == 3
    assert NucleiSettings(cpu_threads=2).threads({"OMP_NUM_THREADS": "3"}) == 2


def test_the_loader_and_the_command_line_find_it(slide_set: SlideSet, tmp_path: Path) -> None:
    """``nuclei`` is a built-in name; ``dpatia analyse --analysis nuclei`` writes its
    result with the nuclei drawn."""
    assert load_analysis("nuclei") is analyse
    slide = slide_set.get(SLIDE_IDS[2])
    out = io.StringIO()
    status = main(
        [
            "analyse",
            str(slide_set.path(slide.tiff)),
            "--analysis",
            "nuclei",
            "--out",
            str(tmp_path),
        ],
        out=out,
    )
    assert status == 0, out.getvalue()
    result = json.loads((tmp_path / f"{slide.slide_id}.result.json").read_text())
    assert result["displayProperties"]["Nuclei"] == pytest.approx(slide.truth["nuclei"], rel=0.1)
    assert "Counting nuclei" in out.getvalue()
