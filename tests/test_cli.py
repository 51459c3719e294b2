"""The ``dpatia`` command: ``dpatia analyses`` and ``dpatia analyse SLIDE_FILE``.

``dpatia analyse`` runs on a slide the simulator's generator makes (small, with a
label); the analyses below report what their job looked like, so the test sees the
``AnalysisJob`` the command built.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from plugin_helpers import install_plugin

from dpatia_daemon import __version__
from dpatia_daemon.analyses import AnalysisJob, AnalysisResult, item, rectangle
from dpatia_daemon.cli import main
from dpatia_daemon.config import AppConfig
from dpatia_daemon.jobs import job_key
from dpatia_daemon.simulator.slides import SlideSpec, generate_slide
from dpatia_daemon.sps.results import CONTEXT_KEY


def describe(job: AnalysisJob) -> AnalysisResult:
    """Report the job as the command built it."""
    job.progress(10, "looking")
    with job.open_slide() as slide:
        level0 = slide.dimensions
    job.progress(90, "done looking")
    return AnalysisResult(
        display_result="described",
        display_properties={
            "Input": json.dumps(dict(job.input)),
            "Size": json.dumps(job.image_size),
            "Mpp": job.slide_info["micronsPerPixel"] if job.slide_info else "-",
            "Level0": json.dumps(level0),
            "Thumbnail": Path(job.thumbnail_path or "").name,
            "Label": Path(job.label_path or "").name,
        },
        items=[item(polygons=[rectangle(0.1, 0.1, 0.4, 0.3)])],
    )


def broken(job: AnalysisJob) -> AnalysisResult:
    raise ValueError("stain not recognised")


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small generated slide (0.5 µm/px, with a label)."""
    folder = tmp_path_factory.mktemp("slides")
    spec = SlideSpec(slide_id="cli-1", width=2400, height=1600, seed=11, blobs=2)
    return folder / generate_slide(spec, folder).tiff


def run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    status = main(list(argv), out=out)
    return status, out.getvalue()


