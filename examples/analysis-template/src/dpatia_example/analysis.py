"""The template analysis: how much of the slide is stained, and where.

It shows the whole contract in a few lines: read the slide at a resolution of your
choice (``get_image``: the downloaded WSI, or the thumbnail when there is none),
report progress, honour cancellation, and return what the pathologist sees: a line of
text, a table, and shapes in width-normalised coordinates.
"""

from __future__ import annotations

import os

import numpy as np

from dpatia_daemon.analyses import AnalysisJob, AnalysisResult, item, label, rectangle
from dpatia_daemon.analyses.images import SlideResolution, get_image

#: Pixels darker than this (0-255 grey) count as stained; configurable per daemon
#: through [workers] environment (EXAMPLE_THRESHOLD=200).
DEFAULT_THRESHOLD = 220


def analyse(job: AnalysisJob) -> AnalysisResult:
    """The stained fraction of the slide and a box around the stained area."""
    threshold = int(os.environ.get("EXAMPLE_THRESHOLD", DEFAULT_THRESHOLD))
    job.progress(0, "Reading the slide")
    image = get_image(job, SlideResolution(target_mpp=16, min_side=256, max_side=2048))
    job.check_cancelled()  # returns at once unless the user cancelled

    job.progress(60, "Measuring")
    grey = image.rgb.astype(np.float32).mean(axis=2)
    stained = grey < threshold
    fraction = float(stained.mean())
    properties: dict[str, str | int | float] = {
        "Stained (%)": round(100 * fraction, 2),
        "Read from": image.source,
    }
    if image.mpp is not None:
        pixel_mm2 = (image.mpp / 1000) ** 2 * image.downsample[0] * image.downsample[1]
        properties["Stained area (mm²)"] = round(float(stained.sum()) * pixel_mm2, 3)
    items = []
    if stained.any():
        ys, xs = np.nonzero(stained)
        # Image pixels -> level-0 pixels -> width-normalised (x 0..1, y 0..height/width).
        scale_x = image.downsample[0] / image.image_width
        scale_y = image.downsample[1] / image.image_width
        x0, x1 = float(xs.min() * scale_x), float((xs.max() + 1) * scale_x)
        y0, y1 = float(ys.min() * scale_y), float((ys.max() + 1) * scale_y)
        items.append(
            item(
                stroke="#FF8C00",
                polygons=[rectangle(x0, y0, x1, y1)],
                labels=[label(x0, y0, f"stained {100 * fraction:.1f} %")],
            )
        )
    job.progress(100, "Done")
    return AnalysisResult(
        display_result=f"Stained: {100 * fraction:.1f} % of the slide",
        display_properties=properties,
        items=items,
    )
