"""The ``tissue`` analysis against the simulator's slides, whose tissue is known exactly."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import openslide
import pytest
from attrs import frozen
from PIL import Image, ImageDraw

from dpatia_daemon.analyses import AnalysisCancelled, AnalysisJob, AnalysisResult
from dpatia_daemon.analyses.tissue import (
    STROKE,
    TissueSettings,
    analyse,
    detect_tissue,
    to_result,
)
from dpatia_daemon.simulator.slides import GeneratedSlide, SlideSet
from dpatia_daemon.simulator.testing import small_slide_set, small_specs

#: Every stock slide: H&E (pink/purple) and Ki-67 (blue-grey, barely saturated).
SLIDE_IDS = [spec.slide_id for spec in small_specs()]
assert {spec.stain for spec in small_specs()} >= {"H&E", "Ki-67"}


@pytest.fixture(scope="module")
def slide_set(tmp_path_factory: pytest.TempPathFactory) -> SlideSet:
    """The small stock slides (two H&E, one Ki-67), generated once (shared with other
    modules that use the same directory)."""
    return small_slide_set(tmp_path_factory.getbasetemp() / "sps-slides")


@frozen
class _Job(AnalysisJob):
    """An AnalysisJob with the pipeline's two extras (looked up with getattr)."""

    thumbnail_path: str | None = None
    open_slide: Callable[[], Any] | None = None


def _job(
    slide: GeneratedSlide | None = None,
    *,
    settings: dict[str, str] | None = None,
    progress: list[tuple[int, str]] | None = None,
    cancelled: Callable[[], bool] = lambda: False,
    **extra: Any,
) -> _Job:
    reports = progress if progress is not None else []
    return _Job(
        job_id="job-1",
        slide_id=slide.slide_id if slide else "blank",
        input={"type": "wholeSlide"},
        work_dir="/nonexistent",
        slide_info=slide.info if slide else None,
        settings=settings or {},
        progress=lambda percent, text: reports.append((percent, text)),
        cancelled=cancelled,
        **extra,
    )


def _opener(path: Path) -> Callable[[], openslide.OpenSlide]:
    return lambda: openslide.OpenSlide(str(path))


def _thumbnail(slide_set: SlideSet, slide: GeneratedSlide, directory: Path) -> Path:
    """A ~16 µm/px PNG thumbnail of the slide (0.5 µm/px ÷ 32), as the pipeline makes one."""
    with openslide.OpenSlide(str(slide_set.path(slide.tiff))) as osr:
        level = len(osr.level_dimensions) - 1
        image = osr.read_region((0, 0), level, osr.level_dimensions[level]).convert("RGB")
        image = image.reduce(round(32 / osr.level_downsamples[level]))
    path = directory / f"{slide.slide_id}-thumbnail.png"
    image.save(path)
    return path


def _polygons(result: AnalysisResult) -> list[list[tuple[float, float]]]:
    return [[(p.x, p.y) for p in polygon.points] for it in result.items for polygon in it.polygons]


def _raster(polygon: list[tuple[float, float]], scale: float, size: tuple[int, int]) -> np.ndarray:
    """A width-normalised polygon filled at the mask's resolution: ``scale`` is the
    slide width over the mask's downsample, ``size`` the mask's size."""
    image = Image.new("L", size, 0)
    ImageDraw.Draw(image).polygon([(x * scale, y * scale) for x, y in polygon], fill=255)
    return np.asarray(image) > 0


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def _area(result: AnalysisResult) -> float:
    return float(result.context["tissue"]["areaMm2"])


