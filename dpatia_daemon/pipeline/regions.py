"""Pixels for an analysis without the WSI download: regions and tiles over DZI tiles.

:class:`RegionReader` is what ``job.read_region(...)`` and ``job.tiles(...)`` use.
It serves an analysis *thread* (blocking calls) from the SPS's DZI tiles (IA-API.md
§2.5), fetched on the worker's reactor through its :class:`SPSClient` (so retries,
deadlines and the newest callback token apply), at most ``concurrency`` (16) tiles in
flight.  Memory is bounded: a fetched tile's bytes wait in a queue only until the
analysis thread decodes and pastes it, and a new fetch starts only when one was
consumed, so at most ``concurrency`` compressed tiles exist besides the answer.

Coordinates follow OpenSlide's ``read_region``: ``(x, y)`` is the top-left in
full-resolution (level-0) pixels; ``(width, height)`` the size of the answer in pixels
*at the requested resolution* (µm/px, default the scan's).  The DZI level read is the
coarsest at least as fine as asked (never upsampled) and resized down to the exact
resolution.  Outside the slide the answer is white.  The answer is an RGB
``numpy.ndarray`` of shape ``(height, width, 3)``.  Tiles name the focal plane
(``focalPlanes[0].id`` by default) and, when asked, the optical path.
"""

from __future__ import annotations

import io
import math
import queue
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Final

import numpy as np
from attrs import define, field, frozen
from PIL import Image
from twisted.internet.defer import ensureDeferred

from ..jobs import Callback
from ..sps.client import SPSClient
from .dzi import DZI, Rect

#: Tiles in flight per read (the issue's goal: 16).
DEFAULT_CONCURRENCY: Final = 16
#: How often a waiting read looks at the job's cancellation flag (seconds).
_POLL: Final = 0.2
_WHITE: Final = 255


class RegionError(Exception):
    """A region or tile could not be read (the message says why)."""


class RegionCancelled(Exception):
    """The job was cancelled while a region was read."""


@frozen
class Tile:
    """One DZI tile as :meth:`RegionReader.tiles` yields it.

    ``level`` and ``rect`` (in that level's pixels), ``full`` (the level-0 pixels it
    covers), ``mpp`` of the level and the RGB ``image`` (``(h, w, 3)`` uint8).
    """

    level: int
    col: int
    row: int
    rect: Rect
    full: Rect
    mpp: float | None
    image: np.ndarray = field(eq=False, repr=False)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        return None
    return float(value)


def dzi_of(info: dict[str, Any]) -> DZI:
    """The DZI pyramid the slide info describes; RegionError without an image size."""
    size = info.get("imageSize") if isinstance(info, dict) else None
    width = _number(size.get("width")) if isinstance(size, dict) else None
    height = _number(size.get("height")) if isinstance(size, dict) else None
    if width is None or height is None:
        raise RegionError("the slide info has no usable imageSize")
    tile = info.get("tileSize")
    tile_size = _number(tile.get("width")) if isinstance(tile, dict) else None
    return DZI(
        int(width),
        int(height),
        int(tile_size or 256),
        microns_per_pixel=_number(info.get("micronsPerPixel")),
    )


def _first_id(info: dict[str, Any], key: str) -> str | None:
    items = info.get(key)
    if isinstance(items, list) and items and isinstance(items[0], dict):
        value = items[0].get("id")
        if value is not None and str(value) != "":
            return str(value)
    return None


def tile_extension(info: dict[str, Any]) -> str:
    """The tile format to ask for: jpg, jpeg or png if offered (in that order), else jpg."""
    offered = {
        str(f.get("extension", "")).lower().lstrip(".")
        for f in info.get("availableTileFormats") or []
        if isinstance(f, dict)
    }
    return next((e for e in ("jpg", "jpeg", "png") if e in offered), "jpg")


def _decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


