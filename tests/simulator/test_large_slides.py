"""Full-size slides: the strip-by-strip generator (checked at a tiny scale) and the
``--scale full`` set (checked without generating it: that takes minutes)."""

from __future__ import annotations

from pathlib import Path

import openslide
import pytest

from dpatia_daemon.analyses import AnalysisJob
from dpatia_daemon.analyses.nuclei import analyse as nuclei
from dpatia_daemon.analyses.tissue import analyse as tissue
from dpatia_daemon.simulator.__main__ import main
from dpatia_daemon.simulator.large import default_cache, full_specs, is_large
from dpatia_daemon.simulator.slides import SlideSpec, default_specs, generate_slide


def test_a_slide_rendered_strip_by_strip_is_a_real_pyramid_with_its_truth(
    tmp_path: Path,
) -> None:
    """At 0.25 µm/px, by strips: ceil-halved levels with the pixel size; the tissue
    analysis finds the tissue within 5 % and every fragment, the nuclei within 10 %."""
    spec = SlideSpec("strips", 3001, 2203, seed=21, microns_per_pixel=0.25, blobs=3)
    slide = generate_slide(spec, tmp_path, by_strips=True)
    path = tmp_path / slide.tiff
    with openslide.OpenSlide(str(path)) as osr:
        assert osr.level_dimensions[:2] == ((3001, 2203), (1501, 1102))
        assert float(osr.properties["openslide.mpp-x"]) == pytest.approx(0.25)
    job = AnalysisJob(
        job_id="j",
        slide_id=spec.slide_id,
        input={"type": "wholeSlide"},
        work_dir=str(tmp_path),
        slide_info=slide.info,
        files=(str(path),),
    )
    found = tissue(job)
    assert found.context["tissue"]["areaMm2"] == pytest.approx(
        slide.truth["tissueAreaMm2"], rel=0.05
    )
    assert found.display_properties["Fragments"] == 3 == len(slide.truth["regions"])
    assert slide.truth["nuclei"] > 100
    counted = nuclei(job).context["nuclei"]["count"]
    assert counted == pytest.approx(slide.truth["nuclei"], rel=0.1)


def test_the_full_set_is_real_size_one_slide_per_format() -> None:
    """100 000 × 80 000 px at 0.25 µm/px, several fragments, TIFF, SVS and DICOM; the
    stock set stays small (rendered whole)."""
    full = full_specs(default_specs())
    assert sorted(s.file_format for s in full) == ["dicom", "svs", "tiff"]
    assert {(s.width, s.height, s.microns_per_pixel) for s in full} == {(100_000, 80_000, 0.25)}
    assert all(s.blobs >= 3 and is_large(s) for s in full)
    assert not any(is_large(s) for s in default_specs())


def test_the_cache_directory_and_the_scale_option(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """$DPATIA_SLIDE_CACHE, else the XDG cache; --scale is 'full' or a number."""
    monkeypatch.setenv("DPATIA_SLIDE_CACHE", str(tmp_path / "c"))
    assert default_cache() == tmp_path / "c"
    monkeypatch.delenv("DPATIA_SLIDE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert default_cache() == tmp_path / "x" / "dpatia" / "full-slides"
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--scale", "huge"])
    assert exit_info.value.code == 2
    assert "neither 'full' nor a positive number" in capsys.readouterr().err