@pytest.mark.parametrize("slide_id", SLIDE_IDS)
def test_finds_the_known_tissue_of_every_slide(slide_set: SlideSet, slide_id: str) -> None:
    """Through OpenSlide: area within 5 %, one fragment per blob, each blob outlined
    (IoU ≥ 0.8 at the mask's resolution), every point inside the slide."""
    slide = slide_set.get(slide_id)
    truth = slide.truth
    width, height = truth["imageSize"]["width"], truth["imageSize"]["height"]
    result = analyse(_job(slide, open_slide=_opener(slide_set.path(slide.tiff))))

    assert _area(result) == pytest.approx(truth["tissueAreaMm2"], rel=0.05)
    assert result.display_properties["Fragments"] == len(truth["regions"])
    assert result.display_properties["Analysed image"].startswith("WSI level")
    polygons = _polygons(result)
    assert len(polygons) == len(truth["regions"])  # no holes in the blobs
    for polygon in polygons:
        assert all(0 <= x <= 1 and 0 <= y <= height / width for x, y in polygon)
        assert polygon[0] == polygon[-1]

    mask_image = Image.open(slide_set.path(truth["mask"]["path"]))
    size, scale = mask_image.size, width / truth["mask"]["downsample"]
    detected = [_raster(p, scale, size) for p in polygons]
    for region in truth["regions"]:
        known = _raster([(p["x"], p["y"]) for p in region["points"]], scale, size)
        assert max(_iou(known, d) for d in detected) >= 0.8
    union = np.logical_or.reduce(detected)
    assert _iou(union, np.asarray(mask_image) > 0) >= 0.9


@pytest.mark.parametrize("slide_id", SLIDE_IDS)
def test_finds_the_tissue_on_a_16_um_thumbnail(
    slide_set: SlideSet, slide_id: str, tmp_path: Path
) -> None:
    """Without a WSI, the ~16 µm/px thumbnail gives the area within 5 % and the fragments."""
    slide = slide_set.get(slide_id)
    thumbnail = _thumbnail(slide_set, slide, tmp_path)
    result = analyse(_job(slide, thumbnail_path=str(thumbnail)))
    assert _area(result) == pytest.approx(slide.truth["tissueAreaMm2"], rel=0.05)
    assert result.display_properties["Fragments"] == len(slide.truth["regions"])
    assert result.display_properties["Analysed image"] == "thumbnail"
    assert float(result.display_properties["Analysed at (µm/px)"]) == pytest.approx(16, rel=0.02)


def test_result_shape(slide_set: SlideSet) -> None:
    """One outline item in the tissue colour with no fill, a label per fragment, and the
    summary text and properties."""
    slide = slide_set.get("sim-colon-2")
    result = analyse(_job(slide, open_slide=_opener(slide_set.path(slide.tiff))))
    assert len(result.items) == 1
    (outlines,) = result.items
    assert outlines.style.strokeStyle == STROKE
    assert outlines.style.fillStyle is None
    assert len(outlines.labels) == 4
    assert all(label.label.endswith(" mm²") for label in outlines.labels)
    assert result.display_result.startswith("Tissue: 0.1")
    assert result.display_result.endswith(" mm² in 4 fragments")
    assert set(result.display_properties) >= {"Tissue area (mm²)", "Fragments", "Tissue fraction"}
    assert result.display_properties["Tissue fraction"].endswith(" %")
    assert result.to_result(slide.slide_id).data.result.type == "primitive"


def test_prefers_the_wsi_and_falls_back_to_the_thumbnail(
    slide_set: SlideSet, tmp_path: Path
) -> None:
    """With both, the WSI is read; a WSI that cannot be opened leaves the thumbnail."""
    slide = slide_set.get("sim-colon-1")
    thumbnail = str(_thumbnail(slide_set, slide, tmp_path))
    both = analyse(
        _job(slide, thumbnail_path=thumbnail, open_slide=_opener(slide_set.path(slide.tiff)))
    )
    assert both.display_properties["Analysed image"].startswith("WSI level")

    def no_wsi() -> Any:
        raise FileNotFoundError("no WSI was downloaded")

    fallback = analyse(_job(slide, thumbnail_path=thumbnail, open_slide=no_wsi))
    assert fallback.display_properties["Analysed image"] == "thumbnail"


