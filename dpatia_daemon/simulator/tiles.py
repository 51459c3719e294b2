"""DZI tiles and thumbnails rendered from the real pyramid of a generated slide.

:class:`PyramidReader` reads regions of one TIFF pyramid level straight from its JPEG
tiles (tifffile + imagecodecs), so a DZI tile that coincides with a pyramid level is
exactly the stored pixels; levels between and above the pyramid are box-downsampled
from the nearest finer level.  (OpenSlide's ``read_region`` takes level-0 coordinates
and divides them by a level downsample such as 1.99973 for an odd width, which shifts
pixels by a fraction and resamples; reading the level directly avoids that.)

:class:`TileServer` owns one reader per slide, an LRU cache of encoded tiles and
thumbnails, and runs all decoding and encoding in a thread pool (never on the reactor
thread).  Its :meth:`TileServer.renderer` plugs into :class:`~.fake.FakeSlide`.
"""

from __future__ import annotations

import io
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np
from attrs import define, field
from PIL import Image
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.threads import deferToThreadPool

from ..pipeline.dzi import DZI

K = TypeVar("K")
V = TypeVar("V")

#: Runs ``f(*args)`` somewhere (a thread pool) and fires with its result.
Runner = Callable[..., "Deferred[Any]"]

JPEG_QUALITY = 90


