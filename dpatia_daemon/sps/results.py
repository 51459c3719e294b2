"""Builders for the results dpatia stores at the SPS, and the status frames users see.

A pathologist sees only the result annotation on the slide, so every state of a job
has a frame here: queued, progress, failed, cancelled.  Frames are drawn as a
full-slide rectangle with a label in the top-left corner (as the Sectra examples do)
and carry ``Status``/``Progress`` display properties; each state has its own stroke
colour so a failure cannot be mistaken for work in progress.

Choices from IA-API.md §6 live here and nowhere else: primitive content is a *list*
of items; coordinates are normalised by the image width (y runs to height/width);
``data.context`` is always an object.  ``data.context["dpatia"]`` records the job id,
the job key and the state, so the daemon can tell its own frames from final answers
and each region's result from another's: a region job (taggedPolygon, multiArea) owns
the results that record its key, and its frames outline its region instead of the
whole slide.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

import attrs

from ..models import (
    Label,
    Point,
    Polygon,
    PrimitiveItem,
    Result,
    ResultData,
    ResultPayload,
    Style,
    unstructure,
)


class Status(StrEnum):
    """What a frame says about its job; the value is the ``Status`` display property."""

    QUEUED = "Queued"
    RUNNING = "Running"
    DONE = "Done"
    FAILED = "Failed"
    CANCELLED = "Cancelled"


STYLES: dict[Status, Style] = {
    Status.QUEUED: Style(strokeStyle="#F0C020"),
    Status.RUNNING: Style(strokeStyle="#F0C020"),
    Status.FAILED: Style(strokeStyle="#E02020", fillStyle=None, size=3),
    Status.CANCELLED: Style(strokeStyle="#909090"),
}

#: Key of dpatia's own bookkeeping inside ``data.context``.
CONTEXT_KEY = "dpatia"


def slide_frame(image_size: tuple[int, int] | None) -> list[Polygon]:
    """The full-slide rectangle in width-normalised coordinates (none if size unknown)."""
    if not image_size or image_size[0] <= 0 or image_size[1] <= 0:
        return []
    width, height = image_size
    max_y = height / width
    corners = [(0.0, 0.0), (1.0, 0.0), (1.0, max_y), (0.0, max_y), (0.0, 0.0)]
    return [Polygon(points=[Point(x, y) for x, y in corners])]


def _points(value: Any) -> list[Point]:
    points = value.get("points") if isinstance(value, dict) else None
    out: list[Point] = []
    for p in points if isinstance(points, list) else []:
        x, y = (p.get("x"), p.get("y")) if isinstance(p, dict) else (None, None)
        if isinstance(x, int | float) and isinstance(y, int | float) and not isinstance(x, bool):
            out.append(Point(float(x), float(y)))
    return out


def region_polygons(input: dict[str, Any] | None) -> list[Polygon]:
    """The polygons a taggedPolygon / multiArea input selects (none for whole-slide)."""
    content = (input or {}).get("content")
    if not isinstance(content, dict):
        return []
    kind = (input or {}).get("type")
    raw = [content.get("polygon")] if kind == "taggedPolygon" else content.get("polygons")
    polygons = [Polygon(points=_points(p)) for p in raw if p] if isinstance(raw, list) else []
    return [p for p in polygons if p.points]


def image_size_of(info: dict[str, Any] | None) -> tuple[int, int] | None:
    """Read ``imageSize`` from slide info / imageInfo, tolerating its absence."""
    try:
        size = (info or {})["imageSize"]
        width, height = int(size["width"]), int(size["height"])
    except (KeyError, TypeError, ValueError):
        return None
    return (width, height) if width > 0 and height > 0 else None


def status_frame(
    *,
    slide_id: str,
    status: Status,
    text: str,
    job_id: str,
    application_version: str,
    image_size: tuple[int, int] | None = None,
    progress: int | None = None,
    error: str | None = None,
    key: str | None = None,
    region: list[Polygon] | None = None,
) -> Result:
    """A result that shows a job's state: ``"<display> — <text>"`` on the slide.

    Drawn as ``region`` (a region job's selection) if given, else as the full-slide
    rectangle; ``key`` (the job's key) is recorded so the job finds its result again.
    """
    label = text if progress is None else f"{text} ({progress} %)"
    properties: dict[str, str | int | float] = {"Status": status.value}
    if progress is not None:
        properties["Progress"] = f"{progress} %"
    if error:
        properties["Error"] = error[:500]
    corner = Point(0.01, 0.01)
    if region:
        points = [p for polygon in region for p in polygon.points]
        corner = Point(min(p.x for p in points), min(p.y for p in points))
    item = PrimitiveItem(
        style=STYLES.get(status, STYLES[Status.RUNNING]),
        polygons=list(region) if region else slide_frame(image_size),
        labels=[Label(location=corner, label=label)],
    )
    mine: dict[str, Any] = {"jobId": job_id, "status": status.value}
    if key is not None:
        mine["key"] = key
    return Result(
        slideId=slide_id,
        displayResult=label,
        displayProperties=properties,
        applicationVersion=application_version,
        data=ResultData(
            context={CONTEXT_KEY: mine},
            result=ResultPayload(type="primitive", content=[unstructure(item)]),
        ),
    )


def replacing(stored: Result, new: Result) -> Result:
    """``new`` with the identity (id, versionId) of ``stored``, ready for an update."""
    return attrs.evolve(new, id=stored.id, versionId=stored.versionId)


def frame_status(result: Result) -> Status | None:
    """The status recorded in one of dpatia's frames, or None for any other result."""
    context = result.data.context or {}
    mine = context.get(CONTEXT_KEY)
    if not isinstance(mine, dict):
        return None
    try:
        return Status(str(mine.get("status")))
    except ValueError:
        return None


def result_key(result: Result) -> str | None:
    """The job key recorded in one of dpatia's results, or None (not ours, or older)."""
    mine = (result.data.context or {}).get(CONTEXT_KEY)
    key = mine.get("key") if isinstance(mine, dict) else None
    return key if isinstance(key, str) else None


def latest(results: list[Result], key: str | None = None, *, region: bool = False) -> Result | None:
    """The app's latest result for a slide: the highest id (list order is undocumented).

    With ``key``, only the results a job of that key may reuse: the ones recording
    ``key``; for a whole-slide job (not ``region``) also those recording no key at all
    (results stored before keys were recorded), never a region's.
    """
    stored = [
        r
        for r in results
        if r.id is not None
        and (key is None or result_key(r) == key or (not region and result_key(r) is None))
    ]
    return max(stored, key=lambda r: r.id or 0) if stored else None
