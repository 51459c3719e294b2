"""The ``nuclei`` analysis callable: the job's slide in, nuclei, counts and density out.

:func:`analyse` (``[app] analysis = nuclei``) finds the tissue first with the
``tissue`` analysis (:func:`~dpatia_daemon.analyses.tissue.detect_tissue` on a
low-resolution image, default ``[tissue]`` settings), rasterises its outlines into a
mask, counts the nuclei inside it tile by tile (:mod:`.tiles`) with progress per tile
and cancellation between tiles, and returns them as small diamonds (an even sample
when there are more than ``max_points`` allow), with the tissue outlines, and the
count and density per mm² as properties.
"""

from __future__ import annotations

import math
from typing import Final

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw

from ...models import Point, Polygon
from .. import AnalysisJob, AnalysisResult, NoSlideFile, item
from ..images import SlideResolution, _info_mpp, _openslide_mpp, read_slide
from ..tissue.analysis import STROKE as TISSUE_STROKE
from ..tissue.detection import TissueFindings, detect_tissue
from ..tissue.settings import TissueSettings
from .settings import NucleiSettings
from .tiles import NucleiCount, count_nuclei

#: The nuclei's colour: a yellow that stands out on haematoxylin and eosin alike.
STROKE: Final = "#FFD000"
#: Points per drawn nucleus (a closed diamond).
POINTS_PER_NUCLEUS: Final = 5
#: The drawn diamond's half-diagonal, in µm.
MARKER_UM: Final = 3.0
#: Decimals of the drawn coordinates (normalised by the image width): 1e-7 of a
#: 100 000 px slide is 0.01 px, far below what a viewer shows.
COORDINATE_DIGITS: Final = 7


def analyse(job: AnalysisJob) -> AnalysisResult:
    """Count the nuclei in the tissue of the job's slide; draw them and report density."""
    settings = NucleiSettings.from_mapping(job.settings)
    job.progress(0, "Finding the tissue")
    job.check_cancelled()
    try:
        slide = job.open_slide()
    except NoSlideFile as e:
        raise NoSlideFile(
            f"nuclei needs the slide's file at full resolution ({e}); "
            "is [pipeline] download_wsi on?"
        ) from None
    try:
        mpp = _mpp(slide, job)
        tissue = read_slide(
            slide,
            SlideResolution(target_mpp=settings.tissue_mpp, min_side=256, max_side=8192),
            fallback_mpp=mpp,
            checkpoint=job.check_cancelled,
            progress=lambda f: job.progress(round(5 * f), "Finding the tissue"),
        )
        findings = detect_tissue(
            tissue.rgb,
            downsample=tissue.downsample,
            mpp=mpp,
            image_width=tissue.image_width,
            settings=TissueSettings(),
            checkpoint=job.check_cancelled,
        )
        height, width = tissue.rgb.shape[:2]
        mask = tissue_mask(findings, width, height, tissue.downsample, tissue.image_width)
        job.progress(10, "Counting nuclei")
        threads = settings.threads()
        counted = count_nuclei(
            slide,
            mpp,
            mask,
            tissue.downsample,
            settings,
            threads=threads,
            checkpoint=job.check_cancelled,
            progress=lambda f: job.progress(
                10 + math.floor(85 * f), f"Counting nuclei ({round(100 * f)} % of the tiles)"
            ),
        )
    finally:
        slide.close()
    job.progress(95, "Writing the result")
    job.check_cancelled()
    return to_result(
        counted, findings, settings, image_width=tissue.image_width, mpp=mpp, threads=threads
    )


def _mpp(slide: object, job: AnalysisJob) -> float:
    """The level-0 pixel size: OpenSlide's, else the slide info's; an error without."""
    mpp = _openslide_mpp(slide) or _info_mpp(job.slide_info)
    if mpp is None:
        raise ValueError("nuclei needs the slide's pixel size (µm per pixel), and it has none")
    return mpp


