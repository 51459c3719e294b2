"""The template analysis on a generated slide: no SPS, no daemon, a second or two.

dpatia's SPS simulator makes synthetic slides whose tissue is known exactly
(``dpatia_daemon.simulator.slides``); the test builds the ``AnalysisJob`` a worker
would give the analysis and checks the answer against that ground truth.  Run it with
``pytest`` in this folder after ``pip install -e '.[test]'``.
"""

from __future__ import annotations

from pathlib import Path

from dpatia_example.analysis import analyse

from dpatia_daemon.analyses import AnalysisCancelled, AnalysisJob, AnalysisResult
from dpatia_daemon.simulator.slides import SlideSpec, generate_slide


def make_job(tmp_path: Path, **overrides: object) -> tuple[AnalysisJob, dict]:
    """A job for a small generated slide (its WSI downloaded, as the pipeline would)."""
    spec = SlideSpec(slide_id="example-1", width=3000, height=2000, seed=7, blobs=2)
    slide = generate_slide(spec, tmp_path)
    fields = {
        "job_id": "job-1",
        "slide_id": spec.slide_id,
        "input": {"type": "wholeSlide"},
        "work_dir": str(tmp_path),
        "slide_info": slide.info,
        "files": (str(tmp_path / slide.tiff),),
        **overrides,
    }
    return AnalysisJob(**fields), slide.truth  # type: ignore[arg-type]


def test_the_stained_fraction_is_near_the_true_tissue_fraction(tmp_path: Path) -> None:
    """The answer on a slide of known tissue: near the truth, with a box around it."""
    progress: list[tuple[int, str]] = []
    job, truth = make_job(tmp_path, progress=lambda p, t: progress.append((p, t)))
    result = analyse(job)
    assert isinstance(result, AnalysisResult)
    stained = result.display_properties["Stained (%)"]
    assert abs(stained - 100 * truth["tissueFraction"]) < 5
    assert result.display_properties["Read from"].startswith("WSI")
    [box] = result.items
    xs = [p.x for p in box.polygons[0].points]
    assert 0 <= min(xs) < max(xs) <= 1
    assert progress[0] == (0, "Reading the slide") and progress[-1] == (100, "Done")
    # What the SPS is sent (the daemon adds its version and bookkeeping).
    assert result.to_result("example-1").displayResult.startswith("Stained: ")


def test_a_cancelled_job_stops(tmp_path: Path) -> None:
    """Cancellation is honoured: AnalysisCancelled, not a result."""
    job, _ = make_job(tmp_path, cancelled=lambda: True)
    try:
        analyse(job)
    except AnalysisCancelled:
        return
    raise AssertionError("the analysis did not stop on cancellation")
