"""Finding the tissue: a low-resolution RGB image of the whole slide in,
:class:`TissueFindings` out (regions with width-normalised outlines, areas, counts).

:func:`detect_tissue` is pure (no job, no files); the method and why it is so are in
the package docstring (:mod:`dpatia_daemon.analyses.tissue`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Final

import numpy as np
import numpy.typing as npt
from attrs import frozen
from skimage.filters import gaussian, threshold_otsu
from skimage.measure import label, regionprops

from .outlines import Ring, shoelace, simplify_to_cap, trace
from .settings import TissueSettings

#: Without a pixel size, specks are regions smaller than this fraction of the image.
MIN_AREA_FRACTION_WITHOUT_MPP: Final = 1e-4
#: Percentile of OD taken as the glass (background) level.
BACKGROUND_PERCENTILE: Final = 5.0
#: Bins of the OD histogram the threshold is computed on.
HISTOGRAM_BINS: Final = 2048
#: The threshold's refinement to the midpoint of the class medians converges in a few.
MIDPOINT_ITERATIONS: Final = 20

#: Pixels of the analysis image; ``rgb`` arrays are (height, width, 3) uint8.
RGB = npt.NDArray[np.uint8]


def _nothing() -> None:
    return None


# --- findings -------------------------------------------------------------------------


@frozen
class TissueRegion:
    """One tissue fragment.

    ``outline`` is the closed outer boundary (first point repeated last) and ``holes``
    the closed boundaries of its unfilled holes, width-normalised ``(x, y)`` pairs.
    ``pixels`` is its pixel count at analysis resolution (holes excluded); ``area_mm2``
    that count in mm² and ``polygon_area_mm2`` the simplified polygons' area (outline
    minus holes), both ``None`` without a pixel size.  ``centroid`` is width-normalised.
    """

    outline: list[tuple[float, float]]
    holes: list[list[tuple[float, float]]]
    pixels: int
    area_mm2: float | None
    polygon_area_mm2: float | None
    centroid: tuple[float, float]


@frozen
class TissueFindings:
    """What :func:`detect_tissue` found.

    ``regions`` largest first.  ``tissue_area_mm2`` is ``None`` without a pixel size.
    ``tissue_fraction`` is of the whole image.  ``analysis_mpp`` is the µm per analysis
    pixel (``None`` if unknown); ``threshold`` the OD threshold used; ``tolerance_px``
    the simplification actually used; ``outlines_omitted`` the number of (smallest)
    regions left without an outline because the point cap could not be met otherwise.
    """

    regions: list[TissueRegion]
    tissue_pixels: int
    tissue_area_mm2: float | None
    tissue_fraction: float
    analysis_mpp: float | None
    threshold: float
    tolerance_px: float
    points: int
    outlines_omitted: int = 0

    @property
    def fragments(self) -> int:
        """The number of tissue fragments (connected regions)."""
        return len(self.regions)


# --- detection ------------------------------------------------------------------------


def optical_density(rgb: RGB) -> npt.NDArray[np.float32]:
    """``Σ -log10(I / 255)`` over the three channels (I clipped to ≥ 1).

    Computed as ``3·log10(255) − log10(R·G·B)``: one logarithm per pixel, and the
    product (at most 255³ < 2²⁴) is exact in float32.
    """
    product = np.maximum(rgb[..., 0], 1).astype(np.float32)
    product *= np.maximum(rgb[..., 1], 1)
    product *= np.maximum(rgb[..., 2], 1)
    od = np.log10(product, out=product)
    np.subtract(np.float32(3 * math.log10(255)), od, out=od)
    return od


def tissue_threshold(od: npt.NDArray[np.float32], min_od: float) -> float:
    """The OD above which a pixel is tissue.

    Otsu's threshold, refined to the midpoint of the two classes' medians (iterated
    to a fixed point).  Otsu alone is ill-determined when the classes are far apart
    (any threshold in the empty gap between them scores the same) and can land near
    either class, which grows or shrinks every outline by a pixel; the midpoint is
    where a boundary pixel half covered by typical tissue falls, so areas stay
    unbiased.  Medians rather than means, so dark nuclei, debris or pen marks do not
    pull it up.  Never below the glass (the 5th percentile) plus ``min_od``.
    Everything is computed on a fine histogram: the image may be 16 Mpx.
    """
    low_value, high_value = float(od.min()), float(od.max())
    if high_value - low_value < 1e-6:
        # A uniform image: no contrast, so no tissue (unless the floor is zero and
        # the whole image is darker than it, which a flat glass slide is not).
        return max(high_value, low_value + min_od) + 1e-6
    counts, edges = np.histogram(od, bins=HISTOGRAM_BINS, range=(low_value, high_value))
    centres = (edges[:-1] + edges[1:]) / 2
    cumulative = np.cumsum(counts)

    def quantile(start: int, stop: int, q: float) -> float:
        """The value at quantile ``q`` of the bins ``[start, stop)``."""
        before = cumulative[start - 1] if start else 0
        target = before + q * (cumulative[stop - 1] - before)
        return float(centres[min(stop - 1, int(np.searchsorted(cumulative, target)))])

    floor = quantile(0, len(counts), BACKGROUND_PERCENTILE / 100) + min_od
    threshold = float(threshold_otsu(hist=(counts, centres)))
    for _ in range(MIDPOINT_ITERATIONS):
        split = int(np.searchsorted(centres, threshold, side="right"))
        if (
            split <= 0
            or split >= len(counts)
            or not counts[:split].any()
            or not counts[split:].any()
        ):
            break
        midpoint = (quantile(0, split, 0.5) + quantile(split, len(counts), 0.5)) / 2
        if abs(midpoint - threshold) < 1e-6:
            break
        threshold = midpoint
    return max(threshold, floor)


def detect_tissue(
    rgb: npt.NDArray[Any],
    *,
    downsample: float | tuple[float, float],
    mpp: float | None,
    image_width: int,
    settings: TissueSettings | None = None,
    checkpoint: Callable[[], None] = _nothing,
) -> TissueFindings:
    """Find the tissue in ``rgb``, a whole-slide image at low resolution.

    ``downsample`` is level-0 pixels per ``rgb`` pixel (one number, or ``(x, y)`` when
    the two differ, as with ceil-rounded pyramid levels); ``mpp`` the level-0 pixel
    size in µm (``None`` if unknown: areas are then ``None`` and specks are judged by
    their fraction of the image); ``image_width`` the level-0 width, which normalises
    coordinates.  ``checkpoint`` is called between stages (it may raise to cancel).
    An image with alpha is composited on white; a grey image is accepted.
    """
    settings = settings or TissueSettings()
    sx, sy = (downsample, downsample) if isinstance(downsample, int | float) else downsample
    pixels_rgb = _as_rgb(rgb)
    height, width = pixels_rgb.shape[:2]
    if width == 0 or height == 0:
        raise ValueError("the image to analyse is empty")
    px_area_mm2 = None if mpp is None else (mpp * 1e-3) ** 2 * sx * sy
    if px_area_mm2 is not None and px_area_mm2 > 0:
        min_area_px = max(1, math.ceil(settings.min_area_mm2 / px_area_mm2))
        min_hole_px = max(1, math.ceil(settings.min_hole_mm2 / px_area_mm2))
    else:
        px_area_mm2 = None
        min_area_px = min_hole_px = max(
            1, math.ceil(MIN_AREA_FRACTION_WITHOUT_MPP * width * height)
        )

    od = gaussian(optical_density(pixels_rgb), sigma=1.0, preserve_range=True)
    threshold = tissue_threshold(od, settings.min_od)
    mask = od > threshold
    del od
    checkpoint()

    # Specks: drop 8-connected regions below the minimum area.
    labels = label(mask, connectivity=2)
    counts = np.bincount(labels.ravel())
    small = counts < min_area_px
    small[0] = False
    if small.any():
        mask[small[labels]] = False
    # Holes: 4-connected background components that do not touch the border; fill
    # the small ones.
    background = label(~mask, connectivity=1)
    border = np.unique(
        np.concatenate((background[0], background[-1], background[:, 0], background[:, -1]))
    )
    counts = np.bincount(background.ravel())
    fill = counts < min_hole_px
    fill[0] = False
    fill[border] = False
    if fill.any():
        mask[fill[background]] = True
    del background
    checkpoint()

    labels = label(mask, connectivity=2)
    props = sorted(regionprops(labels), key=lambda p: -int(p.area))
    checkpoint()
    traced = [trace(p) for p in props]
    checkpoint()
    simplified = simplify_to_cap(traced, settings.simplify_px, settings.max_points)
    scale = (sx / image_width, sy / image_width)
    limits = (width * sx / image_width, height * sy / image_width)
    regions = _regions(props, simplified.rings, scale, limits, px_area_mm2, (sx, sy))
    tissue_pixels = int(mask.sum())
    return TissueFindings(
        regions=regions,
        tissue_pixels=tissue_pixels,
        tissue_area_mm2=None if px_area_mm2 is None else tissue_pixels * px_area_mm2,
        tissue_fraction=tissue_pixels / (width * height),
        analysis_mpp=None if mpp is None else mpp * math.sqrt(sx * sy),
        threshold=threshold,
        tolerance_px=simplified.tolerance,
        points=simplified.points,
        outlines_omitted=simplified.omitted,
    )


def _as_rgb(image: npt.NDArray[Any]) -> RGB:
    """``image`` as (h, w, 3) uint8: grey stacked, alpha composited on white."""
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise ValueError(f"expected an 8-bit image, not {array.dtype}")
    if array.ndim == 2:
        return np.repeat(array[..., None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise ValueError(f"expected an RGB image, not shape {array.shape}")
    if array.shape[2] == 4:
        alpha = array[..., 3:4].astype(np.float32) / 255.0
        blended = array[..., :3] * alpha + 255.0 * (1.0 - alpha)
        return np.asarray(np.rint(blended), dtype=np.uint8)
    return array


def _regions(
    props: Sequence[Any],
    rings: Sequence[tuple[Ring, Sequence[Ring]]],
    scale: tuple[float, float],
    limits: tuple[float, float],
    px_area_mm2: float | None,
    downsample: tuple[float, float],
) -> list[TissueRegion]:
    """The regions, from their pixel properties and simplified boundaries."""
    sx, sy = downsample
    mm2_per_level0_px = None if px_area_mm2 is None else px_area_mm2 / (sx * sy)

    def normalise(rc: npt.NDArray[np.float64]) -> list[tuple[float, float]]:
        # (row, col) of pixel centres → level-0 pixel edges → width-normalised.
        x = np.clip((rc[:, 1] + 0.5) * scale[0], 0.0, limits[0])
        y = np.clip((rc[:, 0] + 0.5) * scale[1], 0.0, limits[1])
        return [(float(a), float(b)) for a, b in zip(x, y, strict=True)]

    regions = []
    for prop, (outline, holes) in zip(props, rings, strict=True):
        pixels = int(prop.area)
        polygon_area = None
        if mm2_per_level0_px is not None and len(outline):
            level0 = shoelace(outline, sx, sy) - sum(shoelace(h, sx, sy) for h in holes)
            polygon_area = level0 * mm2_per_level0_px
        row, col = prop.centroid
        regions.append(
            TissueRegion(
                outline=normalise(outline),
                holes=[normalise(h) for h in holes],
                pixels=pixels,
                area_mm2=None if px_area_mm2 is None else pixels * px_area_mm2,
                polygon_area_mm2=polygon_area,
                centroid=((col + 0.5) * scale[0], (row + 0.5) * scale[1]),
            )
        )
    return regions


__all__ = [
    "TissueFindings",
    "TissueRegion",
    "detect_tissue",
    "optical_density",
    "tissue_threshold",
]