def tissue_mask(
    findings: TissueFindings,
    width: int,
    height: int,
    downsample: tuple[float, float],
    image_width: int,
) -> npt.NDArray[np.bool_]:
    """The tissue outlines (minus their holes) rasterised on the ``width`` × ``height``
    analysis image the tissue was found in."""
    canvas = Image.new("1", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    sx, sy = image_width / downsample[0], image_width / downsample[1]

    def pixels(ring: list[tuple[float, float]]) -> list[tuple[float, float]]:
        return [(x * sx - 0.5, y * sy - 0.5) for x, y in ring]

    for region in findings.regions:
        if len(region.outline) >= 3:
            draw.polygon(pixels(region.outline), fill=1, outline=1)
    for region in findings.regions:
        for hole in region.holes:
            if len(hole) >= 3:
                draw.polygon(pixels(hole), fill=0)
    return np.asarray(canvas, dtype=bool)


def to_result(
    counted: NucleiCount,
    findings: TissueFindings,
    settings: NucleiSettings,
    *,
    image_width: int,
    mpp: float,
    threads: int = 1,
) -> AnalysisResult:
    """The IA-API result: nuclei diamonds (sampled to the point cap), tissue outlines,
    the count and the density per mm² of tissue."""
    count = len(counted.x)
    area = findings.tissue_area_mm2
    density = count / area if area else None
    drawable = max(0, (settings.max_points - _outline_points(findings)) // POINTS_PER_NUCLEUS)
    chosen: npt.NDArray[np.int64] = np.arange(count, dtype=np.int64)
    if count > drawable:
        # An even sample (every k-th, in tile order, so spread over the slide).
        chosen = np.linspace(0, count - 1, drawable).round().astype(np.int64)
    half = MARKER_UM / mpp / image_width
    x = counted.x[chosen].astype(np.float64) / image_width
    y = counted.y[chosen].astype(np.float64) / image_width
    # The diamonds' corners (top, right, bottom, left, top), rounded to COORDINATE_DIGITS
    # in numpy: the short numbers make the result's JSON smaller and quicker to write
    # and read at every hop (worker, daemon, SPS).
    xs = np.round(np.stack([x, x + half, x, x - half, x], axis=1), COORDINATE_DIGITS).tolist()
    ys = np.round(
        np.stack([y - half, y, y + half, y, y - half], axis=1), COORDINATE_DIGITS
    ).tolist()
    polygons = [
        Polygon(points=[Point(px, py) for px, py in zip(row_x, row_y, strict=True)])
        for row_x, row_y in zip(xs, ys, strict=True)
    ]
    outlines = [
        Polygon(points=[Point(px, py) for px, py in ring])
        for region in findings.regions
        for ring in (region.outline, *region.holes)
        if ring
    ]
    items = []
    if outlines:
        items.append(item(stroke=TISSUE_STROKE, polygons=outlines))
    if polygons:
        items.append(item(stroke=STROKE, polygons=polygons))
    if area is None:
        display = f"Nuclei: {count}"
    else:
        display = f"Nuclei: {count} in {area:.3g} mm² ({density:.0f} per mm²)"
    properties: dict[str, str | int | float] = {
        "Nuclei": count,
        "Nuclei per mm²": "unknown" if density is None else round(density),
        "Tissue area (mm²)": "unknown" if area is None else f"{area:.3g}",
        "Fragments": findings.fragments,
        "Analysed at (µm/px)": f"{counted.mpp:.2f}",
        "Tiles analysed": f"{counted.tiles} of {counted.tiles_in_grid}",
        "Threads": threads,
    }
    if len(chosen) < count:
        properties["Nuclei drawn"] = f"{len(chosen)} of {count} (an even sample)"
    context = {
        "nuclei": {
            "count": count,
            "perMm2": density,
            "tissueAreaMm2": area,
            "analysisMpp": counted.mpp,
            "tiles": counted.tiles,
            "drawn": len(chosen),
        }
    }
    return AnalysisResult(
        display_result=display, display_properties=properties, items=items, context=context
    )


def _outline_points(findings: TissueFindings) -> int:
    return sum(len(r.outline) + sum(len(h) for h in r.holes) for r in findings.regions)


__all__ = [
    "COORDINATE_DIGITS",
    "MARKER_UM",
    "POINTS_PER_NUCLEUS",
    "STROKE",
    "analyse",
    "tissue_mask",
    "to_result",
]
