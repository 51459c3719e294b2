"""The ``tissue`` analysis callable: the job's slide in, outlines and areas out.

:func:`analyse` (``[app] analysis = tissue``) reads its settings, gets an image of the
slide (:mod:`dpatia_daemon.analyses.images`), finds the tissue in it
(:mod:`.detection`) with progress and cancellation, and turns the findings into an
:class:`~dpatia_daemon.analyses.AnalysisResult` (:func:`to_result`).
"""

from __future__ import annotations

from typing import Final

from ...models import Point, Polygon
from .. import AnalysisJob, AnalysisResult, item
from .. import label as text_label
from ..images import get_image
from .detection import TissueFindings, detect_tissue
from .settings import TissueSettings

#: The outline colour: a light blue, distinct from the demo's green and from H&E/IHC.
STROKE: Final = "#00A0FF"
#: At most this many fragments get a label with their area (the largest ones).
MAX_LABELS: Final = 50


def analyse(job: AnalysisJob) -> AnalysisResult:
    """Find the tissue on the job's slide; outline it and report its area and fragments."""
    settings = TissueSettings.from_mapping(job.settings)
    job.progress(0, "Reading the slide")
    job.check_cancelled()
    image = get_image(
        job,
        settings,
        progress=lambda fraction: job.progress(5 + round(35 * fraction), "Reading the slide"),
    )
    job.progress(40, "Finding tissue")
    job.check_cancelled()
    findings = detect_tissue(
        image.rgb,
        downsample=image.downsample,
        mpp=image.mpp,
        image_width=image.image_width,
        settings=settings,
        checkpoint=job.check_cancelled,
    )
    job.progress(90, "Writing the result")
    job.check_cancelled()
    return to_result(findings, image.source)


def _format_area(mm2: float) -> str:
    """An area in mm² with a sensible number of digits."""
    if mm2 >= 100:
        return f"{mm2:.1f}"
    if mm2 >= 1:
        return f"{mm2:.2f}"
    return f"{mm2:.3g}" if mm2 > 0 else "0"


def _fragments(count: int) -> str:
    return f"{count} fragment" if count == 1 else f"{count} fragments"


def to_result(findings: TissueFindings, source: str) -> AnalysisResult:
    """The IA-API result of ``findings``: outlines, per-fragment labels, properties."""
    area = findings.tissue_area_mm2
    if not findings.regions:
        display = "No tissue found"
    elif area is None:
        display = (
            f"Tissue: {100 * findings.tissue_fraction:.1f} % of the slide "
            f"in {_fragments(findings.fragments)}"
        )
    else:
        display = f"Tissue: {_format_area(area)} mm² in {_fragments(findings.fragments)}"
    properties: dict[str, str | int | float] = {
        "Tissue area (mm²)": "unknown (no pixel size)" if area is None else _format_area(area),
        "Fragments": findings.fragments,
        "Tissue fraction": f"{100 * findings.tissue_fraction:.1f} %",
        "Analysed at (µm/px)": (
            "unknown" if findings.analysis_mpp is None else f"{findings.analysis_mpp:.2f}"
        ),
        "Analysed image": source,
    }
    if findings.outlines_omitted:
        properties["Fragments not outlined"] = findings.outlines_omitted
    polygons = []
    for region in findings.regions:
        for ring in (region.outline, *region.holes):
            if ring:
                polygons.append(Polygon(points=[Point(x, y) for x, y in ring]))
    labels = [
        text_label(r.centroid[0], r.centroid[1], f"{_format_area(r.area_mm2)} mm²")
        for r in findings.regions[:MAX_LABELS]
        if r.area_mm2 is not None
    ]
    items = [item(stroke=STROKE, polygons=polygons, labels=labels)] if polygons else []
    context = {
        "tissue": {
            "areaMm2": area,
            "fragments": findings.fragments,
            "fraction": findings.tissue_fraction,
            "analysisMpp": findings.analysis_mpp,
            "threshold": findings.threshold,
            "regionsMm2": [r.area_mm2 for r in findings.regions],
        }
    }
    return AnalysisResult(
        display_result=display,
        display_properties=properties,
        items=items,
        context=context,
    )


__all__ = ["MAX_LABELS", "STROKE", "analyse", "to_result"]
