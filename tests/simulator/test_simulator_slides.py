"""The simulator's generated slides: files OpenSlide reads, metadata, ground truth, reuse."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import openslide
import pytest
from PIL import Image

from dpatia_daemon.pipeline.dzi import DZI
from dpatia_daemon.simulator.fake import PHI_FIELDS
from dpatia_daemon.simulator.slides import (
    MANIFEST,
    SlideSet,
    SlideSpec,
    default_specs,
    load_or_generate,
    render_slide,
)
from dpatia_daemon.simulator.testing import small_slide_set, small_specs


@pytest.fixture(scope="session")
def slide_set(tmp_path_factory: pytest.TempPathFactory) -> SlideSet:
    """The small stock slides, generated once per session (later modules reuse them)."""
    return small_slide_set(tmp_path_factory.getbasetemp() / "sps-slides")


def test_openslide_reads_every_slide_with_its_mpp_and_ceil_levels(slide_set: SlideSet) -> None:
    """Each .tif opens as generic-tiff, with the right size, mpp, and levels that are DZI levels."""
    for slide in slide_set.slides:
        path = str(slide_set.path(slide.tiff))
        assert openslide.OpenSlide.detect_format(path) == "generic-tiff"
        with openslide.OpenSlide(path) as osr:
            size = slide.info["imageSize"]
            assert osr.dimensions == (size["width"], size["height"])
            assert float(osr.properties["openslide.mpp-x"]) == pytest.approx(0.5)
            assert float(osr.properties["openslide.mpp-y"]) == pytest.approx(0.5)
            dzi = DZI(size["width"], size["height"])
            expected = [dzi.level_size(dzi.max_level - k) for k in range(osr.level_count)]
            assert list(osr.level_dimensions) == expected
            assert max(osr.level_dimensions[-1]) <= 1024
            assert [tuple(p.values())[:2] for p in slide.truth["pyramid"]] == expected


def test_the_set_has_the_promised_shapes(slide_set: SlideSet) -> None:
    """Non-square slides, one not tile-aligned, one tile-aligned, one without a label,
    one served as several files."""
    sizes = {
        s.slide_id: (s.info["imageSize"]["width"], s.info["imageSize"]["height"])
        for s in slide_set.slides
    }
    assert all(w != h for w, h in sizes.values())
    assert any(w % 256 and h % 256 for w, h in sizes.values())
    assert any(w % 256 == 0 and h % 256 == 0 for w, h in sizes.values())
    assert any(w < h for w, h in sizes.values())
    assert [s.label is None for s in slide_set.slides].count(True) == 1
    assert {s.layout for s in slide_set.slides} == {"single", "folder"}
    folder = next(s for s in slide_set.slides if s.layout == "folder")
    assert len(folder.files) >= 3
    assert all(slide_set.path(p).is_file() for s in slide_set.slides for _, p in s.files)


def test_metadata_is_plausible(slide_set: SlideSet) -> None:
    """Info has every field of IA-API.md §2.2, PHI included (the endpoint filters it)."""
    for slide in slide_set.slides:
        info = slide.info
        assert info["id"] == slide.slide_id
        assert info["tileSize"] == {"width": 256, "height": 256}
        assert info["micronsPerPixel"] == 0.5
        assert {"jpg", "png"} <= {f["extension"] for f in info["availableTileFormats"]}
        assert info["storedTileFormat"]["extension"] == "jpg"
        assert info["fileFormat"]["mimeType"] == (
            "application/dicom" if slide.slide_id == "sim-dicom-1" else "image/tiff"
        )
        assert info["focalPlanes"] and info["opticalPaths"]
        for key in ("staining", "block", "specimen", "bodyPart", "examCode"):
            assert info[key]
        assert PHI_FIELDS <= set(info)
        assert info["seriesInstanceUid"].startswith("2.25.")
    cases = [s.info["accessionNumber"] for s in slide_set.slides]
    assert len(set(cases)) < len(cases)  # two slides share a case


def test_label_is_a_jpeg_picture(slide_set: SlideSet) -> None:
    """A label is a JPEG of a plausible label size with dark bars on a light background."""
    slide = next(s for s in slide_set.slides if s.label)
    assert slide.label is not None
    image = Image.open(slide_set.path(slide.label))
    assert image.format == "JPEG" and image.size == (600, 400)
    pixels = np.asarray(image.convert("L"))
    assert pixels.min() < 50 and np.median(pixels) > 200


def test_ground_truth_matches_the_pixels(slide_set: SlideSet) -> None:
    """The manifest's tissue area equals the area of non-background pixels at level 0,
    the regions add up to it, and the polygons agree within 1 %."""
    for slide in slide_set.slides:
        truth = slide.truth
        with openslide.OpenSlide(str(slide_set.path(slide.tiff))) as osr:
            pixels = np.asarray(osr.read_region((0, 0), 0, osr.dimensions).convert("RGB")).astype(
                int
            )
        # Background is near-white grey; tissue is saturated.  JPEG blurs edges a little.
        tissue = (pixels.max(axis=2) - pixels.min(axis=2)) > 20
        mm2 = tissue.sum() * (0.5 / 1000) ** 2
        assert mm2 == pytest.approx(truth["tissueAreaMm2"], rel=0.02)
        assert sum(r["areaMm2"] for r in truth["regions"]) == pytest.approx(
            truth["tissueAreaMm2"], rel=1e-6
        )
        for region in truth["regions"]:
            assert region["areaMm2"] == pytest.approx(region["polygonAreaMm2"], rel=0.01)
            width = truth["imageSize"]["width"]
            x, y = region["pixels"][7]
            assert region["points"][7] == {
                "x": pytest.approx(x / width, abs=1e-5),
                "y": pytest.approx(y / width, abs=1e-5),
            }
        mask = Image.open(slide_set.path(truth["mask"]["path"]))
        down = truth["mask"]["downsample"]
        assert mask.size == (
            -(-truth["imageSize"]["width"] // down),
            -(-truth["imageSize"]["height"] // down),
        )
        mask_mm2 = (np.asarray(mask) > 0).sum() * (0.5 * down / 1000) ** 2
        assert mask_mm2 == pytest.approx(truth["tissueAreaMm2"], rel=0.05)


def test_manifest_is_json_next_to_the_slides(slide_set: SlideSet) -> None:
    """manifest.json lists every slide with info and truth; paths are relative."""
    manifest = json.loads((slide_set.directory / MANIFEST).read_text())
    assert [s["id"] for s in manifest["slides"]] == [s.slide_id for s in slide_set.slides]
    for entry in manifest["slides"]:
        assert not Path(entry["tiff"]).is_absolute()
        assert entry["truth"]["tissueAreaMm2"] > 0


def test_existing_data_is_reused_and_changed_specs_regenerate(tmp_path: Path) -> None:
    """A second start reuses the manifest; other specs or a damaged file regenerate."""
    specs = [SlideSpec("tiny", 700, 500, seed=5, blobs=1)]
    first = load_or_generate(tmp_path / "d", specs)
    assert first.generated
    again = load_or_generate(tmp_path / "d", specs)
    assert not again.generated and again.slides == first.slides
    (tmp_path / "d" / "tiny" / "tiny.tif").write_bytes(b"truncated")
    assert load_or_generate(tmp_path / "d", specs).generated
    other = load_or_generate(tmp_path / "d", [SlideSpec("tiny", 700, 500, seed=6, blobs=1)])
    assert other.generated and other.slides[0].truth != first.slides[0].truth


def test_generation_is_deterministic() -> None:
    """The same spec renders the same pixels, polygons and nuclei."""
    spec = SlideSpec("det", 600, 400, seed=9, blobs=2)
    a_image, _, a_polys, a_nuclei = render_slide(spec)
    b_image, _, b_polys, b_nuclei = render_slide(spec)
    assert a_polys == b_polys
    assert a_nuclei.count == b_nuclei.count > 0
    assert (a_nuclei.x == b_nuclei.x).all()
    assert a_image.tobytes() == b_image.tobytes()


def test_small_specs_scale_the_stock_set() -> None:
    """The test set is the stock set at a quarter size, keeping each slide's character."""
    stock, small = default_specs(), small_specs()
    assert [s.slide_id for s in stock] == [s.slide_id for s in small]
    for big, little in zip(stock, small, strict=True):
        assert little.width < big.width / 3
        assert (big.width % 256 == 0) == (little.width % 256 == 0)