class LRU(Generic[K, V]):
    """A small thread-safe least-recently-used map."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        """The value, marked as recently used, or ``None``."""
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: K, value: V) -> None:
        """Store a value, evicting the least recently used beyond ``size``."""
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


class PyramidReader:
    """Regions of the levels of one tiled TIFF pyramid, decoded tile by tile.

    Thread-safe: tiles are read with ``os.pread`` on one descriptor and decoded tiles
    are cached (``cache_tiles`` of them).
    """

    def __init__(self, path: Path, cache_tiles: int = 128) -> None:
        import tifffile

        self.path = path
        self._tif = tifffile.TiffFile(path)
        self._fd = os.open(path, os.O_RDONLY)
        self.levels = [page for page in self._tif.pages if page.is_tiled]  # type: ignore[union-attr]
        if not self.levels:
            raise ValueError(f"{path}: no tiled pages")
        self.sizes = [(int(p.imagewidth), int(p.imagelength)) for p in self.levels]  # type: ignore[union-attr]
        self._cache: LRU[tuple[int, int], np.ndarray] = LRU(cache_tiles)

    def close(self) -> None:
        """Release the file."""
        os.close(self._fd)
        self._tif.close()

    def _tile(self, level: int, index: int) -> np.ndarray:
        cached = self._cache.get((level, index))
        if cached is not None:
            return cached
        page: Any = self.levels[level]
        offset, count = page.dataoffsets[index], page.databytecounts[index]
        data = os.pread(self._fd, count, offset)
        decoded, _, _ = page.decode(data, index, jpegtables=page.jpegtables)
        tile = np.asarray(decoded).reshape(page.tilelength, page.tilewidth, -1)[:, :, :3]
        self._cache.put((level, index), tile)
        return tile

    def read(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """Pixels ``[y:y+height, x:x+width]`` of pyramid ``level`` (RGB, clipped to it)."""
        page: Any = self.levels[level]
        level_w, level_h = self.sizes[level]
        x1, y1 = min(level_w, x + width), min(level_h, y + height)
        out = np.empty((y1 - y, x1 - x, 3), np.uint8)
        tw, th = page.tilewidth, page.tilelength
        cols = -(-level_w // tw)
        for row in range(y // th, -(-y1 // th)):
            for col in range(x // tw, -(-x1 // tw)):
                tile = self._tile(level, row * cols + col)
                tx0, ty0 = col * tw, row * th
                sx0, sy0 = max(x, tx0), max(y, ty0)
                sx1, sy1 = min(x1, tx0 + tw), min(y1, ty0 + th)
                out[sy0 - y : sy1 - y, sx0 - x : sx1 - x] = tile[
                    sy0 - ty0 : sy1 - ty0, sx0 - tx0 : sx1 - tx0
                ]
        return out


def render_dzi_region(
    reader: PyramidReader, dzi: DZI, level: int, x: int, y: int, width: int, height: int
) -> Image.Image:
    """A region of DZI ``level`` (in that level's pixels) from the nearest finer pyramid level.

    Pyramid level ``k`` is DZI level ``max_level - k`` (both halve with ceil sizes);
    above the pyramid the region is read from its smallest level and box-reduced.
    """
    k_wanted = dzi.max_level - level
    k = min(k_wanted, len(reader.levels) - 1)
    factor = 1 << (k_wanted - k)
    if reader.sizes[k] != dzi.level_size(dzi.max_level - k):
        raise ValueError(f"{reader.path}: pyramid level {k} does not match DZI sizes")
    pixels = reader.read(k, x * factor, y * factor, width * factor, height * factor)
    image = Image.fromarray(pixels, "RGB")
    if factor > 1:
        image = image.reduce(factor)  # ceil sizes, matching the DZI level's edge
    return image


def encode(image: Image.Image, ext: str) -> bytes:
    """Encode as JPEG (``jpg``/``jpeg``) or PNG (``png``)."""
    out = io.BytesIO()
    if ext == "png":
        image.save(out, "PNG", compress_level=1)
    else:
        image.save(out, "JPEG", quality=JPEG_QUALITY)
    return out.getvalue()


@define
class TileSlide:
    """One slide the tile server knows: its pyramid file and DZI geometry."""

    path: Path
    dzi: DZI
    reader: PyramidReader | None = None


def thread_runner(reactor: Any) -> Runner:
    """A runner using ``reactor``'s thread pool."""

    def run(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        return deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)

    return run


def inline_runner(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
    """Run at once in the calling thread (for in-memory tests)."""
    return maybeDeferred(f, *args)


@define
class TileServer:
    """Encoded DZI tiles and thumbnails of the generated slides, cached.

    ``run`` executes the CPU work (decode, resample, encode) off the reactor thread:
    :func:`thread_runner` in the simulator, :func:`inline_runner` in memory tests.
    """

    run: Runner
    cache_size: int = 512
    slides: dict[str, TileSlide] = field(factory=dict)
    _cache: LRU[tuple[Any, ...], bytes] = field(init=False)
    _lock: threading.Lock = field(factory=threading.Lock, init=False)

    def __attrs_post_init__(self) -> None:
        self._cache = LRU(self.cache_size)

    def add(self, slide_id: str, path: Path, dzi: DZI) -> None:
        """Serve ``slide_id`` from the pyramid at ``path``."""
        self.slides[slide_id] = TileSlide(path=path, dzi=dzi)

    def close(self) -> None:
        """Close every open pyramid."""
        for slide in self.slides.values():
            if slide.reader is not None:
                slide.reader.close()
                slide.reader = None

    def _reader(self, slide: TileSlide) -> PyramidReader:
        with self._lock:
            if slide.reader is None:
                slide.reader = PyramidReader(slide.path)
            return slide.reader

    def renderer(self, slide_id: str) -> Callable[[int, int, int, str], Deferred[bytes | None]]:
        """The ``tile_renderer`` of a :class:`~.fake.FakeSlide` for ``slide_id``."""

        def render(level: int, col: int, row: int, ext: str) -> Deferred[bytes | None]:
            return self.tile(slide_id, level, col, row, ext)

        return render

    def tile(
        self, slide_id: str, level: int, col: int, row: int, ext: str
    ) -> Deferred[bytes | None]:
        """The encoded tile, or ``None`` when the slide, level or tile does not exist."""
        ext = "jpg" if ext == "jpeg" else ext
        slide = self.slides.get(slide_id)
        if slide is None or not 0 <= level <= slide.dzi.max_level:
            return succeed(None)
        cols, rows = slide.dzi.tile_grid(level)
        if not (0 <= col < cols and 0 <= row < rows):
            return succeed(None)
        key = ("tile", slide_id, level, col, row, ext)
        cached = self._cache.get(key)
        if cached is not None:
            return succeed(cached)

        def work() -> bytes:
            rect = slide.dzi.tile_rect(level, col, row)
            image = render_dzi_region(
                self._reader(slide), slide.dzi, level, rect.x, rect.y, rect.width, rect.height
            )
            return encode(image, ext)

        def store(data: bytes) -> bytes:
            self._cache.put(key, data)
            return data

        return self.run(work).addCallback(store)

    def thumbnail_image(self, slide_id: str, max_side: int = 512) -> Deferred[Image.Image]:
        """The whole slide scaled so its longer side is ``max_side`` (RGB)."""
        slide = self.slides[slide_id]

        def work() -> Image.Image:
            dzi = slide.dzi
            level = dzi.level_for_size(max_side)
            width, height = dzi.level_size(level)
            image = render_dzi_region(self._reader(slide), dzi, level, 0, 0, width, height)
            scale = max_side / max(dzi.width, dzi.height)
            size = (max(1, round(dzi.width * scale)), max(1, round(dzi.height * scale)))
            if image.size != size:
                image = image.resize(size, Image.Resampling.LANCZOS)
            return image

        return self.run(work)

    def thumbnail(self, slide_id: str, max_side: int = 512, ext: str = "jpg") -> Deferred[bytes]:
        """The encoded thumbnail (cached)."""
        key = ("thumbnail", slide_id, max_side, ext)
        cached = self._cache.get(key)
        if cached is not None:
            return succeed(cached)

        def encoded(image: Image.Image) -> Deferred[bytes]:
            return self.run(encode, image, ext)

        def store(data: bytes) -> bytes:
            self._cache.put(key, data)
            return data

        return self.thumbnail_image(slide_id, max_side).addCallback(encoded).addCallback(store)


__all__ = [
    "LRU",
    "PyramidReader",
    "TileServer",
    "encode",
    "inline_runner",
    "render_dzi_region",
    "thread_runner",
]
