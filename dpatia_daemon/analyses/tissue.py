"""The ``tissue`` analysis: tissue outlines, tissue area in mm² and fragment count.

Two layers:

* :func:`detect_tissue` is pure: a low-resolution RGB image of the whole slide in,
  :class:`TissueFindings` out (regions with width-normalised outlines, areas, counts).
* :func:`analyse` is the analysis callable (``[app] analysis = tissue``): it gets an
  image of the slide from the job (a low WSI level through OpenSlide, else the
  pipeline's thumbnail), runs :func:`detect_tissue` with progress and cancellation,
  and turns the findings into an :class:`~dpatia_daemon.analyses.AnalysisResult`.

The method, and why:

1. **Optical density**, summed over R, G and B: ``OD = Σ -log10(I / 255)``.  Glass is
   near white in every channel (OD ≈ 0.05), and any stain absorbs light, so OD rises
   for pink/purple H&E *and* for blue-grey IHC counterstain.  Saturation would miss
   the latter: Ki-67 haematoxylin tissue is barely more saturated than glass
   (max − min ≈ 30 of 255), while its OD is 4–5× the glass's.  OD is also close to
   linear in the intensity near the threshold, so a pixel half covered by tissue sits
   near the middle of the two classes and areas are not biased at coarse resolution.
2. A Gaussian blur (σ = 1 px) damps JPEG noise and nuclear texture, then **Otsu's
   threshold**, refined to the midpoint of the two classes' medians (see
   :func:`tissue_threshold`), so a boundary pixel half covered by tissue is cut in
   half and areas stay unbiased even at 16 µm/px.  It is never allowed below
   ``background + min_od`` (background: the 5th percentile of OD, i.e. the glass),
   so a slide with no tissue yields no tissue instead of a split of the glass's noise.
3. Connected regions (8-connected); regions smaller than ``min_area_mm2`` are specks
   and are dropped, holes smaller than ``min_hole_mm2`` are filled.  Larger holes
   (lumina, fat) stay out of the area and are outlined as polygons of their own.
4. Each region's outer boundary (and each kept hole) is traced with marching squares
   and simplified with Douglas–Peucker (``simplify_px``, at analysis resolution); the
   tolerance doubles until all outlines together have at most ``max_points`` points,
   since the SPS draws every point.
5. Areas come from pixel counts × (µm per analysis pixel)²; the simplified polygon's
   area is reported beside it.

Scikit-image does the image work (Otsu, blur, labelling, marching squares); the
simplification is a vectorised Douglas–Peucker (:func:`simplify_rings`: scikit-image's
result, without its per-point Python cost).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

import numpy as np
import numpy.typing as npt
from attrs import frozen
from PIL import Image
from skimage.filters import gaussian, threshold_otsu
from skimage.measure import find_contours, label, regionprops

from ..models import Point, Polygon
from . import AnalysisJob, AnalysisResult, item
from . import label as text_label

__all__ = [
    "STROKE",
    "AnalysisImage",
    "TissueFindings",
    "TissueRegion",
    "TissueSettings",
    "analyse",
    "choose_level",
    "detect_tissue",
    "read_slide",
    "read_thumbnail",
    "simplify_rings",
]

#: The outline colour: a light blue, distinct from the demo's green and from H&E/IHC.
STROKE: Final = "#00A0FF"
#: At most this many fragments get a label with their area (the largest ones).
MAX_LABELS: Final = 50
#: Simplification never goes coarser than this many analysis pixels.
MAX_TOLERANCE_PX: Final = 64.0
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


# --- settings -------------------------------------------------------------------------


@frozen
class TissueSettings:
    """The ``[tissue]`` config section, parsed (every key optional).

    ``min_area_mm2``: smaller regions are specks.  ``min_hole_mm2``: smaller holes are
    filled.  ``target_mpp``: the analysis resolution read from a WSI, in µm per pixel.
    ``min_side`` / ``max_side``: bounds on the analysis image's longer side (finer than
    ``target_mpp`` for small slides, coarser for huge ones).  ``max_points``: cap on
    all outline points together.  ``simplify_px``: Douglas–Peucker tolerance in
    analysis pixels.  ``min_od``: the least optical density above the glass that
    counts as tissue.
    """

    min_area_mm2: float = 0.01
    min_hole_mm2: float = 0.01
    target_mpp: float = 8.0
    min_side: int = 1024
    max_side: int = 4096
    max_points: int = 20_000
    simplify_px: float = 1.0
    min_od: float = 0.05

    @classmethod
    def from_mapping(cls, settings: Mapping[str, Any] | None) -> TissueSettings:
        """Parse a config section; raise ``ValueError`` naming the key for a bad value.

        Values may be strings (as read from the config file) or numbers.  Unknown keys
        are ignored (the section may hold keys of other versions); empty values mean
        the default.
        """
        values: dict[str, Any] = {}
        for name, (kind, lowest) in _LIMITS.items():
            raw = (settings or {}).get(name)
            if raw is None or (isinstance(raw, str) and not raw.strip()):
                continue
            try:
                value = kind(raw.strip() if isinstance(raw, str) else raw)
            except (TypeError, ValueError):
                what = "an integer" if kind is int else "a number"
                raise ValueError(f"[tissue] {name}: {raw!r} is not {what}") from None
            if not math.isfinite(value) or value < lowest:
                raise ValueError(f"[tissue] {name}: {raw!r} must be at least {lowest:g}")
            values[name] = value
        parsed = cls(**values)
        if parsed.min_side > parsed.max_side:
            raise ValueError(
                f"[tissue] min_side ({parsed.min_side}) is larger than max_side ({parsed.max_side})"
            )
        return parsed


#: Each setting's type and least allowed value.
_LIMITS: Final[dict[str, tuple[type[int] | type[float], float]]] = {
    "min_area_mm2": (float, 0.0),
    "min_hole_mm2": (float, 0.0),
    "target_mpp": (float, 1e-3),
    "min_side": (int, 16),
    "max_side": (int, 16),
    "max_points": (int, 100),
    "simplify_px": (float, 0.0),
    "min_od": (float, 0.0),
}


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
    traced = [_trace(p) for p in props]
    checkpoint()
    scale = (sx / image_width, sy / image_width)
    limits = (width * sx / image_width, height * sy / image_width)
    regions, tolerance, points, omitted = _simplify_all(
        traced, props, settings, scale, limits, px_area_mm2, (sx, sy)
    )
    tissue_pixels = int(mask.sum())
    return TissueFindings(
        regions=regions,
        tissue_pixels=tissue_pixels,
        tissue_area_mm2=None if px_area_mm2 is None else tissue_pixels * px_area_mm2,
        tissue_fraction=tissue_pixels / (width * height),
        analysis_mpp=None if mpp is None else mpp * math.sqrt(sx * sy),
        threshold=threshold,
        tolerance_px=tolerance,
        points=points,
        outlines_omitted=omitted,
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


@frozen
class _Traced:
    """A region's boundaries, unsimplified, in analysis pixel (row, col) coordinates."""

    outline: npt.NDArray[np.float64]
    holes: list[npt.NDArray[np.float64]]


