"""What a WSI download keeps in its folder, and the file work that keeps it right.

The disk side of :mod:`.download`: the manifest (:data:`MANIFEST_NAME`, a hidden JSON
file recording each completed file and its size, and the single file under way), the
``<name>.part`` file each file is written to, and the blocking work on both — reading
the folder's state before a request (:func:`prepare`), committing a finished file
(fsync, rename, manifest: :func:`commit`), forgetting one the server changed.  Blocking
functions run through ``run_blocking`` (off the reactor thread); the writes of a body's
chunks (:class:`PartFile`) happen inline, since they only copy into the page cache.

Every fsync of a directory goes through :func:`dpatia_daemon.durable.fsync_directory`
(which tolerates network filesystems that cannot fsync one), every write loop through
:func:`dpatia_daemon.durable.write_all`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import json
import os
import sys
from collections.abc import Callable
from typing import Any, Final

from attrs import define, field, frozen
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath

from ..durable import fsync_directory, write_all, write_atomically

log = Logger()

__all__ = [
    "MANIFEST_NAME",
    "PART_SUFFIX",
    "Entry",
    "Manifest",
    "PartFile",
    "Pending",
    "Prepared",
    "RunBlocking",
    "Skip",
    "Target",
    "commit",
    "forget",
    "prepare",
    "give_back_space",
    "remove_part",
    "remove_partials",
    "save_manifest",
    "slide_key",
]

#: The manifest of completed files.  Sanitised names never start with a dot, so no
#: server-given name can collide with it.
MANIFEST_NAME: Final = ".dpatia-files.json"
#: Suffix of a file still being written.
PART_SUFFIX: Final = ".part"

_MANIFEST_FORMAT: Final = 1
#: Hand each this many new bytes of a file to the kernel's writeback (see ``PartFile``).
_WRITEBACK_EVERY: Final = 16 * 1024 * 1024

#: ``run_blocking(f, *args)`` runs ``f(*args)`` off the reactor thread and fires with
#: its result (``deferToThreadPool`` in the worker; ``maybeDeferred`` in unit tests).
RunBlocking = Callable[..., "Deferred[Any]"]


# --- the manifest -----------------------------------------------------------------------


@frozen
class Entry:
    """A completed file: its local name and size."""

    name: str
    size: int


@frozen
class Pending:
    """A single file being downloaded: what a resumed request must match."""

    name: str
    size: int | None
    validator: str | None


@define
class Manifest:
    """What the folder holds for one slide; written atomically after each file."""

    slide: str
    complete: bool = False
    files: dict[int, Entry] = field(factory=dict)
    pending: Pending | None = None

    def to_bytes(self) -> bytes:
        """The manifest as JSON."""
        data: dict[str, Any] = {
            "format": _MANIFEST_FORMAT,
            "slide": self.slide,
            "complete": self.complete,
            "files": [
                {"index": i, "name": e.name, "size": e.size} for i, e in sorted(self.files.items())
            ],
        }
        if self.pending is not None:
            data["pending"] = {
                "name": self.pending.name,
                "size": self.pending.size,
                "validator": self.pending.validator,
            }
        return json.dumps(data, indent=1).encode("utf-8")

    @classmethod
    def from_bytes(cls, raw: bytes, slide: str) -> Manifest:
        """Parse a manifest; anything unreadable or for another slide is an empty one."""
        empty = cls(slide)
        try:
            data = json.loads(raw)
            if data.get("format") != _MANIFEST_FORMAT or data.get("slide") != slide:
                return empty
            files = {int(f["index"]): Entry(str(f["name"]), int(f["size"])) for f in data["files"]}
            pending = None
            if isinstance(data.get("pending"), dict):
                p = data["pending"]
                size = p.get("size")
                validator = p.get("validator")
                pending = Pending(
                    str(p["name"]),
                    None if size is None else int(size),
                    None if validator is None else str(validator),
                )
            return cls(slide, bool(data.get("complete")), files, pending)
        except (ValueError, KeyError, TypeError, AttributeError):
            return empty


def slide_key(slide_id: str) -> str:
    """What the manifest records of the slide id: a hash (the id may be odd text)."""
    return hashlib.sha256(slide_id.encode("utf-8")).hexdigest()


# --- blocking file work (run through run_blocking) --------------------------------------


@frozen
class Prepared:
    """What is already on disk, read in a thread before any request."""

    manifest: Manifest
    #: Indexes of manifest entries whose file exists with the recorded size.
    present: frozenset[int]
    #: Size of the pending single file's ``.part`` (0 if none).
    part_size: int


def prepare(folder: str, slide: str) -> Prepared:
    """Create the folder; read the manifest; see which recorded files are intact."""
    os.makedirs(folder, mode=0o750, exist_ok=True)
    try:
        with open(os.path.join(folder, MANIFEST_NAME), "rb") as f:
            manifest = Manifest.from_bytes(f.read(), slide)
    except FileNotFoundError:
        manifest = Manifest(slide)
    present = set()
    for index, entry in manifest.files.items():
        try:
            st = os.lstat(os.path.join(folder, entry.name))
        except (FileNotFoundError, ValueError):
            continue
        if st.st_size == entry.size and os.path.isfile(os.path.join(folder, entry.name)):
            present.add(index)
    part_size = 0
    if manifest.pending is not None:
        try:
            part_size = os.lstat(os.path.join(folder, manifest.pending.name + PART_SUFFIX)).st_size
        except (FileNotFoundError, ValueError):
            part_size = 0
    return Prepared(manifest, frozenset(present), part_size)


def save_manifest(folder: str, data: bytes) -> None:
    """Replace the manifest atomically and durably."""
    write_atomically(os.path.join(folder, MANIFEST_NAME), data)
    fsync_directory(folder)


def commit(fd: int, temp: str, final: str, folder: str, manifest: bytes) -> None:
    """Make a completed file durable, rename it into place, then record it."""
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(temp, final)
    # The manifest is written only after the file is durable under its final name, so
    # it never claims a file that a crash could lose; the manifest's rename makes the
    # file's durable too (one directory fsync for both).
    save_manifest(folder, manifest)


def forget(path: str, folder: str, manifest: bytes) -> None:
    """Remove a file that no longer matches the server, and record that."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    save_manifest(folder, manifest)


