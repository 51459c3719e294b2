"""Painted nuclei for the simulator's slides: where they are, and how they are drawn.

A nuclei analysis needs a ground truth as much as a tissue analysis does, so the
nuclei are placed first (:func:`place_nuclei`: a seeded jittered grid inside the
tissue, none touching another, none cut by the tissue's edge) and only then painted
(:func:`paint_nuclei`), region by region: a tile-by-tile generator paints the nuclei
that reach into each tile, and the count recorded in the slide's manifest is exactly
the number painted.

They look like haematoxylin-stained nuclei at 0.25–1 µm/px: dark blue-purple ellipses
6–9 µm across (radii :data:`RADIUS_UM`), axis-aligned with a random aspect, each a
shade of its own (optical density × 0.85–1.15), about :data:`SPACING_UM` apart with
:data:`OCCUPANCY` of the grid cells filled — some 3 000 nuclei per mm² of tissue, as
in a cellular stroma.  The jitter is small enough that two nuclei never touch, so the
count is unambiguous.
"""

from __future__ import annotations

import math
from typing import Final

import numpy as np
import numpy.typing as npt
from attrs import frozen
from PIL import Image, ImageDraw

#: The smallest and largest semi-axis of a nucleus, in µm.
RADIUS_UM: Final = (3.0, 4.5)
#: The grid the nuclei are placed on, in µm (centre to centre before jitter).
SPACING_UM: Final = 13.0
#: The fraction of grid cells (inside the tissue) that hold a nucleus.
OCCUPANCY: Final = 0.45
#: The least gap between two nuclei, in µm (the jitter keeps at least this).
GAP_UM: Final = 1.0

#: The haematoxylin colour of a nucleus of shade 1, per palette (rgb2hed gives these
#: an H of about 0.11 and 0.14; the H&E stroma is below 0.02, the Ki-67 counterstain
#: below 0.06).
COLOURS: Final = {"H&E": (88, 50, 138), "IHC": (66, 52, 122)}

Floats = npt.NDArray[np.float32]


@frozen
class Nuclei:
    """Nuclei in level-0 pixels: centres ``x``, ``y``, semi-axes ``rx``, ``ry`` and
    ``shade`` (a factor on the colour's optical density), one entry each."""

    x: Floats
    y: Floats
    rx: Floats
    ry: Floats
    shade: Floats

    @property
    def count(self) -> int:
        """How many there are."""
        return len(self.x)


def place_nuclei(
    mask: npt.NDArray[np.bool_],
    mask_downsample: float,
    microns_per_pixel: float,
    rng: np.random.Generator,
) -> Nuclei:
    """Nuclei inside ``mask`` (True = tissue), none touching another or the edge.

    ``mask`` covers the slide at ``mask_downsample`` level-0 pixels per mask pixel
    (1 for a full-resolution mask; a coarse one for a slide too big for memory).  A
    nucleus is kept only if its centre and the four ends of its axes, pushed out by
    one mask pixel, are all tissue: it is then painted whole, and counted.
    """
    height, width = mask.shape
    spacing = SPACING_UM / microns_per_pixel
    r_low, r_high = (r / microns_per_pixel for r in RADIUS_UM)
    jitter = max(0.0, (spacing - 2 * r_high - GAP_UM / microns_per_pixel) / 2)
    full_w, full_h = width * mask_downsample, height * mask_downsample
    gx = np.arange(spacing / 2, full_w, spacing, dtype=np.float32)
    gy = np.arange(spacing / 2, full_h, spacing, dtype=np.float32)
    xs, ys = (a.ravel() for a in np.meshgrid(gx, gy))
    keep = rng.random(xs.size) < OCCUPANCY
    xs, ys = xs[keep], ys[keep]
    n = xs.size
    xs = xs + rng.uniform(-jitter, jitter, n).astype(np.float32)
    ys = ys + rng.uniform(-jitter, jitter, n).astype(np.float32)
    rx = rng.uniform(r_low, r_high, n).astype(np.float32)
    ry = (rx * rng.uniform(0.7, 1.0, n)).astype(np.float32)
    swap = rng.random(n) < 0.5
    rx, ry = np.where(swap, ry, rx), np.where(swap, rx, ry)
    shade = rng.uniform(0.85, 1.15, n).astype(np.float32)
    inside = np.ones(n, bool)
    reach_x, reach_y = rx + mask_downsample, ry + mask_downsample
    for dx, dy in ((0, 0), (-1, 0), (1, 0), (0, -1), (0, 1)):
        col = np.floor((xs + dx * reach_x) / mask_downsample).astype(np.int64)
        row = np.floor((ys + dy * reach_y) / mask_downsample).astype(np.int64)
        valid = (col >= 0) & (col < width) & (row >= 0) & (row < height)
        inside &= valid
        inside[valid] &= mask[row[valid], col[valid]]
    return Nuclei(x=xs[inside], y=ys[inside], rx=rx[inside], ry=ry[inside], shade=shade[inside])


def colour_of(stain: str) -> tuple[int, int, int]:
    """The nucleus colour of a stain's palette (H&E, else the IHC counterstain)."""
    return COLOURS["H&E"] if stain in ("H&E", "HE") else COLOURS["IHC"]


def paint_nuclei(
    image: Image.Image,
    origin: tuple[int, int],
    nuclei: Nuclei,
    colour: tuple[int, int, int],
) -> int:
    """Paint, into ``image`` (whose top-left is level-0 pixel ``origin``), every nucleus
    that reaches into it; return how many reached it."""
    x0, y0 = origin
    w, h = image.size
    near = (
        (nuclei.x + nuclei.rx >= x0)
        & (nuclei.x - nuclei.rx < x0 + w)
        & (nuclei.y + nuclei.ry >= y0)
        & (nuclei.y - nuclei.ry < y0 + h)
    )
    draw = ImageDraw.Draw(image)
    density = [-math.log10(max(c, 1) / 255) for c in colour]
    for x, y, rx, ry, shade in zip(
        nuclei.x[near] - x0,
        nuclei.y[near] - y0,
        nuclei.rx[near],
        nuclei.ry[near],
        nuclei.shade[near],
        strict=True,
    ):
        fill = tuple(round(255 * 10 ** (-d * float(shade))) for d in density)
        draw.ellipse((x - rx, y - ry, x + rx, y + ry), fill=fill)
    return int(near.sum())


__all__ = ["COLOURS", "Nuclei", "colour_of", "paint_nuclei", "place_nuclei"]