def test_nothing_to_analyse_is_a_clear_error() -> None:
    """No thumbnail and no WSI: an exception that says so (and why there is no WSI)."""

    def no_wsi() -> Any:
        raise FileNotFoundError("no WSI was downloaded")

    with pytest.raises(LookupError, match="no thumbnail and no WSI to analyse"):
        analyse(_job(open_slide=no_wsi))
    with pytest.raises(LookupError, match="no thumbnail and no WSI to analyse"):
        analyse(_job())


@pytest.mark.parametrize("colour", [(255, 255, 255), (243, 243, 241)])
def test_a_slide_without_tissue(tmp_path: Path, colour: tuple[int, int, int]) -> None:
    """White or noisy glass: no fragments and "No tissue found", not an exception."""
    rng = np.random.default_rng(7)
    noise = rng.normal(0, 2.5, (600, 900, 3))
    pixels = np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)
    findings = detect_tissue(pixels, downsample=16, mpp=0.5, image_width=900 * 16)
    assert findings.fragments == 0
    assert findings.tissue_area_mm2 == 0

    path = tmp_path / "blank.jpg"
    Image.fromarray(pixels).save(path, quality=85)
    job = _job(thumbnail_path=str(path))
    result = analyse(job)
    assert result.display_result == "No tissue found"
    assert result.display_properties["Fragments"] == 0
    assert result.items == []


def test_cancellation_is_honoured(slide_set: SlideSet) -> None:
    """Cancelled before it starts or while reading the slide: AnalysisCancelled, no result."""
    slide = slide_set.get("sim-breast-1")
    opener = _opener(slide_set.path(slide.tiff))
    with pytest.raises(AnalysisCancelled):
        analyse(_job(slide, open_slide=opener, cancelled=lambda: True))

    reports: list[tuple[int, str]] = []
    with pytest.raises(AnalysisCancelled):
        analyse(
            _job(slide, open_slide=opener, progress=reports, cancelled=lambda: len(reports) > 1)
        )
    assert reports and all(text == "Reading the slide" for _, text in reports)


