"""Small builders of what an analysis draws: rectangles, labels and styled items.

Coordinates are width-normalised (x in [0, 1], y in [0, height/width]), as the SPS
wants them; :mod:`dpatia_daemon.analyses` re-exports these builders.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..models import Label, Point, Polygon, PrimitiveItem, Style


def rectangle(x0: float, y0: float, x1: float, y1: float) -> Polygon:
    """A closed axis-aligned rectangle from (x0, y0) to (x1, y1), width-normalised."""
    corners = [(x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0)]
    return Polygon(points=[Point(x, y) for x, y in corners])


def label(x: float, y: float, text: str) -> Label:
    """A text label whose top-left corner is at (x, y), width-normalised."""
    return Label(location=Point(x, y), label=text)


def item(
    *,
    stroke: str = "#00C000",
    fill: str | None = None,
    size: int | None = None,
    polygons: Sequence[Polygon] = (),
    polylines: Sequence[Polygon] = (),
    labels: Sequence[Label] = (),
) -> PrimitiveItem:
    """One primitive item: a style and the shapes drawn with it."""
    return PrimitiveItem(
        style=Style(strokeStyle=stroke, fillStyle=fill, size=size),
        polygons=list(polygons),
        polylines=list(polylines),
        labels=list(labels),
    )


__all__ = ["item", "label", "rectangle"]
