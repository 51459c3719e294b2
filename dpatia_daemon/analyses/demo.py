"""The ``demo`` analysis: the seed's dummy analysis, reproduced for demos and benchmarks.

Three steps with progress texts, each ``[demo] step_seconds`` long (default 2, so about
6 s in all, like the seed's dummy analysis), then a result: a square in the middle of
the slide labelled "ANSWER: 42".  Cancellation is honoured during every step (it waits
on the job's cancellation event instead of sleeping).
"""

from __future__ import annotations

from attrs import frozen

from ..sections import from_strings, key, not_negative
from . import AnalysisJob, AnalysisResult, item, label, rectangle

#: The steps and what the pathologist sees during each.
STEPS = ("Preparing the slide", "Analysing the tissue", "Writing the result")


@frozen
class DemoSettings:
    """The ``[demo]`` config section (declared once: the config reads it with this
    class, a worker parses its ``--setting`` strings with it)."""

    step_seconds: float = key(2.0, not_negative)


def run(job: AnalysisJob) -> AnalysisResult:
    """Walk through :data:`STEPS`, then answer 42 with a square on the slide."""
    step_seconds = from_strings(DemoSettings, job.settings, name="demo").step_seconds
    for number, text in enumerate(STEPS):
        job.progress(100 * number // len(STEPS), text)
        job.sleep(step_seconds)
    # A square a fifth of the slide's width, centred (y runs to height/width).
    size = job.image_size
    max_y = size[1] / size[0] if size else 0.5
    side = min(0.2, max_y * 0.8)
    x0, y0 = 0.5 - side / 2, max_y / 2 - side / 2
    answer = "ANSWER: 42"
    return AnalysisResult(
        display_result=answer,
        display_properties={"Answer": 42, "Analysis": "demo"},
        items=[
            item(
                stroke="#00C000",
                polygons=[rectangle(x0, y0, x0 + side, y0 + side)],
                labels=[label(x0, y0, answer)],
            )
        ],
    )
