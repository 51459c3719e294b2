"""Tissue outlines: each region's boundaries traced, then simplified to a point cap.

Boundaries are traced with marching squares (:func:`trace`) in analysis pixel
``(row, col)`` coordinates, and simplified together with a vectorised Douglas–Peucker
(:func:`simplify_rings`: scikit-image's result without its per-point Python cost),
the tolerance doubling until all outlines together have at most ``max_points``
points (:func:`simplify_to_cap`), since the SPS draws every point.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import numpy as np
import numpy.typing as npt
from attrs import frozen
from skimage.measure import find_contours

#: Simplification never goes coarser than this many analysis pixels.
MAX_TOLERANCE_PX: Final = 64.0

#: A closed ring of ``(row, col)`` points, first point repeated last.
Ring = npt.NDArray[np.float64]


@frozen
class Traced:
    """A region's boundaries, unsimplified, in analysis pixel (row, col) coordinates."""

    outline: Ring
    holes: list[Ring]


def trace(region: Any) -> Traced:
    """Marching-squares boundaries of one region: its outer contour and its holes."""
    top, left = region.bbox[0], region.bbox[1]
    offset = np.array([top - 1, left - 1], dtype=np.float64)
    filled = np.pad(region.image_filled, 1)
    # 'high': the region's pixels are 8-connected, as labelled, so one outer contour.
    contours = find_contours(filled.astype(np.uint8), 0.5, fully_connected="high")
    outline = drop_collinear(max(contours, key=len)) + offset
    holes = []
    hole_mask = filled & ~np.pad(region.image, 1)
    if hole_mask.any():
        for hole in find_contours(hole_mask.astype(np.uint8), 0.5, fully_connected="low"):
            if len(hole) >= 4:
                holes.append(drop_collinear(hole) + offset)
    return Traced(outline=outline, holes=holes)


def drop_collinear(ring: Ring) -> Ring:
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


def simplify_rings(rings: Sequence[Ring], tolerance: float) -> list[Ring]:
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


def shoelace(rc: Ring, sx: float, sy: float) -> float:
    """The area of a ring of (row, col) points, in level-0 pixels."""
    y, x = rc[:, 0] * sy, rc[:, 1] * sx
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)


@frozen
class Simplified:
    """The simplified boundaries of each region (``(outline, holes)``, in the order
    traced), the tolerance used, the points kept, and the outlines left out to meet
    the cap."""

    rings: list[tuple[Ring, list[Ring]]]
    tolerance: float
    points: int
    omitted: int


def simplify_to_cap(traced: Sequence[Traced], tolerance: float, max_points: int) -> Simplified:
    """Simplify every boundary with ``tolerance``, coarser until ``max_points`` is met.

    If even :data:`MAX_TOLERANCE_PX` leaves too many points, holes go first, then the
    outlines of the smallest regions (``traced`` is largest first; an omitted outline
    is an empty array, and its region's area still counts).
    """
    flat = [ring for t in traced for ring in (t.outline, *t.holes)]
    while True:
        simplified = iter(simplify_rings(flat, tolerance))
        rings = [(next(simplified), [next(simplified) for _ in t.holes]) for t in traced]
        points = sum(len(o) + sum(len(h) for h in hs) for o, hs in rings)
        if points <= max_points or tolerance >= MAX_TOLERANCE_PX:
            break
        tolerance = min(MAX_TOLERANCE_PX, max(tolerance * 2, 0.5))
    omitted = 0
    if points > max_points:
        rings = [(o, []) for o, _ in rings]
        budget = max_points
        kept: list[tuple[Ring, list[Ring]]] = []
        for outline, _ in rings:  # largest regions first
            if len(outline) > budget:
                break
            kept.append((outline, []))
            budget -= len(outline)
        omitted = len(rings) - len(kept)
        rings = kept + [(np.empty((0, 2)), []) for _ in range(omitted)]
        points = max_points - budget

    return Simplified(rings=rings, tolerance=tolerance, points=points, omitted=omitted)