def _noisy(seed: int = 3, size: int = 1200) -> np.ndarray:
    """Ragged tissue: smooth noise plus pixel noise, thresholded; lots of boundary."""
    rng = np.random.default_rng(seed)
    coarse = (rng.random((size // 40, size // 40)) * 255).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC))
    tissue = smooth + rng.normal(0, 60, (size, size)) > 150
    pixels = np.full((size, size, 3), 243, np.uint8)
    pixels[tissue] = (190, 120, 170)
    return pixels


def test_point_cap_is_honoured_on_a_noisy_image() -> None:
    """Simplification coarsens until all outlines fit in max_points; areas do not change."""
    pixels = _noisy()
    uncapped = TissueSettings(max_points=10**9, min_area_mm2=0.001)
    capped = TissueSettings(max_points=2000, min_area_mm2=0.001)
    fine = detect_tissue(pixels, downsample=1, mpp=1.0, image_width=1200, settings=uncapped)
    coarse = detect_tissue(pixels, downsample=1, mpp=1.0, image_width=1200, settings=capped)
    assert fine.points > 4 * 2000
    assert coarse.points <= 2000
    assert coarse.points == sum(len(r.outline) + sum(map(len, r.holes)) for r in coarse.regions)
    assert coarse.tolerance_px > capped.simplify_px
    assert coarse.outlines_omitted == 0
    assert coarse.tissue_pixels == fine.tissue_pixels
    assert coarse.fragments == fine.fragments


def test_point_cap_omits_the_smallest_outlines_as_a_last_resort() -> None:
    """When even the coarsest simplification is too much, the smallest fragments lose
    their outlines first; their area still counts."""
    pixels = np.full((1000, 1000, 3), 255, np.uint8)
    for i in range(100):  # 100 squares, the first ones largest
        row, col = divmod(i, 10)
        side = 60 - i // 4
        pixels[row * 100 + 10 : row * 100 + 10 + side, col * 100 + 10 : col * 100 + 10 + side] = 120
    findings = detect_tissue(
        pixels,
        downsample=1,
        mpp=1.0,
        image_width=1000,
        settings=TissueSettings(max_points=100, min_area_mm2=0),
    )
    assert findings.fragments == 100
    assert findings.points <= 100
    assert 0 < findings.outlines_omitted < 100
    outlined = [r for r in findings.regions if r.outline]
    assert min(r.pixels for r in outlined) >= max(
        r.pixels for r in findings.regions if not r.outline
    )
    # (the blur rounds each square's corners a little)
    assert findings.tissue_pixels == pytest.approx(int((pixels[..., 0] == 120).sum()), rel=0.01)
    properties = to_result(findings, "test").display_properties
    assert properties["Fragments not outlined"] == findings.outlines_omitted


def test_specks_dropped_small_holes_filled_large_holes_kept() -> None:
    """Below min_area_mm2 a region is a speck; below min_hole_mm2 a hole is filled; a
    larger hole is outlined and left out of the area."""
    pixels = np.full((400, 400, 3), 245, np.uint8)
    pixels[50:350, 50:350] = (200, 130, 180)  # 300² px tissue...
    pixels[100:200, 100:200] = 245  # ...with a 100² hole (kept)...
    pixels[260:263, 260:263] = 245  # ...and a 3² one (filled)
    pixels[10:14, 380:384] = (200, 130, 180)  # a 4² speck
    # 1 px = 10 µm: 0.0001 mm²; holes < 0.01 mm² (100 px) are filled, specks < 0.005 dropped
    settings = TissueSettings(min_area_mm2=0.005, min_hole_mm2=0.01)
    findings = detect_tissue(pixels, downsample=1, mpp=10.0, image_width=400, settings=settings)
    assert findings.fragments == 1
    (region,) = findings.regions
    assert len(region.holes) == 1
    assert region.pixels == pytest.approx(300**2 - 100**2, rel=0.01)
    assert region.area_mm2 == pytest.approx((300**2 - 100**2) * 1e-4, rel=0.01)
    assert region.polygon_area_mm2 == pytest.approx(region.area_mm2, rel=0.02)
    xs = [x for x, _ in region.holes[0]]
    assert min(xs) == pytest.approx(100 / 400, abs=0.01)
    assert max(xs) == pytest.approx(200 / 400, abs=0.01)


def test_coordinates_follow_the_downsample_per_axis() -> None:
    """A rectangle at analysis pixels maps to level 0 by (sx, sy), normalised by width."""
    pixels = np.full((100, 200, 3), 250, np.uint8)
    pixels[20:60, 40:120] = (150, 100, 160)
    findings = detect_tissue(
        pixels, downsample=(10.0, 10.5), mpp=0.5, image_width=2000, settings=TissueSettings()
    )
    (region,) = findings.regions
    xs, ys = zip(*region.outline, strict=True)
    assert min(xs) == pytest.approx(400 / 2000, abs=1e-3)
    assert max(xs) == pytest.approx(1200 / 2000, abs=1e-3)
    assert min(ys) == pytest.approx(20 * 10.5 / 2000, abs=1e-3)
    assert max(ys) == pytest.approx(60 * 10.5 / 2000, abs=1e-3)
    assert region.area_mm2 == pytest.approx(40 * 80 * 10 * 10.5 * 0.25e-6, rel=0.01)
    assert findings.analysis_mpp == pytest.approx(0.5 * math.sqrt(105))


def test_transparent_pixels_are_glass_and_grey_is_accepted() -> None:
    """RGBA: transparent is white (outside the scan); a grey image works too."""
    rgba = np.zeros((100, 100, 4), np.uint8)
    rgba[30:70, 30:70] = (120, 80, 140, 255)
    findings = detect_tissue(rgba, downsample=1, mpp=None, image_width=100)
    assert findings.fragments == 1
    assert findings.tissue_area_mm2 is None
    assert findings.tissue_fraction == pytest.approx(0.16, rel=0.02)
    grey = np.full((100, 100), 240, np.uint8)
    grey[10:40, 10:40] = 150
    assert detect_tissue(grey, downsample=1, mpp=None, image_width=100).fragments == 1


def test_without_a_pixel_size_the_fraction_is_reported(tmp_path: Path) -> None:
    """A thumbnail with no slide info: outlines and fraction, area "unknown"."""
    pixels = np.full((300, 400, 3), 245, np.uint8)
    pixels[100:200, 100:300] = (200, 130, 180)
    path = tmp_path / "thumb.png"
    Image.fromarray(pixels).save(path)
    result = analyse(_job(thumbnail_path=str(path)))
    assert result.display_result == "Tissue: 16.7 % of the slide in 1 fragment"
    assert result.display_properties["Tissue area (mm²)"] == "unknown (no pixel size)"
    ((x0, y0), *_), *_ = _polygons(result)
    assert 0 <= x0 <= 1 and 0 <= y0 <= 0.75


def test_settings_parse_defaults_and_reject_bad_values() -> None:
    """Strings from the config; blanks mean the default; a bad value names its key."""
    assert TissueSettings.from_mapping({}) == TissueSettings()
    assert TissueSettings.from_mapping(None) == TissueSettings()
    parsed = TissueSettings.from_mapping(
        {"min_area_mm2": " 0.05 ", "target_mpp": "16", "max_points": "5000", "min_od": ""}
    )
    assert parsed == TissueSettings(min_area_mm2=0.05, target_mpp=16.0, max_points=5000)
    for key, value in [
        ("min_area_mm2", "lots"),
        ("target_mpp", "0"),
        ("max_points", "2.5"),
        ("min_hole_mm2", "-1"),
        ("simplify_px", "nan"),
    ]:
        with pytest.raises(ValueError, match=rf"\[tissue\] {key}"):
            TissueSettings.from_mapping({key: value})
    with pytest.raises(ValueError, match="min_side"):
        TissueSettings.from_mapping({"min_side": "4000", "max_side": "2000"})


def test_a_bad_setting_fails_the_attempt_with_its_key() -> None:
    """The analysis raises before reading anything when its settings are wrong."""
    with pytest.raises(ValueError, match="max_points"):
        analyse(_job(settings={"max_points": "many"}))


class _FakeSlide:
    """An OpenSlide stand-in: one level, a pixel size, transparent outside the scan."""

    def __init__(self, rgba: np.ndarray, mpp: float) -> None:
        self._image = Image.fromarray(rgba, "RGBA")
        self.dimensions = self._image.size
        self.level_dimensions = [self._image.size]
        self.level_downsamples = [1.0]
        self.properties = {"openslide.mpp-x": str(mpp), "openslide.mpp-y": str(mpp)}
        self.reads = 0
        self.closed = False

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> Any:
        self.reads += 1
        x, y = location
        return self._image.crop((x, y, x + size[0], y + size[1]))

    def close(self) -> None:
        self.closed = True


def test_reads_a_single_level_slide_in_reduced_chunks() -> None:
    """A slide with no pyramid is read chunk by chunk and reduced; transparent pixels
    (outside the scanned area) are glass, not tissue; the slide is closed afterwards."""
    rgba = np.full((2000, 3000, 4), (244, 244, 242, 255), np.uint8)
    rgba[400:1000, 500:1500] = (200, 130, 180, 255)  # 1000 × 600 px of tissue
    rgba[:, 2500:] = 0  # not scanned: transparent black
    slide = _FakeSlide(rgba, mpp=4.0)
    result = analyse(_job(open_slide=lambda: slide))
    assert slide.closed
    assert slide.reads > 1
    assert result.display_properties["Analysed image"] == "WSI level 0 ÷ 2"
    assert result.display_properties["Fragments"] == 1
    assert _area(result) == pytest.approx(1000 * 600 * 16e-6, rel=0.01)
    ((x0, y0), *_), *_ = _polygons(result)
    assert 0.16 <= x0 <= 0.5 and 0.13 <= y0 <= 0.34


def test_the_loader_finds_it() -> None:
    """``dpatia_daemon.analyses.tissue:analyse`` is a loadable analysis."""
    from dpatia_daemon.analyses.loader import load_analysis

    assert load_analysis("dpatia_daemon.analyses.tissue:analyse") is analyse
