"""Thumbnail and label of a slide: DZI tiles fetched concurrently and assembled; the label.

:func:`fetch_thumbnail` picks the DZI level for a target resolution (IA-API.md §2.5,
maths in :mod:`.dzi`), fetches every tile of that level with bounded concurrency,
and pastes them into one Pillow image as they arrive.  :func:`fetch_label` gets the
label image (204 means none).  Both treat an image the SPS cannot give as a warning,
not a failure: they return ``None`` and the analysis decides what to do without it.
:func:`save_image` and :func:`save_bytes` store the results in the job's folder
atomically.

Everything runs on the worker's reactor; Pillow work (decoding, pasting, encoding) goes
through ``run_blocking(f, *args) -> Deferred`` (the reactor's thread pool in the worker,
an inline runner in unit tests), one batch at a time, so the reactor stays free and
the canvas is never touched by two threads at once.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from functools import partial
from typing import Any, Final

from attrs import frozen
from PIL import Image
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredSemaphore,
    FirstError,
    ensureDeferred,
    fail,
    gatherResults,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath

from ..durable import write_atomically
from ..jobs import Callback
from ..sps.client import SPSClient, SPSError, SPSUnauthorized
from .dzi import DZI, Rect

__all__ = [
    "DEFAULT_MAX_SIDE",
    "DEFAULT_SIDE_WITHOUT_MPP",
    "RunBlocking",
    "Thumbnail",
    "ThumbnailPlan",
    "fetch_label",
    "fetch_thumbnail",
    "image_extension",
    "plan_thumbnail",
    "save_bytes",
    "save_image",
]

log = Logger()

#: ``run_blocking(f, *args)`` runs ``f(*args)`` off the reactor thread.
RunBlocking = Callable[..., "Deferred[Any]"]

#: The thumbnail's longer side is at most this (a coarser level is used if needed),
#: which bounds its memory (4096² RGB = 48 MiB) whatever the slide weighs.
DEFAULT_MAX_SIDE: Final = 4096
#: Without ``micronsPerPixel``: the finest level whose longer side fits this.
DEFAULT_SIDE_WITHOUT_MPP: Final = 2048
#: Tile formats in order of preference (JPEG tiles are the smallest to fetch).
_PREFERRED_EXTENSIONS: Final = ("jpg", "jpeg", "png")
_BACKGROUND: Final = (255, 255, 255)


class _Unusable(ValueError):
    """The slide info does not allow a thumbnail (a warning, not a failure)."""


@frozen
class ThumbnailPlan:
    """Which tiles make the thumbnail: the level, format, focal plane and optical path
    to ask for."""

    dzi: DZI
    level: int
    ext: str
    focal_plane: str | None
    #: Named only for a multichannel slide (more than one ``opticalPaths`` entry):
    #: a brightfield slide's tiles are asked for without ``?opticalPath=``.
    optical_path: str | None = None

    @property
    def size(self) -> tuple[int, int]:
        """``(width, height)`` of the thumbnail (the level's size)."""
        return self.dzi.level_size(self.level)

    @property
    def downsample(self) -> int:
        """Full-resolution pixels per thumbnail pixel, along each axis."""
        return self.dzi.downsample(self.level)

    @property
    def mpp(self) -> float | None:
        """Microns per thumbnail pixel, when the slide's resolution is known."""
        if self.dzi.microns_per_pixel is None:
            return None
        return self.dzi.level_mpp(self.level)


@frozen
class Thumbnail:
    """An assembled thumbnail and where it sits in the slide's pyramid.

    ``image`` is RGB at ``plan.size``; a thumbnail pixel ``(x, y)`` covers
    full-resolution pixels from ``(x * downsample, y * downsample)``.
    """

    image: Image.Image
    plan: ThumbnailPlan

    @property
    def level(self) -> int:
        """The DZI level the tiles came from."""
        return self.plan.level

    @property
    def downsample(self) -> int:
        """Full-resolution pixels per thumbnail pixel."""
        return self.plan.downsample

    @property
    def mpp(self) -> float | None:
        """Microns per thumbnail pixel (``None`` if the slide's mpp is unknown)."""
        return self.plan.mpp


def _number(value: Any) -> float | None:
    """A positive finite number from JSON, or ``None``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if 0 < value < float("inf") else None


def plan_thumbnail(
    info: dict[str, Any],
    *,
    target_mpp: float = 16.0,
    max_side: int = DEFAULT_MAX_SIDE,
    side_without_mpp: int = DEFAULT_SIDE_WITHOUT_MPP,
    ext: str | None = None,
) -> ThumbnailPlan:
    """Decide the level, tile format and focal plane from slide info (IA-API.md §2.2).

    Level: with ``micronsPerPixel``, the coarsest level at least as fine as
    ``target_mpp`` (never coarser than asked); without it, the finest level whose
    longer side is at most ``side_without_mpp``; either way coarser while the longer
    side exceeds ``max_side``.  Format: ``ext`` if given, else the first of jpg, jpeg,
    png in ``availableTileFormats``, else jpg.  Focal plane: ``focalPlanes[0].id`` if
    present, else none (no suffix in the tile URL).  Optical path: the first of
    ``opticalPaths`` when there are several (a fluorescence slide's first channel,
    usually the nuclear stain), else none.  Raises ``ValueError`` when the
    info has no usable ``imageSize``.
    """
    size = info.get("imageSize") if isinstance(info, dict) else None
    width = _number(size.get("width")) if isinstance(size, dict) else None
    height = _number(size.get("height")) if isinstance(size, dict) else None
    if width is None or height is None:
        raise _Unusable("slide info has no usable imageSize")
    tile = info.get("tileSize")
    tile_size = _number(tile.get("width")) if isinstance(tile, dict) else None
    mpp = _number(info.get("micronsPerPixel"))
    dzi = DZI(int(width), int(height), int(tile_size or 256), microns_per_pixel=mpp)
    if mpp is not None:
        level = dzi.level_for_mpp(target_mpp, "finer")
    else:
        level = dzi.max_level
        while level > 0 and max(dzi.level_size(level)) > side_without_mpp:
            level -= 1
    while level > 0 and max(dzi.level_size(level)) > max_side:
        level -= 1
    if ext is None:
        offered = {
            str(f.get("extension", "")).lower().lstrip(".")
            for f in info.get("availableTileFormats") or []
            if isinstance(f, dict)
        }
        ext = next((e for e in _PREFERRED_EXTENSIONS if e in offered), "jpg")
    planes = info.get("focalPlanes")
    focal_plane = None
    if isinstance(planes, list) and planes and isinstance(planes[0], dict):
        plane_id = planes[0].get("id")
        if plane_id is not None and str(plane_id) != "":
            focal_plane = str(plane_id)
    paths = info.get("opticalPaths")
    optical_path = None
    if isinstance(paths, list) and len(paths) > 1 and isinstance(paths[0], dict):
        path_id = paths[0].get("id")
        if path_id is not None and str(path_id) != "":
            optical_path = str(path_id)
    return ThumbnailPlan(dzi, level, ext, focal_plane, optical_path)


# --- assembly (in a thread) -------------------------------------------------------------


def _paste(canvas: Image.Image, batch: list[tuple[Rect, bytes]]) -> int:
    """Decode tiles and paste them into ``canvas``; return how many were undersized.

    Edge tiles sent full-size are cropped to their rectangle; a tile smaller than its
    rectangle (a server rounding level sizes down) is pasted as it is.
    """
    short = 0
    for rect, data in batch:
        with Image.open(io.BytesIO(data)) as decoded:
            decoded.load()
            tile: Image.Image = decoded
            if tile.size != (rect.width, rect.height):
                if tile.width < rect.width or tile.height < rect.height:
                    short += 1
                tile = tile.crop((0, 0, min(tile.width, rect.width), min(tile.height, rect.height)))
            if tile.mode != "RGB":
                tile = tile.convert("RGB")
            canvas.paste(tile, (rect.x, rect.y))
    return short


class _Assembler:
    """Pastes tiles into the canvas in a thread, one batch at a time, as they arrive."""

    def __init__(self, canvas: Image.Image, run_blocking: RunBlocking, batch: int = 1) -> None:
        self.canvas = canvas
        self.batch = batch
        self.run = run_blocking
        self.pending: list[tuple[Rect, bytes]] = []
        self.busy: Deferred[Any] | None = None
        self.error: Failure | None = None
        self.short = 0
        self.idle: list[Deferred[None]] = []

    def add(self, rect: Rect, data: bytes) -> None:
        """Queue one tile for pasting (in batches: each thread hop wakes the reactor)."""
        self.pending.append((rect, data))
        if len(self.pending) >= self.batch:
            self._kick()

    def _kick(self) -> None:
        if self.busy is not None or self.error is not None:
            return
        if not self.pending:
            waiters, self.idle = self.idle, []
            for d in waiters:
                d.callback(None)
            return
        batch, self.pending = self.pending, []
        self.busy = self.run(_paste, self.canvas, batch)

        def pasted(short: int) -> None:
            self.busy = None
            self.short += short
            self._kick()

        def failed(failure: Failure) -> None:
            self.busy = None
            self.error = failure
            waiters, self.idle = self.idle, []
            for d in waiters:
                d.errback(failure)

        self.busy.addCallbacks(pasted, failed)

    def drained(self) -> Deferred[None]:
        """Fires when every queued tile is pasted (fails if pasting failed)."""
        if self.error is not None:
            return fail(self.error)
        d: Deferred[None] = Deferred()
        self.idle.append(d)
        self._kick()
        return d


# --- fetching ---------------------------------------------------------------------------


async def _fetch_tiles(
    sps: SPSClient,
    callback: Callback,
    slide_id: str,
    plan: ThumbnailPlan,
    assembler: _Assembler,
    concurrency: int,
) -> int:
    """Fetch every tile of the plan's level, at most ``concurrency`` at a time.

    The first failure cancels the tiles still waiting or in flight and is raised.
    """
    semaphore = DeferredSemaphore(max(1, concurrency))
    stopped: list[bool] = []

    def fetch(col: int, row: int, rect: Rect) -> Deferred[None]:
        if stopped:
            return fail(CancelledError())
        d = ensureDeferred(
            sps.tile(
                callback,
                slide_id,
                plan.level,
                col,
                row,
                ext=plan.ext,
                focal_plane=plan.focal_plane,
                optical_path=plan.optical_path,
            )
        )
        return d.addCallback(lambda data: assembler.add(rect, data))

    pending = [
        semaphore.run(fetch, col, row, rect) for col, row, rect in plan.dzi.tiles(plan.level)
    ]

    def stop(_: object = None) -> None:
        # Stop first: cancelling a request in flight frees its slot, which would start
        # the next waiting tile before that one is cancelled in turn.
        stopped.append(True)
        for d in pending:
            d.cancel()

    # A caller's cancel must go through stop(), not straight into the DeferredList.
    outcome: Deferred[None] = Deferred(stop)

    def settle(result: object) -> None:
        if outcome.called:
            return None  # cancelled already; the late failures are expected
        if isinstance(result, Failure):
            stop()
            outcome.errback(result)
        else:
            outcome.callback(None)
        return None

    gatherResults(pending, consumeErrors=True).addBoth(settle)
    await outcome
    return len(pending)


def _first_error(error: Exception) -> BaseException:
    """The underlying error of a ``gatherResults`` failure."""
    if isinstance(error, FirstError) and error.subFailure.value is not None:
        return error.subFailure.value
    return error


async def fetch_thumbnail(
    sps: SPSClient,
    callback: Callback,
    slide_id: str,
    info: dict[str, Any],
    *,
    run_blocking: RunBlocking,
    target_mpp: float = 16.0,
    concurrency: int = 8,
    ext: str | None = None,
    max_side: int = DEFAULT_MAX_SIDE,
    side_without_mpp: int = DEFAULT_SIDE_WITHOUT_MPP,
) -> Thumbnail | None:
    """Assemble a thumbnail of ``slide_id`` from DZI tiles, or ``None`` if it cannot be had.

    ``info`` is the slide's metadata (``slides/{id}/info``); the level, tile format
    and focal plane follow :func:`plan_thumbnail`.  Tiles are fetched ``concurrency``
    at a time and pasted in a thread as they arrive.  A slide whose tiles cannot be
    fetched (a 404, tiles not served, any SPS error after the client's retries, a
    tile that does not decode) or whose info has no image size gives ``None`` and a
    warning: the analysis decides what to do without a thumbnail.  A rejected token
    (:class:`~dpatia_daemon.sps.client.SPSUnauthorized`) is raised, not swallowed: it is the
    job's problem, and the same token is needed for everything that follows.
    Cancelling the call cancels the tile requests in flight.
    """
    try:
        plan = plan_thumbnail(
            info,
            target_mpp=target_mpp,
            max_side=max_side,
            side_without_mpp=side_without_mpp,
            ext=ext,
        )
    except ValueError as e:
        log.warn("slide {slide_id}: no thumbnail: {reason}", slide_id=slide_id, reason=str(e))
        return None
    canvas = await run_blocking(Image.new, "RGB", plan.size, _BACKGROUND)
    # Paste in batches of a few tiles: each thread hop costs the reactor a wake-up.
    assembler = _Assembler(canvas, run_blocking, batch=4)
    try:
        count = await _fetch_tiles(sps, callback, slide_id, plan, assembler, concurrency)
        await assembler.drained()
    except CancelledError:
        raise
    except Exception as e:
        error = _first_error(e)
        if isinstance(error, SPSUnauthorized | CancelledError):
            raise error from None
        if not isinstance(error, SPSError | OSError | Image.DecompressionBombError | ValueError):
            raise error from e
        log.warn(
            "slide {slide_id}: no thumbnail: tiles of level {dzi_level} could not be had: {reason}",
            slide_id=slide_id,
            dzi_level=plan.level,
            reason=str(error),
        )
        return None
    if assembler.short:
        log.debug(
            "slide {slide_id}: {short} edge tiles were smaller than the DZI maths expects",
            slide_id=slide_id,
            short=assembler.short,
        )
    log.info(
        "slide {slide_id}: thumbnail {width}x{height} from {tiles} tiles of level {dzi_level}",
        slide_id=slide_id,
        width=plan.size[0],
        height=plan.size[1],
        tiles=count,
        dzi_level=plan.level,
        mpp=plan.mpp,
    )
    return Thumbnail(canvas, plan)


async def fetch_label(sps: SPSClient, callback: Callback, slide_id: str) -> bytes | None:
    """The label image's bytes as the SPS sent them (usually JPEG), or ``None``.

    204 (no label stored) is ``None`` quietly; a 404 or any other SPS error is ``None``
    with a warning.  A rejected token is raised (see :func:`fetch_thumbnail`).  The
    label may show PHI: keep it out of logs.
    """
    try:
        data = await sps.label(callback, slide_id)
    except SPSUnauthorized:
        raise
    except SPSError as e:
        log.warn(
            "slide {slide_id}: no label image: {reason}",
            slide_id=slide_id,
            reason=str(e),
            status=e.status,
        )
        return None
    if data is None:
        log.info("slide {slide_id}: the slide has no label image", slide_id=slide_id)
        return None
    if not data:
        log.warn("slide {slide_id}: no label image: empty answer", slide_id=slide_id)
        return None
    return data


# --- saving -----------------------------------------------------------------------------

_FORMATS: Final = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}


def image_extension(data: bytes) -> str:
    """The file extension matching encoded image bytes (``.jpg``, ``.png``…; ``.bin``)."""
    if data.startswith(b"\xff\xd8\xff"):
        return ".jpg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return ".png"
    if data.startswith((b"II*\x00", b"MM\x00*")):
        return ".tiff"
    if data.startswith(b"BM"):
        return ".bmp"
    if data.startswith(b"GIF8"):
        return ".gif"
    return ".bin"


def _encode_and_write(image: Image.Image, path: str, fmt: str, quality: int) -> None:
    buffer = io.BytesIO()
    if fmt == "JPEG":
        image.convert("RGB").save(buffer, "JPEG", quality=quality)
    else:
        image.save(buffer, fmt)
    write_atomically(path, buffer.getvalue(), fsync_dir=True)


async def save_image(
    image: Image.Image,
    path: FilePath[str],
    *,
    run_blocking: RunBlocking,
    quality: int = 90,
) -> FilePath[str]:
    """Encode ``image`` by ``path``'s extension (``.png``, ``.jpg``/``.jpeg``) and store it
    atomically (temporary file, fsync, rename); encoding and writing run in a thread."""
    fmt = _FORMATS.get(os.path.splitext(path.path)[1].lower())
    if fmt is None:
        raise ValueError(f"save_image: unsupported extension in {path.basename()!r}")
    await run_blocking(_encode_and_write, image, path.path, fmt, quality)
    return path


async def save_bytes(
    data: bytes, path: FilePath[str], *, run_blocking: RunBlocking
) -> FilePath[str]:
    """Store ``data`` (e.g. the label as the SPS sent it) at ``path`` atomically, in a thread."""
    await run_blocking(partial(write_atomically, fsync_dir=True), path.path, data)
    return path