def remove_partials(folder: str) -> int:
    """Delete every ``.part`` file and atomic-write temp file in ``folder`` (a download
    that met a full disk gives back the space it took); return how many."""
    removed = 0
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return 0
    for name in names:
        if name.endswith(PART_SUFFIX) or (name.startswith(".") and name.endswith(".tmp")):
            try:
                os.unlink(os.path.join(folder, name))
            except FileNotFoundError:
                continue
            removed += 1
    return removed


def give_back_space(folder: str, slide_id: str) -> None:
    """The disk is full: remove the download's partial files, logging what was done
    (a best effort: the download's own error is what the caller raises)."""
    try:
        removed = remove_partials(folder)
    except OSError as e:
        log.warn(
            "slide {slide_id}: could not remove partial downloads ({error})",
            slide_id=slide_id,
            error=e.strerror or str(e),
        )
        return
    if removed:
        log.info(
            "slide {slide_id}: the disk is full; {count} partial download files removed",
            slide_id=slide_id,
            count=removed,
        )


def remove_part(folder: str, name: str) -> None:
    """Delete a ``.part`` left by an attempt that cannot be resumed any more."""
    try:
        os.unlink(os.path.join(folder, name + PART_SUFFIX))
    except (FileNotFoundError, ValueError):
        pass


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """libc's ``sync_file_range`` (Linux), or ``None`` where there is none."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        function = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function  # type: ignore[no-any-return]


_SYNC_FILE_RANGE = _load_sync_file_range() if sys.platform.startswith("linux") else None
_SYNC_FILE_RANGE_WRITE: Final = 2


def _writeback(fd: int, offset: int, length: int) -> None:
    """Start writing ``length`` bytes at ``offset`` to disk; do not wait for them.

    Advisory: errors are ignored here, the final ``fsync`` reports any that matter.
    Without ``sync_file_range`` it is an ``fdatasync`` (which does wait, in its thread).
    """
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, offset, length, _SYNC_FILE_RANGE_WRITE)
        return
    try:
        os.fdatasync(fd)
    except OSError:
        pass


def _open_part(path: str, append: bool) -> int:
    """Open a ``.part`` file for writing without following a planted symlink."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    flags |= os.O_APPEND if append else os.O_TRUNC
    return os.open(path, flags, 0o640)


