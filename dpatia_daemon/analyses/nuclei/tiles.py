"""Counting nuclei over a whole slide, tile by tile inside the tissue, in bounded memory.

:func:`count_nuclei` is given an open slide (OpenSlide's API: ``level_dimensions``,
``level_downsamples``, ``read_region``), its pixel size and a tissue mask at low
resolution.  It lays a grid of ``tile_px`` tiles at the analysis resolution over the
slide, keeps the tiles that touch the tissue, and analyses them in ``threads``
parallel threads, each reading its tile (plus a margin, so a nucleus on a tile's edge
is seen whole by one tile and counted by the tile its centre falls in) and running
:func:`~.detection.detect_nuclei`.  At most ``2 × threads`` tiles are in flight, so
memory is a few tiles' worth whatever the slide's size; the centres found (8 bytes a
nucleus) are all that accumulates.  Between tiles the caller's ``checkpoint`` may
raise to cancel (pending tiles are then dropped), and ``progress`` gets the fraction
of tiles done.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

import numpy as np
import numpy.typing as npt
from attrs import frozen
from PIL import Image

from .detection import detect_nuclei
from .settings import NucleiSettings


@frozen
class Grid:
    """The analysis frame: level ``level`` of the slide reduced by ``factor``, so one
    analysis pixel is ``scale`` level-0 pixels (``mpp`` µm); ``size`` its (w, h)."""

    level: int
    factor: int
    scale: float
    mpp: float
    size: tuple[int, int]


@frozen
class NucleiCount:
    """What :func:`count_nuclei` found: centres in level-0 pixels (``x``, ``y``), the
    tiles analysed of those in the grid, and the analysis resolution."""

    x: npt.NDArray[np.float32]
    y: npt.NDArray[np.float32]
    tiles: int
    tiles_in_grid: int
    mpp: float


def grid_for(slide: Any, mpp: float, target_mpp: float) -> Grid:
    """The finest pyramid level no finer than ``target_mpp`` would need, and the integer
    reduction that brings it nearest (never coarser than the target)."""
    wanted = max(1.0, target_mpp / mpp)
    downsamples = [float(d) for d in slide.level_downsamples]
    level = max(
        (i for i, d in enumerate(downsamples) if d <= wanted * 1.001), key=lambda i: downsamples[i]
    )
    factor = max(1, math.floor(wanted / downsamples[level] + 1e-6))
    scale = downsamples[level] * factor
    width, height = slide.level_dimensions[0]
    return Grid(
        level, factor, scale, mpp * scale, (math.ceil(width / scale), math.ceil(height / scale))
    )


def _tiles(
    grid: Grid, tile: int, mask: npt.NDArray[np.bool_], mask_scale: tuple[float, float]
) -> tuple[list[tuple[int, int]], int]:
    """The top-left corners (analysis pixels) of the tiles that touch the tissue, and
    the number of tiles in the whole grid."""
    width, height = grid.size
    corners, total = [], 0
    for y in range(0, height, tile):
        for x in range(0, width, tile):
            total += 1
            # The tile's footprint on the mask, widened by one mask pixel.
            c0 = max(0, math.floor(x * grid.scale / mask_scale[0]) - 1)
            r0 = max(0, math.floor(y * grid.scale / mask_scale[1]) - 1)
            c1 = math.ceil((x + tile) * grid.scale / mask_scale[0]) + 1
            r1 = math.ceil((y + tile) * grid.scale / mask_scale[1]) + 1
            if mask[r0:r1, c0:c1].any():
                corners.append((x, y))
    return corners, total


def _read(slide: Any, grid: Grid, x: int, y: int, size: int) -> npt.NDArray[np.uint8]:
    """Analysis pixels ``[y, y+size) × [x, x+size)`` as RGB, composited on white."""
    level_size = size * grid.factor
    region = slide.read_region(
        (round(x * grid.scale), round(y * grid.scale)), grid.level, (level_size, level_size)
    )
    opaque = Image.new("RGB", region.size, (255, 255, 255))
    opaque.paste(region.convert("RGB"), (0, 0), region.getchannel("A"))
    if grid.factor > 1:
        opaque = opaque.reduce(grid.factor)
    return np.asarray(opaque)


def count_nuclei(
    slide: Any,
    mpp: float,
    mask: npt.NDArray[np.bool_],
    mask_scale: tuple[float, float],
    settings: NucleiSettings,
    *,
    threads: int = 1,
    checkpoint: Callable[[], None] = lambda: None,
    progress: Callable[[float], None] = lambda fraction: None,
) -> NucleiCount:
    """Find the nuclei of ``slide`` inside ``mask`` (True = tissue; one mask pixel is
    ``mask_scale`` level-0 pixels along x and y)."""
    grid = grid_for(slide, mpp, settings.target_mpp)
    tile = settings.tile_px
    margin = math.ceil(2 * math.sqrt(settings.max_area_um2 / math.pi) / grid.mpp) + 2
    corners, total = _tiles(grid, tile, mask, mask_scale)
    mask_h, mask_w = mask.shape

    def one(corner: tuple[int, int]) -> npt.NDArray[np.float32]:
        x, y = corner
        rgb = _read(slide, grid, x - margin, y - margin, tile + 2 * margin)
        found = detect_nuclei(rgb, grid.mpp, settings)
        del rgb
        rows, cols = found[:, 0] - margin, found[:, 1] - margin
        core = (rows >= 0) & (rows < tile) & (cols >= 0) & (cols < tile)
        # Analysis pixel centres → level-0 coordinates; keep those on tissue.
        xs = (x + cols[core] + 0.5) * grid.scale
        ys = (y + rows[core] + 0.5) * grid.scale
        mc = np.clip((xs / mask_scale[0]).astype(np.int64), 0, mask_w - 1)
        mr = np.clip((ys / mask_scale[1]).astype(np.int64), 0, mask_h - 1)
        on_tissue = mask[mr, mc]
        return np.stack([xs[on_tissue], ys[on_tissue]]).astype(np.float32)

    found: list[npt.NDArray[np.float32]] = []
    for done, points in enumerate(_bounded_map(one, corners, threads, checkpoint), 1):
        found.append(points)
        progress(done / len(corners))
    points = np.concatenate(found, axis=1) if found else np.empty((2, 0), np.float32)
    return NucleiCount(
        x=points[0], y=points[1], tiles=len(corners), tiles_in_grid=total, mpp=grid.mpp
    )


def _bounded_map(
    work: Callable[[tuple[int, int]], npt.NDArray[np.float32]],
    items: list[tuple[int, int]],
    threads: int,
    checkpoint: Callable[[], None],
) -> Iterator[npt.NDArray[np.float32]]:
    """``work(item)`` for every item, ``threads`` at a time, at most ``2 × threads``
    submitted ahead; results in completion order.  ``checkpoint`` runs before each
    submission; if it raises, pending items are cancelled and running ones awaited."""
    pending: set[Future[npt.NDArray[np.float32]]] = set()
    queue = iter(items)
    with ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="nuclei") as pool:
        try:
            while True:
                while len(pending) < 2 * max(1, threads):
                    item = next(queue, None)
                    if item is None:
                        break
                    checkpoint()
                    pending.add(pool.submit(work, item))
                if not pending:
                    return
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    yield future.result()
        finally:
            for future in pending:
                future.cancel()


__all__ = ["Grid", "NucleiCount", "count_nuclei", "grid_for"]