@define
class RegionReader:
    """Reads regions and tiles of one slide for an analysis thread.

    Collaborators: the worker's ``reactor`` (``callFromThread`` only), its ``sps``
    client, the job's ``callback`` and ``slide_id``, the slide ``info``
    (``slides/{id}/info``), and ``cancelled`` (the job's flag).  ``ext``: the tile
    format (``jpg``); ``concurrency``: tiles in flight.
    """

    reactor: Any
    sps: SPSClient
    callback: Callback = field(repr=False)
    slide_id: str
    info: dict[str, Any] = field(repr=False)
    cancelled: Callable[[], bool] = lambda: False
    ext: str = "jpg"
    concurrency: int = DEFAULT_CONCURRENCY
    dzi: DZI = field(init=False)
    #: Tiles fetched so far (for benchmarks and tests).
    fetched: int = field(default=0, init=False)

    def __attrs_post_init__(self) -> None:
        self.dzi = dzi_of(self.info)

    # --- choosing the level -------------------------------------------------------------

    def level_for(self, resolution: float | None) -> int:
        """The level to read for ``resolution`` µm/px (None: full resolution)."""
        if resolution is None:
            return self.dzi.max_level
        if self.dzi.microns_per_pixel is None:
            raise RegionError("the slide info has no micronsPerPixel: pass resolution=None")
        return self.dzi.level_for_mpp(resolution, "finer")

    # --- blocking API (analysis thread) -------------------------------------------------

    def read_region(
        self,
        x: int,
        y: int,
        width: int,
        height: int,
        resolution: float | None = None,
        *,
        focal_plane: str | None = None,
        optical_path: str | None = None,
    ) -> np.ndarray:
        """The RGB pixels of a region (see the module docstring for the coordinates)."""
        if width <= 0 or height <= 0:
            raise ValueError(f"a region needs a positive size, not {width}x{height}")
        level = self.level_for(resolution)
        down = self.dzi.downsample(level)
        # How many level pixels one answer pixel spans (>= 1: never upsample).
        factor = 1.0
        if resolution is not None:
            factor = max(1.0, resolution / self.dzi.level_mpp(level))
        lx, ly = x / down, y / down
        lw, lh = width * factor, height * factor
        x0, y0 = math.floor(lx), math.floor(ly)
        x1, y1 = math.ceil(lx + lw), math.ceil(ly + lh)
        canvas = np.full((y1 - y0, x1 - x0, 3), _WHITE, dtype=np.uint8)
        level_w, level_h = self.dzi.level_size(level)
        cols, rows = self.dzi.tile_grid(level)
        t = self.dzi.tile_size
        wanted = [
            (col, row)
            for row in range(max(0, y0 // t), min(rows, max(0, (y1 - 1) // t + 1)))
            for col in range(max(0, x0 // t), min(cols, max(0, (x1 - 1) // t + 1)))
            if x0 < level_w and y0 < level_h
        ]
        for col, row, data in self._fetch(level, wanted, focal_plane, optical_path):
            rect = self.dzi.tile_rect(level, col, row)
            pixels = _decode(data)[: rect.height, : rect.width]
            # Paste the part of the tile inside the region.
            sx0, sy0 = max(rect.x, x0), max(rect.y, y0)
            sx1 = min(rect.x + pixels.shape[1], x1)
            sy1 = min(rect.y + pixels.shape[0], y1)
            if sx1 > sx0 and sy1 > sy0:
                canvas[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = pixels[
                    sy0 - rect.y : sy1 - rect.y, sx0 - rect.x : sx1 - rect.x
                ]
        # Crop the sub-pixel offset, then resize to the asked size.
        box = (lx - x0, ly - y0, lx - x0 + lw, ly - y0 + lh)
        if box == (0, 0, canvas.shape[1], canvas.shape[0]) and (width, height) == (
            canvas.shape[1],
            canvas.shape[0],
        ):
            return canvas
        image = Image.fromarray(canvas).resize(
            (width, height),
            Image.Resampling.BOX if factor > 1 else Image.Resampling.BILINEAR,
            box=box,
        )
        return np.asarray(image)

    def tiles(
        self,
        resolution: float | None = None,
        *,
        focal_plane: str | None = None,
        optical_path: str | None = None,
    ) -> Iterator[Tile]:
        """Every DZI tile of the level for ``resolution``, decoded, in completion order
        (not row order: a slow tile does not hold back the others); ``concurrency`` in
        flight, nothing else buffered."""
        level = self.level_for(resolution)
        mpp = self.dzi.level_mpp(level) if self.dzi.microns_per_pixel else None
        wanted = [(col, row) for col, row, _ in self.dzi.tiles(level)]
        for col, row, data in self._fetch(level, wanted, focal_plane, optical_path):
            rect = self.dzi.tile_rect(level, col, row)
            yield Tile(
                level,
                col,
                row,
                rect,
                self.dzi.tile_rect_full(level, col, row),
                mpp,
                _decode(data)[: rect.height, : rect.width],
            )

    # --- the fetch pipeline ---------------------------------------------------------------

    def _fetch(
        self,
        level: int,
        wanted: Iterable[tuple[int, int]],
        focal_plane: str | None,
        optical_path: str | None,
    ) -> Iterator[tuple[int, int, bytes]]:
        """Yield ``(col, row, bytes)`` of every wanted tile, ``concurrency`` in flight.

        Runs in the analysis thread; each fetch is started on the reactor and lands in
        a queue of this call.  A failure stops new fetches and is raised here.
        """
        plane = focal_plane if focal_plane is not None else _first_id(self.info, "focalPlanes")
        todo = iter(wanted)
        landed: queue.SimpleQueue[tuple[int, int, bytes | BaseException]] = queue.SimpleQueue()
        in_flight = 0

        def start(col: int, row: int) -> None:  # in the reactor thread
            d = ensureDeferred(
                self.sps.tile(
                    self.callback,
                    self.slide_id,
                    level,
                    col,
                    row,
                    ext=self.ext,
                    focal_plane=plane,
                    optical_path=optical_path,
                )
            )
            d.addCallbacks(
                lambda data: landed.put((col, row, data)),
                lambda failure: landed.put((col, row, failure.value or Exception("failed"))),
            )

        def more() -> bool:
            nonlocal in_flight
            item = next(todo, None)
            if item is None:
                return False
            in_flight += 1
            self.reactor.callFromThread(start, *item)
            return True

        while in_flight < max(1, self.concurrency) and more():
            pass
        while in_flight:
            try:
                col, row, outcome = landed.get(timeout=_POLL)
            except queue.Empty:
                if self.cancelled():
                    raise RegionCancelled(self.slide_id) from None
                continue
            in_flight -= 1
            if isinstance(outcome, BaseException):
                raise RegionError(
                    f"tile {col}_{row} of level {level} could not be had: {outcome}"
                ) from outcome
            self.fetched += 1
            more()
            yield col, row, outcome
            if self.cancelled():
                raise RegionCancelled(self.slide_id)


__all__ = [
    "DEFAULT_CONCURRENCY",
    "RegionCancelled",
    "RegionError",
    "RegionReader",
    "Tile",
    "dzi_of",
    "tile_extension",
]