# --- targets: where the bytes of one file go ---------------------------------------------


class Target:
    """Receives the bytes of one file (a part, or the whole body)."""

    name: str
    size: int

    def write(self, data: bytes) -> None:
        """Take the next bytes."""
        raise NotImplementedError

    def finish(self, manifest: bytes) -> Deferred[None] | None:
        """The file is complete: make it durable and record it (``manifest``)."""
        raise NotImplementedError

    def abandon(self) -> None:
        """Stop without finishing; keep what was written (for a resume)."""


class Skip(Target):
    """A part completed by an earlier attempt: its bytes are counted, not written."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.size = 0

    def write(self, data: bytes) -> None:
        self.size += len(data)

    def finish(self, manifest: bytes) -> None:
        pass


class PartFile(Target):
    """Writes one file to ``<name>.part``; :meth:`finish` fsyncs and renames it.

    Each chunk is written at once on the reactor thread: ``write`` only copies into
    the page cache (handing chunks to a thread measured no faster on loopback and cost
    more CPU).  Every :data:`_WRITEBACK_EVERY` bytes the kernel is asked (in a thread)
    to start writing the new range to disk, so the disk works while the network does
    and the final ``fsync`` has little left to wait for: without it a 1 GiB file sits
    dirty in the page cache until the end, and the download takes network time *plus*
    disk time.  At most one writeback per file is in flight; the descriptor is closed
    only when none is.
    """

    def __init__(
        self,
        name: str,
        final: FilePath[str],
        folder: FilePath[str],
        *,
        offset: int,
        run_blocking: RunBlocking,
    ) -> None:
        self.name = name
        self.final = final
        self.folder = folder
        self.temp = final.sibling(final.basename() + PART_SUFFIX)
        self.size = offset
        self.fd: int | None = _open_part(self.temp.path, append=offset > 0)
        if offset:
            # Never trust the caller's idea of the length: append after what is there.
            self.size = os.fstat(self.fd).st_size
        self._run = run_blocking
        self._busy: Deferred[None] | None = None
        self._error: Failure | None = None
        self._abandoned = False
        #: Where the range not yet handed to writeback starts.
        self._clean = self.size

    def write(self, data: bytes) -> None:
        if self._error is not None:
            self._error.raiseException()
        assert self.fd is not None
        write_all(self.fd, data)
        self.size += len(data)
        if self._busy is None and self.size - self._clean >= _WRITEBACK_EVERY:
            self._start_writeback()

    def _start_writeback(self) -> None:
        """Hand the range written since the last writeback to the kernel, in a thread."""
        busy = self._run(_writeback, self.fd, self._clean, self.size - self._clean)
        self._clean = self.size
        self._busy = busy

        def settled(result: object) -> None:
            self._busy = None
            if isinstance(result, Failure):
                self._error = result
            if self._abandoned:
                self._close()

        busy.addBoth(settled)

    async def _finish(self, manifest: bytes) -> None:
        if self._busy is not None:
            await self._busy
        if self._error is not None:
            self._error.raiseException()
        fd, self.fd = self.fd, None  # the commit owns (and closes) the descriptor now
        await self._run(commit, fd, self.temp.path, self.final.path, self.folder.path, manifest)

    def finish(self, manifest: bytes) -> Deferred[None]:
        return ensureDeferred(self._finish(manifest))

    def abandon(self) -> None:
        self._abandoned = True
        if self._busy is None:
            self._close()

    def _close(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            try:
                os.close(fd)
            except OSError:  # pragma: no cover - nothing to do about it
                pass