def test_analyses_lists_the_built_ins_and_installed_plugins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A table by default, JSON with --json; a plugin shows its distribution."""
    install_plugin(tmp_path, "mymodel", "vendor_x:analyse")
    monkeypatch.syspath_prepend(str(tmp_path))
    status, table = run("analyses")
    assert status == 0
    lines = table.splitlines()
    assert lines[0].split() == ["NAME", "TARGET", "FROM"]
    assert lines[1].split() == ["demo", "dpatia_daemon.analyses.demo:run", "built-in"]
    assert ["mymodel", "vendor_x:analyse", "vendor-model", "1.0"] in [line.split() for line in lines]
    status, text = run("analyses", "--json")
    assert {"name": "mymodel", "target": "vendor_x:analyse", "source": "vendor-model 1.0",
            "shadowed": False} in json.loads(text)


def test_analyse_builds_the_job_a_worker_would_and_writes_result_and_overlay(
    slide: Path, tmp_path: Path
) -> None:
    """Metadata from the file, a thumbnail, a label, open_slide(), progress printed;
    the result JSON as the daemon stores it; an overlay PNG; time per step."""
    label = slide.parent / "label.jpg"
    status, out = run(
        "analyse", str(slide), "--analysis", "test_cli:describe", "--out", str(tmp_path),
        "--label", str(label),
    )
    assert status == 0, out
    stored = json.loads((tmp_path / "cli-1.result.json").read_text())
    assert stored["slideId"] == "cli-1"
    assert stored["applicationVersion"] == __version__
    # The key is the one the daemon gives a whole-slide job of this slide.
    key = job_key(AppConfig().application_id, "cli-1", {"type": "wholeSlide"})
    assert stored["data"]["context"][CONTEXT_KEY] == {
        "jobId": "local-cli-1", "key": key, "status": "Done"
    }
    props = stored["displayProperties"]
    assert json.loads(props["Input"]) == {"type": "wholeSlide"}
    assert json.loads(props["Size"]) == [2400, 1600] == json.loads(props["Level0"])
    assert props["Mpp"] == pytest.approx(0.5)
    # The TIFF has no label of its own: the one given with --label.
    assert (props["Thumbnail"], props["Label"]) == ("thumbnail.png", "label.jpg")
    assert stored["data"]["result"]["type"] == "primitive"
    assert (tmp_path / "cli-1.overlay.png").read_bytes().startswith(b"\x89PNG")
    assert "  10 %  looking" in out and "  90 %  done looking" in out
    assert "result: described" in out
    assert "time: load analysis" in out and "analysis " in out and "overlay " in out


def test_analyse_passes_a_region_as_the_selection(slide: Path, tmp_path: Path) -> None:
    """--region x,y,w,h is a taggedPolygon input, in the width-normalised frame."""
    status, _ = run(
        "analyse", str(slide), "--analysis", "test_cli:describe", "--out", str(tmp_path),
        "--region", "0.25,0.125,0.5,0.25",
    )
    assert status == 0
    stored = json.loads((tmp_path / "cli-1.result.json").read_text())
    selection = json.loads(stored["displayProperties"]["Input"])
    assert selection["type"] == "taggedPolygon"
    points = [(p["x"], p["y"]) for p in selection["content"]["polygon"]["points"]]
    assert points == [(0.25, 0.125), (0.75, 0.125), (0.75, 0.375), (0.25, 0.375), (0.25, 0.125)]


def test_analyse_refuses_a_region_outside_the_slide(slide: Path, tmp_path: Path, capsys: Any) -> None:
    """y runs to height/width (here 0.667): a region below it is a usage error."""
    status, _ = run(
        "analyse", str(slide), "--analysis", "test_cli:describe", "--out", str(tmp_path),
        "--region", "0,0.5,0.5,0.5",
    )
    assert status == 2
    assert "must lie inside the slide" in capsys.readouterr().err


def test_analyse_takes_a_polygon_file_as_the_region(slide: Path, tmp_path: Path) -> None:
    """--region FILE: a JSON polygon (here a whole IA-API input, as the SPS sends it)."""
    triangle = [{"x": 0.1, "y": 0.1}, {"x": 0.5, "y": 0.1}, {"x": 0.3, "y": 0.4}]
    polygon = tmp_path / "region.json"
    polygon.write_text(
        json.dumps({"type": "taggedPolygon", "content": {"polygon": {"points": triangle}}})
    )
    status, _ = run(
        "analyse", str(slide), "--analysis", "test_cli:describe", "--out", str(tmp_path),
        "--region", str(polygon),
    )
    assert status == 0
    stored = json.loads((tmp_path / "cli-1.result.json").read_text())
    selection = json.loads(stored["displayProperties"]["Input"])
    assert selection["content"]["polygon"]["points"] == triangle


def test_polygon_files_in_each_form_and_refusals(tmp_path: Path) -> None:
    """Pairs, points, {"points"}, {"polygons"}; too few points or non-numbers: one line."""
    from dpatia_daemon.cli import CommandError, polygons_of

    forms = {
        "pairs": [[0, 0], [1, 0], [0, 0.5]],
        "points": [{"x": 0, "y": 0}, {"x": 1, "y": 0}, {"x": 0, "y": 0.5}],
        "object": {"points": [[0, 0], [1, 0], [0, 0.5]]},
    }
    for name, data in forms.items():
        (tmp_path / name).write_text(json.dumps(data))
        assert polygons_of(str(tmp_path / name)) == [[(0, 0), (1, 0), (0, 0.5)]]
    (tmp_path / "two").write_text(json.dumps({"polygons": [forms["pairs"], forms["points"]]}))
    assert len(polygons_of(str(tmp_path / "two"))) == 2
    for bad in ([[0, 0], [1, 0]], [["a", 0], [1, 0], [0, 1]], {"nothing": 1}):
        (tmp_path / "bad").write_text(json.dumps(bad))
        with pytest.raises(CommandError, match="--region"):
            polygons_of(str(tmp_path / "bad"))
    (tmp_path / "broken").write_text("[[0,")
    with pytest.raises(CommandError, match="not a readable JSON polygon file"):
        polygons_of(str(tmp_path / "broken"))


def test_analyse_exits_non_zero_with_the_analysis_message(
    slide: Path, tmp_path: Path, capsys: Any
) -> None:
    """An analysis that raises: exit 1, its type and message on stderr, no result file."""
    status, _ = run("analyse", str(slide), "--analysis", "test_cli:broken", "--out", str(tmp_path))
    assert status == 1
    assert "the analysis failed: ValueError: stain not recognised" in capsys.readouterr().err
    assert not (tmp_path / "cli-1.result.json").exists()


def test_analyse_reports_an_unusable_file_or_analysis_in_one_line(
    tmp_path: Path, slide: Path, capsys: Any
) -> None:
    """Exit 2: a file OpenSlide does not read, an analysis that does not load."""
    text = tmp_path / "notes.txt"
    text.write_text("not a slide")
    assert run("analyse", str(text), "--analysis", "demo", "--out", str(tmp_path))[0] == 2
    assert "not a slide file OpenSlide reads" in capsys.readouterr().err
    assert run("analyse", str(slide), "--analysis", "nosuch", "--out", str(tmp_path))[0] == 2
    assert "unknown analysis 'nosuch'" in capsys.readouterr().err


def test_the_tissue_analysis_runs_from_the_command_line(slide: Path, tmp_path: Path) -> None:
    """The default analysis on the generated slide: its area result and the overlay."""
    status, out = run("analyse", str(slide), "--analysis", "tissue", "--out", str(tmp_path))
    assert status == 0, out
    stored = json.loads((tmp_path / "cli-1.result.json").read_text())
    assert stored["displayResult"].startswith("Tissue:")
    assert stored["data"]["result"]["content"]
    assert (tmp_path / "cli-1.overlay.png").exists()
