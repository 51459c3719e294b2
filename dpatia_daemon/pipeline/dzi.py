"""Deep Zoom (DZI) level and tile maths: the one place that owns it (IA-API.md §2.5, §6).

A W×H image has ``max_level + 1`` levels, ``max_level = ceil(log2(max(W, H)))``; level
``max_level`` is full resolution and level 0 is 1×1.  Level ``L`` is the image
downsampled by ``2 ** (max_level - L)`` with sizes rounded **up** (as Microsoft DZI and
OpenSlide's ``DeepZoomGenerator`` do; the Sectra example rounds down, §2.5).  Tiles are
``tile_size`` square with ``overlap`` pixels shared with each neighbour (the SPS serves
overlap 0); the last column and row are cropped to the level's edge.

Everything here is pure integer arithmetic on frozen values: the SPS simulator uses it
to serve tiles and the pipeline to pick a thumbnail level, so both agree by construction.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Literal

from attrs import frozen


def max_level(width: int, height: int) -> int:
    """The full-resolution level of a ``width``×``height`` image: ``ceil(log2(max))``."""
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, not {width}x{height}")
    return (max(width, height) - 1).bit_length()


def ceil_div_pow2(value: int, shift: int) -> int:
    """``ceil(value / 2**shift)`` for non-negative integers, without floating point."""
    return (value + (1 << shift) - 1) >> shift


@frozen
class Rect:
    """An axis-aligned rectangle in pixels: top-left ``(x, y)`` and size ``(width, height)``."""

    x: int
    y: int
    width: int
    height: int

    @property
    def right(self) -> int:
        """One past the last column."""
        return self.x + self.width

    @property
    def bottom(self) -> int:
        """One past the last row."""
        return self.y + self.height


@frozen
class DZI:
    """The DZI pyramid of one image.

    ``microns_per_pixel`` is the level-0 (full resolution) pixel size, needed only by
    the mpp helpers.  Levels, columns and rows out of range raise :class:`IndexError`.
    """

    width: int
    height: int
    tile_size: int = 256
    overlap: int = 0
    microns_per_pixel: float | None = None

    def __attrs_post_init__(self) -> None:
        if self.width < 1 or self.height < 1:
            raise ValueError(f"image size must be positive, not {self.width}x{self.height}")
        if self.tile_size < 1:
            raise ValueError(f"tile size must be positive, not {self.tile_size}")
        if self.overlap < 0:
            raise ValueError(f"overlap must not be negative, not {self.overlap}")

    @property
    def max_level(self) -> int:
        """The full-resolution level."""
        return max_level(self.width, self.height)

    @property
    def level_count(self) -> int:
        """How many levels there are (``max_level + 1``; level 0 is 1×1)."""
        return self.max_level + 1

    def _check_level(self, level: int) -> None:
        if not 0 <= level <= self.max_level:
            raise IndexError(f"level {level} is outside 0..{self.max_level}")

    def downsample(self, level: int) -> int:
        """How many full-resolution pixels one pixel of ``level`` spans per axis."""
        self._check_level(level)
        return 1 << (self.max_level - level)

    def level_size(self, level: int) -> tuple[int, int]:
        """``(width, height)`` of ``level``: the full size divided by its downsample, rounded up."""
        self._check_level(level)
        shift = self.max_level - level
        return ceil_div_pow2(self.width, shift), ceil_div_pow2(self.height, shift)

    def tile_grid(self, level: int) -> tuple[int, int]:
        """``(columns, rows)`` of tiles at ``level``."""
        width, height = self.level_size(level)
        return math.ceil(width / self.tile_size), math.ceil(height / self.tile_size)

    def tile_count(self, level: int) -> int:
        """How many tiles ``level`` has."""
        cols, rows = self.tile_grid(level)
        return cols * rows

    def tile_rect(self, level: int, col: int, row: int) -> Rect:
        """Where tile ``(col, row)`` of ``level`` lies in that level's pixels.

        With overlap ``o`` a tile reaches ``o`` pixels into each existing neighbour;
        edge tiles are cropped to the level, so they may be smaller than ``tile_size``.
        """
        cols, rows = self.tile_grid(level)
        if not (0 <= col < cols and 0 <= row < rows):
            raise IndexError(f"tile {col}_{row} is outside {cols}x{rows} at level {level}")
        width, height = self.level_size(level)
        x0 = col * self.tile_size - (self.overlap if col > 0 else 0)
        y0 = row * self.tile_size - (self.overlap if row > 0 else 0)
        x1 = min(width, (col + 1) * self.tile_size + self.overlap)
        y1 = min(height, (row + 1) * self.tile_size + self.overlap)
        return Rect(x0, y0, x1 - x0, y1 - y0)

    def tile_rect_full(self, level: int, col: int, row: int) -> Rect:
        """The full-resolution pixels tile ``(col, row)`` of ``level`` covers, clipped to
        the image (edge tiles of a ceil-rounded level cover less than a full downsample)."""
        rect = self.tile_rect(level, col, row)
        d = self.downsample(level)
        x0, y0 = rect.x * d, rect.y * d
        x1, y1 = min(self.width, rect.right * d), min(self.height, rect.bottom * d)
        return Rect(x0, y0, x1 - x0, y1 - y0)

    def tiles(self, level: int) -> Iterator[tuple[int, int, Rect]]:
        """Every ``(col, row, rect)`` of ``level``, row by row."""
        cols, rows = self.tile_grid(level)
        for row in range(rows):
            for col in range(cols):
                yield col, row, self.tile_rect(level, col, row)

    def level_mpp(self, level: int) -> float:
        """Microns per pixel at ``level`` (needs ``microns_per_pixel``)."""
        if self.microns_per_pixel is None:
            raise ValueError("microns_per_pixel is unknown")
        return self.microns_per_pixel * self.downsample(level)

    def level_for_mpp(self, target_mpp: float, mode: Literal["finer", "nearest"] = "finer") -> int:
        """The level to read for ``target_mpp`` microns per pixel.

        ``finer``: the coarsest level at least as fine as the target (never
        upsample; full resolution when the target is finer than the scan).
        ``nearest``: the level nearest the target on a log scale (ties go finer).
        """
        if target_mpp <= 0:
            raise ValueError(f"target mpp must be positive, not {target_mpp}")
        if self.microns_per_pixel is None:
            raise ValueError("microns_per_pixel is unknown")
        # A small tolerance keeps exact powers of two (e.g. 0.25 * 64 == 16.0) on their level.
        steps = math.log2(target_mpp / self.microns_per_pixel)
        if mode == "nearest":
            k = math.floor(steps + 0.5 - 1e-9)
        elif mode == "finer":
            k = math.floor(steps + 1e-9)
        else:
            raise ValueError(f"unknown mode {mode!r}")
        k = min(max(k, 0), self.max_level)
        return self.max_level - k

    def level_for_size(self, max_side: int) -> int:
        """The smallest level whose longer side is at least ``max_side`` (or full resolution)."""
        if max_side < 1:
            raise ValueError(f"size must be positive, not {max_side}")
        for level in range(self.level_count):
            if max(self.level_size(level)) >= max_side:
                return level
        return self.max_level


__all__ = ["DZI", "Rect", "ceil_div_pow2", "max_level"]
