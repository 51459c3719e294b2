"""What a pathologist would see of a result: its shapes, drawn over a slide thumbnail.

:func:`shapes_of` turns a stored result's ``data.result`` into flat :class:`Shape`
records in width-normalised coordinates (x in [0, 1], y in [0, H/W]; IA-API.md §2.6),
accepting both primitive forms (a list of items, or one item object) and the
``patchCollection`` form.  Anything malformed is skipped, not fatal: the page must show
what an app sends, bugs included.  The web page draws the same records as SVG;
:func:`render_overlay` draws them with Pillow (the demo's PNG).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

from attrs import frozen
from PIL import Image, ImageDraw, ImageFont

from ..models import Result, unstructure

ShapeKind = Literal["polygon", "polyline", "label", "patch"]

DEFAULT_STROKE = "#00FF00"
#: Colours of patchCollection tags, by tag index.
TAG_COLOURS = ("#1F77B4", "#FF7F0E", "#2CA02C", "#D62728", "#9467BD", "#8C564B")
_COLOUR = re.compile(r"^(#[0-9a-fA-F]{3,8}|rgba?\([0-9., %]+\)|[a-zA-Z]{3,20})$")


@frozen
class Shape:
    """One thing to draw: ``points`` width-normalised; ``text`` for labels."""

    kind: ShapeKind
    points: list[tuple[float, float]]
    stroke: str = DEFAULT_STROKE
    fill: str | None = None
    width: int = 2
    text: str | None = None

    def to_json(self) -> dict[str, Any]:
        """For the page."""
        return {
            "kind": self.kind,
            "points": [[x, y] for x, y in self.points],
            "stroke": self.stroke,
            "fill": self.fill,
            "width": self.width,
            "text": self.text,
        }


#: A font with the glyphs results use (µm, mm²), where the system has one.
_FONT_FILES = (
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
)
#: Pillow's bundled default font has no glyph for these: spell them in ASCII there.
_ASCII = str.maketrans({"²": "2", "³": "3", "µ": "u", "μ": "u"})


def _font(size: int) -> Any:
    for path in _FONT_FILES:
        try:
            return ImageFont.truetype(path, size)
        except OSError:
            continue
    return ImageFont.load_default(size=size)


def _printable(text: str, font: Any) -> str:
    """``text`` as ``font`` can draw it (Pillow's default font lacks ² and µ)."""
    if getattr(font, "path", None) in _FONT_FILES:
        return text
    return text.translate(_ASCII)


def _colour(value: Any, default: str | None) -> str | None:
    """A CSS colour the page and Pillow can use, or ``default`` (never raw markup)."""
    if isinstance(value, str) and _COLOUR.match(value.strip()):
        return value.strip()
    return default


def _point(value: Any) -> tuple[float, float] | None:
    if not isinstance(value, dict):
        return None
    x, y = value.get("x"), value.get("y")
    if isinstance(x, bool) or isinstance(y, bool):
        return None
    if not isinstance(x, int | float) or not isinstance(y, int | float):
        return None
    return float(x), float(y)


def _points(value: Any) -> list[tuple[float, float]]:
    raw = value.get("points") if isinstance(value, dict) else None
    if not isinstance(raw, list):
        return []
    return [p for p in (_point(v) for v in raw) if p is not None]


def _items(content: Any) -> Iterable[dict[str, Any]]:
    if isinstance(content, dict):
        return [content]
    if isinstance(content, list):
        return [item for item in content if isinstance(item, dict)]
    return []


def _primitive(content: Any) -> list[Shape]:
    shapes: list[Shape] = []
    for item in _items(content):
        raw_style = item.get("style")
        style: dict[str, Any] = raw_style if isinstance(raw_style, dict) else {}
        stroke = _colour(style.get("strokeStyle"), DEFAULT_STROKE) or DEFAULT_STROKE
        fill = _colour(style.get("fillStyle"), None)
        size = style.get("size")
        width = (
            size if isinstance(size, int) and not isinstance(size, bool) and 0 < size <= 50 else 2
        )
        for kind in ("polygons", "polylines"):
            for poly in item.get(kind) or []:
                points = _points(poly)
                if len(points) >= 2:
                    shapes.append(
                        Shape(
                            kind="polygon" if kind == "polygons" else "polyline",
                            points=points,
                            stroke=stroke,
                            fill=fill if kind == "polygons" else None,
                            width=width,
                        )
                    )
        for label in item.get("labels") or []:
            if not isinstance(label, dict):
                continue
            where = _point(label.get("location"))
            if where is not None:
                shapes.append(
                    Shape(
                        kind="label",
                        points=[where],
                        stroke=stroke,
                        text=str(label.get("label", ""))[:200],
                    )
                )
    return shapes


def _patch_collection(content: Any, image_width: int | None) -> list[Shape]:
    if not isinstance(content, dict):
        return []
    shapes = [
        Shape(kind="polygon", points=points, stroke="#FFFFFF", width=2)
        for points in (_points(p) for p in content.get("polygons") or [])
        if len(points) >= 2
    ]
    patch_px = content.get("patchSize")
    half = 0.005
    if isinstance(patch_px, int | float) and image_width:
        half = max(float(patch_px) / image_width / 2, 0.001)
    for patch in content.get("patches") or []:
        if not isinstance(patch, dict):
            continue
        where = _point(patch.get("position"))
        if where is None:
            continue
        tag = patch.get("tag")
        colour = TAG_COLOURS[tag % len(TAG_COLOURS)] if isinstance(tag, int) else DEFAULT_STROKE
        x, y = where
        shapes.append(
            Shape(
                kind="patch",
                points=[
                    (x - half, y - half),
                    (x + half, y - half),
                    (x + half, y + half),
                    (x - half, y + half),
                ],
                stroke=colour,
                fill=colour,
                width=1,
            )
        )
    return shapes


def shapes_of(
    result: Result | dict[str, Any] | None, image_width: int | None = None
) -> list[Shape]:
    """The shapes of a result (primitive, either form, or patchCollection)."""
    if result is None:
        return []
    data = unstructure(result) if isinstance(result, Result) else result
    payload = (data.get("data") or {}).get("result") if isinstance(data, dict) else None
    if not isinstance(payload, dict):
        return []
    if payload.get("type") == "primitive":
        return _primitive(payload.get("content"))
    if payload.get("type") == "patchCollection":
        return _patch_collection(payload.get("content"), image_width)
    return []


def _rgba(colour: str | None, alpha: int) -> tuple[int, int, int, int] | None:
    if colour is None:
        return None
    from PIL import ImageColor

    try:
        rgb = ImageColor.getrgb(colour)
    except ValueError:
        return None
    if len(rgb) == 4:
        return rgb  # type: ignore[return-value]
    return (rgb[0], rgb[1], rgb[2], alpha)


def render_overlay(base: Image.Image, shapes: Iterable[Shape]) -> Image.Image:
    """``base`` (a thumbnail of the whole slide) with ``shapes`` drawn over it.

    Coordinates are width-normalised, so one scale, the thumbnail's width, maps both
    axes.  Fills are translucent, as in the viewer.
    """
    scale = base.width
    layer = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    font = _font(max(12, base.width // 45))
    for shape in shapes:
        pts = [(x * scale, y * scale) for x, y in shape.points]
        stroke = _rgba(shape.stroke, 255) or (0, 255, 0, 255)
        if shape.kind in ("polygon", "patch"):
            fill = _rgba(shape.fill, 90)
            if fill is not None:
                draw.polygon(pts, fill=fill)
            draw.line([*pts, pts[0]], fill=stroke, width=max(1, shape.width), joint="curve")
        elif shape.kind == "polyline":
            draw.line(pts, fill=stroke, width=max(1, shape.width), joint="curve")
        elif shape.kind == "label" and shape.text:
            x, y = pts[0]
            box = draw.textbbox((x, y), _printable(shape.text, font), font=font)
            draw.rectangle((box[0] - 3, box[1] - 2, box[2] + 3, box[3] + 2), fill=(0, 0, 0, 150))
            draw.text((x, y), _printable(shape.text, font), fill=stroke, font=font)
    out = base.convert("RGBA")
    out.alpha_composite(layer)
    return out.convert("RGB")


def render_result_png(
    thumbnail: Image.Image,
    result: Result | dict[str, Any] | None,
    path: str | Path | None = None,
    *,
    image_width: int | None = None,
    title: str | None = None,
    others: Sequence[Result | dict[str, Any]] = (),
) -> Image.Image:
    """The thumbnail with the result (and ``others``, e.g. the other regions' results)
    drawn over it and a caption strip below giving the title, ``displayResult`` and
    ``displayProperties`` of ``result``; saved as PNG at ``path`` if given."""
    data = unstructure(result) if isinstance(result, Result) else (result or {})
    shapes = [s for other in others for s in shapes_of(other, image_width)]
    drawn = render_overlay(thumbnail, [*shapes, *shapes_of(data, image_width)])
    lines = [title] if title else []
    lines.append(str(data.get("displayResult") or "(no result)"))
    props = data.get("displayProperties") or {}
    if isinstance(props, dict):
        lines += [f"{k}: {v}" for k, v in props.items()]
    font = _font(16)
    strip = 10 + 22 * len(lines)
    canvas = Image.new("RGB", (drawn.width, drawn.height + strip), (255, 255, 255))
    canvas.paste(drawn, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text(
            (8, drawn.height + 6 + 22 * i),
            _printable(line[:200], font),
            fill=(20, 20, 20),
            font=font,
        )
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        canvas.save(path, "PNG")
    return canvas


__all__ = ["Shape", "render_overlay", "render_result_png", "shapes_of"]