def _trace(region: Any) -> _Traced:
    """Marching-squares boundaries of one region: its outer contour and its holes."""
    top, left = region.bbox[0], region.bbox[1]
    offset = np.array([top - 1, left - 1], dtype=np.float64)
    filled = np.pad(region.image_filled, 1)
    # 'high': the region's pixels are 8-connected, as labelled, so one outer contour.
    contours = find_contours(filled.astype(np.uint8), 0.5, fully_connected="high")
    outline = _drop_collinear(max(contours, key=len)) + offset
    holes = []
    hole_mask = filled & ~np.pad(region.image, 1)
    if hole_mask.any():
        for hole in find_contours(hole_mask.astype(np.uint8), 0.5, fully_connected="low"):
            if len(hole) >= 4:
                holes.append(_drop_collinear(hole) + offset)
    return _Traced(outline=outline, holes=holes)


def _drop_collinear(ring: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """A closed ring without the points in the middle of straight runs (exact, fast:
    marching squares on a mask emits a point per pixel edge, mostly collinear)."""
    if len(ring) < 5:
        return ring
    body = ring[:-1]
    before = body - np.roll(body, 1, axis=0)
    after = np.roll(body, -1, axis=0) - body
    cross = before[:, 0] * after[:, 1] - before[:, 1] * after[:, 0]
    kept = body[np.abs(cross) > 1e-9]
    if len(kept) < 3:
        return ring
    return np.asarray(np.vstack([kept, kept[:1]]), dtype=np.float64)


def simplify_rings(
    rings: Sequence[npt.NDArray[np.float64]], tolerance: float
) -> list[npt.NDArray[np.float64]]:
    """Douglas–Peucker on many closed rings at once; each keeps at least 4 points.

    Vectorised by rounds instead of recursing segment by segment (scikit-image's
    ``approximate_polygon`` costs ~0.1 ms of Python per kept point, seconds for a
    ragged slide): every round measures each point's distance to the current segment
    it belongs to, over all rings together, and splits every segment whose farthest
    point is beyond ``tolerance`` at that point.  The result is the classic algorithm's.
    """
    if not rings:
        return []
    if tolerance <= 0:
        return [np.array(ring, dtype=np.float64) for ring in rings]
    lengths = np.array([len(ring) for ring in rings])
    points = np.concatenate(rings).astype(np.float64)
    ends = np.cumsum(lengths)
    starts = ends - lengths
    keep = np.zeros(len(points), dtype=bool)
    keep[starts] = keep[ends - 1] = True
    index = np.arange(len(points))
    while True:
        kept = np.flatnonzero(keep)
        if len(kept) < 2:
            break
        segment = np.minimum(np.searchsorted(kept, index, side="right") - 1, len(kept) - 2)
        a, b = points[kept[segment]], points[kept[segment + 1]]
        ab, ap = b - a, points - a
        length2 = np.einsum("ij,ij->i", ab, ab)
        t = np.clip(np.einsum("ij,ij->i", ap, ab) / np.where(length2 > 0, length2, 1.0), 0, 1)
        distance = np.hypot(*(ap - t[:, None] * ab).T)
        distance[keep] = 0.0
        if not (distance > tolerance).any():
            break
        farthest = np.maximum.reduceat(distance, kept[:-1])
        candidates = np.flatnonzero((distance > tolerance) & (distance == farthest[segment]))
        _, first = np.unique(segment[candidates], return_index=True)
        keep[candidates[first]] = True
    simplified = []
    for ring, start, stop in zip(rings, starts, ends, strict=True):
        result = points[start:stop][keep[start:stop]]
        if len(result) < 4:  # a sliver: keep a small quadrilateral of the ring
            step = max(1, (len(ring) - 1) // 4)
            body = np.asarray(ring, dtype=np.float64)[:-1:step][:4]
            result = np.vstack([body, body[:1]])
        simplified.append(result)
    return simplified


def _shoelace(rc: npt.NDArray[np.float64], sx: float, sy: float) -> float:
    """The area of a ring of (row, col) points, in level-0 pixels."""
    y, x = rc[:, 0] * sy, rc[:, 1] * sx
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)


def _simplify_all(
    traced: Sequence[_Traced],
    props: Sequence[Any],
    settings: TissueSettings,
    scale: tuple[float, float],
    limits: tuple[float, float],
    px_area_mm2: float | None,
    downsample: tuple[float, float],
) -> tuple[list[TissueRegion], float, int, int]:
    """Simplify every boundary, coarser until the point cap is met; build the regions.

    If even :data:`MAX_TOLERANCE_PX` leaves too many points, holes go first, then the
    outlines of the smallest regions (their areas still count).
    """
    tolerance = settings.simplify_px
    flat = [ring for t in traced for ring in (t.outline, *t.holes)]
    while True:
        simplified = iter(simplify_rings(flat, tolerance))
        rings = [(next(simplified), [next(simplified) for _ in t.holes]) for t in traced]
        points = sum(len(o) + sum(len(h) for h in hs) for o, hs in rings)
        if points <= settings.max_points or tolerance >= MAX_TOLERANCE_PX:
            break
        tolerance = min(MAX_TOLERANCE_PX, max(tolerance * 2, 0.5))
    omitted = 0
    if points > settings.max_points:
        rings = [(o, []) for o, _ in rings]
        budget = settings.max_points
        kept: list[tuple[npt.NDArray[np.float64], list[npt.NDArray[np.float64]]]] = []
        for outline, _ in rings:  # largest regions first
            if len(outline) > budget:
                break
            kept.append((outline, []))
            budget -= len(outline)
        omitted = len(rings) - len(kept)
        rings = kept + [(np.empty((0, 2)), []) for _ in range(omitted)]
        points = settings.max_points - budget

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
            level0 = _shoelace(outline, sx, sy) - sum(_shoelace(h, sx, sy) for h in holes)
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
    return regions, tolerance, points, omitted


# --- getting an image -----------------------------------------------------------------


@frozen
class AnalysisImage:
    """An image of the whole slide to analyse and how it maps to level 0.

    ``downsample`` is level-0 pixels per image pixel along x and y; ``image_width``
    the level-0 width; ``mpp`` the level-0 pixel size in µm if known; ``source`` a
    short description for the result ("WSI level 2", "thumbnail").
    """

    rgb: RGB
    downsample: tuple[float, float]
    image_width: int
    mpp: float | None
    source: str


def choose_level(
    level_dimensions: Sequence[tuple[int, int]],
    level_downsamples: Sequence[float],
    mpp: float | None,
    settings: TissueSettings,
) -> tuple[int, int]:
    """The pyramid level to read and the integer factor to reduce it by.

    The wanted downsample is ``target_mpp / mpp`` (or the one giving a longer side of
    ``min_side`` without a pixel size), then bounded so the image's longer side lies
    in ``[min_side, max_side]`` where the slide allows.  The level is the coarsest at
    least that fine; the factor brings it to the wanted downsample (never coarser).
    """
    width, height = level_dimensions[0]
    longer = max(width, height)
    wanted = settings.target_mpp / mpp if mpp else longer / settings.min_side
    wanted = min(wanted, longer / settings.min_side)
    wanted = max(wanted, longer / settings.max_side, 1.0)
    level = 0
    for index, downsample in enumerate(level_downsamples):
        if downsample <= wanted * 1.001 and downsample >= level_downsamples[level]:
            level = index
    factor = max(1, math.floor(wanted / level_downsamples[level] + 1e-6))
    return level, factor


def read_slide(
    slide: Any,
    settings: TissueSettings,
    *,
    fallback_mpp: float | None = None,
    checkpoint: Callable[[], None] = _nothing,
    progress: Callable[[float], None] = lambda fraction: None,
) -> AnalysisImage:
    """Read a low-resolution image of an OpenSlide slide, in bounded memory.

    The level comes from :func:`choose_level`; it is read in chunks that are reduced
    (box filter) and composited on white as they come, so a sparse pyramid never
    makes a whole fine level sit in memory.
    """
    mpp = _openslide_mpp(slide) or fallback_mpp
    level, factor = choose_level(
        list(slide.level_dimensions), list(slide.level_downsamples), mpp, settings
    )
    level_width, level_height = slide.level_dimensions[level]
    level_downsample = float(slide.level_downsamples[level])
    out_width, out_height = math.ceil(level_width / factor), math.ceil(level_height / factor)
    canvas = Image.new("RGB", (out_width, out_height), (255, 255, 255))
    chunk = 256 * factor  # level pixels per chunk side; a multiple of the factor
    rows = range(0, level_height, chunk)
    for row_number, y in enumerate(rows):
        checkpoint()
        for x in range(0, level_width, chunk):
            size = (min(chunk, level_width - x), min(chunk, level_height - y))
            location = (round(x * level_downsample), round(y * level_downsample))
            region = slide.read_region(location, level, size)
            # Transparent pixels are outside the scanned area: glass, i.e. white.
            # Composite before reducing, or their (0, 0, 0) would darken the edges.
            opaque = Image.new("RGB", size, (255, 255, 255))
            opaque.paste(region.convert("RGB"), (0, 0), region.getchannel("A"))
            canvas.paste(
                opaque.reduce(factor) if factor > 1 else opaque, (x // factor, y // factor)
            )
        progress((row_number + 1) / len(rows))
    width, height = slide.dimensions
    return AnalysisImage(
        rgb=np.asarray(canvas),
        downsample=(width / out_width, height / out_height),
        image_width=int(width),
        mpp=mpp,
        source=f"WSI level {level}" + (f" ÷ {factor}" if factor > 1 else ""),
    )


def _openslide_mpp(slide: Any) -> float | None:
    """The geometric mean of ``openslide.mpp-x`` and ``-y``, if both are usable."""
    try:
        mx = float(slide.properties["openslide.mpp-x"])
        my = float(slide.properties["openslide.mpp-y"])
    except (KeyError, TypeError, ValueError):
        return None
    return math.sqrt(mx * my) if mx > 0 and my > 0 and math.isfinite(mx * my) else None


def read_thumbnail(
    path: str,
    image_size: tuple[int, int] | None,
    mpp: float | None,
    settings: TissueSettings,
) -> AnalysisImage:
    """Read the pipeline's thumbnail; reduce it if its longer side exceeds ``max_side``.

    Without the slide's ``image_size`` the thumbnail is taken as level 0 (coordinates
    stay right, being width-normalised, but the pixel size and so areas are unknown).
    """
    with Image.open(path) as opened:
        image = opened.convert("RGBA") if "A" in opened.getbands() else opened.convert("RGB")
    factor = math.ceil(max(image.size) / settings.max_side)
    if factor > 1:
        image = image.reduce(factor)
    rgb = np.asarray(image)
    thumb_width, thumb_height = image.size
    if image_size is None:
        return AnalysisImage(
            rgb=rgb, downsample=(1.0, 1.0), image_width=thumb_width, mpp=None, source="thumbnail"
        )
    width, height = image_size
    return AnalysisImage(
        rgb=rgb,
        downsample=(width / thumb_width, height / thumb_height),
        image_width=width,
        mpp=mpp,
        source="thumbnail",
    )


def _info_mpp(info: Mapping[str, Any] | None) -> float | None:
    """``micronsPerPixel`` from slide info, if usable."""
    try:
        mpp = float((info or {})["micronsPerPixel"])
    except (KeyError, TypeError, ValueError):
        return None
    return mpp if mpp > 0 and math.isfinite(mpp) else None


def get_image(job: AnalysisJob, settings: TissueSettings) -> AnalysisImage:
    """The image to analyse: a WSI level if the job has a WSI, else its thumbnail.

    The pipeline gives jobs ``open_slide()`` (raising when there is no WSI) and
    ``thumbnail_path``; both are looked up defensively so any job object works.
    """
    info_mpp = _info_mpp(job.slide_info)
    why_not_wsi = "the job offers no WSI"
    open_slide = getattr(job, "open_slide", None)
    if callable(open_slide):
        try:
            slide = open_slide()
        except Exception as e:  # whatever the reason (no WSI, unreadable), try the thumbnail
            why_not_wsi = f"the WSI cannot be opened ({type(e).__name__}: {e})"
        else:
            try:
                return read_slide(
                    slide,
                    settings,
                    fallback_mpp=info_mpp,
                    checkpoint=job.check_cancelled,
                    progress=lambda f: job.progress(5 + round(35 * f), "Reading the slide"),
                )
            finally:
                close = getattr(slide, "close", None)
                if callable(close):
                    close()
    thumbnail_path = getattr(job, "thumbnail_path", None)
    if thumbnail_path:
        return read_thumbnail(str(thumbnail_path), job.image_size, info_mpp, settings)
    raise LookupError(f"no thumbnail and no WSI to analyse ({why_not_wsi})")


# --- the analysis ---------------------------------------------------------------------


def analyse(job: AnalysisJob) -> AnalysisResult:
    """Find the tissue on the job's slide; outline it and report its area and fragments."""
    settings = TissueSettings.from_mapping(job.settings)
    job.progress(0, "Reading the slide")
    job.check_cancelled()
    image = get_image(job, settings)
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
