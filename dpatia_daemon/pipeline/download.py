"""WSI download: ``slides/{id}/files`` streamed to a job's folder, resumable, bounded.

:func:`download_files` is the whole API.  It runs on the worker's reactor and owns:

* **Streaming with bounded memory.**  The body goes chunk by chunk from the HTTP
  client to disk; nothing holds more than a chunk or two (plus the multipart parser's
  few held-back bytes), whatever the slide weighs.  Whenever the disk side must be
  waited for (too many commits in flight), the transport is paused and resumed
  after: TCP back-pressure, not a growing buffer.
* **Disk and network in parallel.**  Every 16 MiB the kernel is asked to start
  writing the new range out (``sync_file_range``), so a 1 GiB file is not left dirty
  in the page cache for one long ``fsync`` at the end (nor throttles the rest of the
  machine); a finished part is fsynced and renamed while the next part streams in.
  The socket is read 1 MiB at a time while the body streams
  (:class:`~dpatia_daemon.twistedcompat.SocketReadSize`).
* **Both answer forms** (IA-API.md §2.4): a single file (any non-multipart type;
  its name from ``Content-Disposition``, else one derived from a hash of the slide id)
  and any ``multipart/*`` (one file per part, via :mod:`.multipart`).
* **Safe names** (:mod:`.filenames`): every name is reduced to a base name,
  de-duplicated, and proven to lie inside the folder; files are opened with
  ``O_NOFOLLOW``.
* **Atomic files.**  Each file is written to ``<name>.part``, checked against its
  ``Content-Length`` (the whole body for a single file, the part's own when a part
  declares one), fsynced and renamed into place, and the folder fsynced.
* **Retries that do not repeat work.**  A manifest (:data:`MANIFEST_NAME`, a hidden
  JSON file in the folder) records each completed file and its size.  When everything
  is complete a retry returns at once without a request; otherwise completed parts
  of a multipart answer are consumed without being written again, and an interrupted
  single file is resumed with ``Range: bytes=N-`` (206 appends, 200 starts over;
  see :func:`download_files`).
* **Timers.**  treq's ``timeout=`` covers the headers only, so the body gets an idle
  timer (no byte for ``idle_timeout`` seconds) and the whole download an optional
  overall ``deadline``, both on the injected clock.  On any error the connection is
  closed (``stopProducing``), the ``.part`` file stays for the next attempt, and a
  :class:`DownloadError` names the slide and the problem (never the token).

This module is the HTTP side: the request (and its resume), the body protocol, the
timers, the state of one run.  The folder's side — the manifest, the ``.part`` files,
and the blocking file work (``fsync``, ``rename``, the manifest), which runs through
``run_blocking`` (``run_blocking(f, *args) -> Deferred``: the reactor's thread pool in
the worker, an inline runner in unit tests) so the worker's reactor keeps answering
AMP — is :mod:`.downloadfolder`.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable
from typing import Any, Final

from attrs import define, field
from twisted.internet.defer import Deferred, DeferredLock, TimeoutError, ensureDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.web.client import ResponseDone, ResponseFailed
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse

from ..jobs import Callback
from ..sps.client import SPSClient
from ..sps.errors import SPSError
from ..twistedcompat import SocketReadSize, is_data_loss
from .downloadfolder import (
    MANIFEST_NAME,
    PART_SUFFIX,
    Entry,
    Manifest,
    PartFile,
    Pending,
    Prepared,
    RunBlocking,
    Skip,
    Target,
    forget,
    give_back_space,
    prepare,
    remove_part,
    save_manifest,
    slide_key,
)
from .failures import DownloadError, disk_full
from .filenames import NameAllocator, UnsafePath, contained_child, extension_for, fallback_name
from .multipart import (
    Event,
    MultipartError,
    MultipartParser,
    PartData,
    PartHeaders,
    PartStart,
    SinglePart,
    decode_header,
    disposition_filename,
    multipart_boundary,
)

__all__ = [
    "MANIFEST_NAME",
    "PART_SUFFIX",
    "DownloadError",
    "Progress",
    "RunBlocking",
    "download_files",
]

log = Logger()

#: How often (clock seconds) ``progress`` is called at most while bytes arrive.
_PROGRESS_INTERVAL: Final = 0.5
#: Commits (fsync + rename) in flight before the body waits for one to finish.
_MAX_COMMITS: Final = 4
#: Socket read size while a body streams.  Twisted reads 64 KiB at a time, and the work
#: per read (its layers, the parser, one write into the page cache) dominated the
#: client's CPU: 1 MiB reads about halved the CPU per GiB on loopback.
_READ_SIZE: Final = 1024 * 1024
_CONTENT_RANGE: Final = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+)\s*$", re.IGNORECASE)

#: ``progress(bytes_received, total_or_None)``.
Progress = Callable[[int, "int | None"], None]


# --- the body protocol --------------------------------------------------------------------


_END: Final = object()


def _why(reason: Failure) -> str:
    """A short description of why a response body ended early."""
    if reason.check(ResponseFailed):
        inner = [f.value for f in reason.value.reasons]  # type: ignore[union-attr]
        names = [type(e).__name__ for e in inner if not is_data_loss(e)]
        return ", ".join(names) or "data loss"
    return type(reason.value).__name__


class _Body(Protocol):
    """Receives the response body and drives parsing, writing, timers and progress.

    Chunks are handled as they arrive; when handling needs to wait (too many commits
    in flight) the transport is paused, later chunks queue up in ``_inbox`` (at most
    what was already read), and handling resumes when the wait ends.  ``done`` fires
    with the completed files, or fails with :class:`DownloadError`; cancelling it
    closes the connection.
    """

    def __init__(self, run: _Run, parser: MultipartParser | SinglePart) -> None:
        self.run = run
        self.parser = parser
        self.done: Deferred[list[FilePath[str]]] = Deferred(self._cancelled)
        self._inbox: deque[Any] = deque()
        self._events: deque[Event] = deque()
        self._waiting = False
        self._ended = False
        self._over = False
        self._target: Target | None = None
        self._last = run.clock.seconds()
        self._idle: IDelayedCall | None = None
        self._producer: IPushProducer | None = None
        self._finishing = False
        self._read_size: SocketReadSize | None = None
        run.fail = self._fail

    # --- protocol -----------------------------------------------------------------------

    def makeConnection(self, transport: Any) -> None:
        """Keep the transport (to pause, resume and stop it) and start the idle timer."""
        self._producer = transport
        self._read_size = SocketReadSize(transport, _READ_SIZE)
        super().makeConnection(transport)
        self._idle = self.run.clock.callLater(self.run.idle_timeout, self._check_idle)

    def dataReceived(self, data: bytes) -> None:
        """Handle a chunk now, or queue it while a wait is under way."""
        if self._over:
            return
        self._last = self.run.clock.seconds()
        self.run.received(len(data))
        self._inbox.append(data)
        if not self._waiting:
            self._pump()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """The body ended: cleanly (finish the files) or not (fail, keeping the .part)."""
        self._restore_read_size()
        if self._over:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            # PotentialDataLoss: no Content-Length and no chunking; the multipart
            # parser still knows whether the body is whole, a single file cannot.
            self._inbox.append(_END)
            if not self._waiting:
                self._pump()
            return
        self._fail(
            self.run.error(
                f"the connection closed after {self.run.received_bytes} body bytes, "
                f"before the end ({_why(reason)})",
                transient=True,
            )
        )

    # --- handling -----------------------------------------------------------------------

    def _pump(self) -> None:
        """Handle queued chunks and events until done or until something must wait."""
        try:
            while not self._over:
                if self._events:
                    wait = self._handle(self._events.popleft())
                    if wait is not None:
                        self._wait(wait)
                        return
                elif self._inbox:
                    item = self._inbox.popleft()
                    if item is _END:
                        self._ended = True
                        self._events.extend(self.parser.close())
                    else:
                        self._events.extend(self.parser.feed(item))
                else:
                    if self._ended:
                        self._complete()
                    return
        except MultipartError as e:
            self._fail(self.run.error(f"malformed multipart answer: {e}"))
        except DownloadError as e:
            self._fail(e)
        except (OSError, UnsafePath) as e:
            self._fail(self.run.error(f"cannot write the file: {e}", disk=disk_full(e)))

    def _wait(self, wait: Deferred[None]) -> None:
        """Pause the transport until ``wait`` fires, then carry on."""
        self._waiting = True
        if self._producer is not None:
            self._producer.pauseProducing()

        def resumed(_: object) -> None:
            self._waiting = False
            if self._over:
                return
            # Time spent waiting on our own disk is not the server being idle.
            self._last = self.run.clock.seconds()
            if self._producer is not None:
                self._producer.resumeProducing()
            self._pump()

        def failed(failure: Failure) -> None:
            self._waiting = False
            if failure.check(DownloadError):
                self._fail(failure.value)  # type: ignore[arg-type]
            else:
                why = failure.getErrorMessage() or type(failure.value).__name__
                self._fail(
                    self.run.error(f"cannot write the file: {why}", disk=disk_full(failure.value))
                )

        wait.addCallbacks(resumed, failed)

    def _handle(self, event: Event) -> Deferred[None] | None:
        """Act on one parser event; a Deferred means wait for it."""
        if isinstance(event, PartData):
            assert self._target is not None
            self._target.write(event.data)
            return None
        if isinstance(event, PartStart):
            self._target = self.run.start_file(event.index, event.headers)
            return None
        assert self._target is not None
        target, self._target = self._target, None
        return self.run.finish_file(event.index, target)

    def _complete(self) -> None:
        """The whole body is handled: fire ``done`` once the last commits finished."""
        if self._finishing:
            return
        self._finishing = True
        # No byte is due any more; the deadline still bounds the commits.
        self._stop_timer()

        def committed(_: object) -> None:
            if not self._over:
                self._over = True
                self.done.callback(self.run.files())

        self.run.all_committed().addCallback(committed)

    # --- failures, timers ---------------------------------------------------------------

    def _stop(self) -> bool:
        """Close the connection and keep the .part; False if already stopped."""
        self.run.failed = True
        self._restore_read_size()
        if self._over:
            return False
        self._over = True
        self._stop_timer()
        if self._target is not None:
            self._target.abandon()
            self._target = None
        if self._producer is not None:
            self._producer.stopProducing()
        return True

    def _fail(self, error: BaseException) -> None:
        """Stop and fail ``done`` (once)."""
        if self._stop():
            self.done.errback(Failure(error))

    def _cancelled(self, _: Deferred[list[FilePath[str]]]) -> None:
        """``done`` was cancelled (deadline or caller): stop like a failure, quietly."""
        self._stop()

    def _check_idle(self) -> None:
        self._idle = None
        if self._over:
            return
        now = self.run.clock.seconds()
        if self._waiting:
            self._last = now
        quiet = now - self._last
        if quiet >= self.run.idle_timeout:
            self._fail(
                self.run.error(
                    f"no data for {self.run.idle_timeout:g} s after {self.run.received_bytes} bytes",
                    transient=True,
                )
            )
            return
        self._idle = self.run.clock.callLater(self.run.idle_timeout - quiet, self._check_idle)

    def _restore_read_size(self) -> None:
        if self._read_size is not None:
            self._read_size.restore()
            self._read_size = None

    def _stop_timer(self) -> None:
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        self._idle = None


# --- one download -------------------------------------------------------------------------


@define
class _Run:
    """The state of one call of :func:`download_files`."""

    sps: SPSClient
    callback: Callback
    slide_id: str
    folder: FilePath[str]
    clock: IReactorTime
    run_blocking: RunBlocking
    idle_timeout: float
    progress: Progress | None
    manifest: Manifest = field(init=False)
    present: frozenset[int] = frozenset()
    names: NameAllocator = field(factory=lambda: NameAllocator(reserved=(MANIFEST_NAME,)))
    single_name: str | None = None
    part_size: int = 0
    delivered: bool = False
    #: Set once the attempt failed; ``fail`` tells the body (set by it).
    failed: bool = False
    fail: Callable[[BaseException], None] = lambda _: None
    _commits: DeferredLock = field(factory=DeferredLock)
    _in_flight: int = 0
    _room: list[Deferred[None]] = field(factory=list)
    offset: int = 0
    total: int | None = None
    received_bytes: int = 0
    _last_progress: float | None = None

    def error(self, message: str, *, transient: bool = False, disk: bool = False) -> DownloadError:
        """A :class:`DownloadError` for this slide."""
        return DownloadError(self.slide_id, message, transient=transient, disk=disk)

    def note(self, event: str, **fields: object) -> None:
        """Log ``event`` (a format string, after ``slide {slide_id}: ``) at info level."""
        log.info("slide {slide_id}: " + event, slide_id=self.slide_id, **fields)

    # --- progress -----------------------------------------------------------------------

    def received(self, n: int) -> None:
        """Count body bytes; report progress at most every :data:`_PROGRESS_INTERVAL` s."""
        self.received_bytes += n
        if self.progress is None:
            return
        now = self.clock.seconds()
        if self._last_progress is None or now - self._last_progress >= _PROGRESS_INTERVAL:
            self._last_progress = now
            self._report(self.offset + self.received_bytes, self.total)

    def _report(self, done: int, total: int | None) -> None:
        if self.progress is None:
            return
        try:
            self.progress(done, total)
        except Exception:
            # A progress observer must not break the download.
            log.failure("download progress callback failed", slide_id=self.slide_id)

    # --- files --------------------------------------------------------------------------

    def start_file(self, index: int, headers: PartHeaders) -> Target:
        """Open the target for part ``index`` (the whole body for a single file)."""
        if self.single_name is not None:
            name = self.single_name
        else:
            ext = extension_for(headers.content_type)
            name = self.names.allocate(
                headers.filename, fallback_name(self.slide_id, f"-{index + 1}{ext}")
            )
        entry = self.manifest.files.get(index)
        declared = headers.content_length
        if (
            self.single_name is None
            and entry is not None
            and entry.name == name
            and index in self.present
            and (declared is None or declared == entry.size)
        ):
            log.debug(
                "slide {slide_id}: file {index} already complete; not written again",
                slide_id=self.slide_id,
                index=index,
            )
            return Skip(name)
        final = contained_child(self.folder, name)
        offset = self.offset if self.single_name is not None else 0
        return PartFile(
            name,
            final,
            self.folder,
            offset=offset,
            run_blocking=self.run_blocking,
        )

    def finish_file(self, index: int, target: Target) -> Deferred[None] | None:
        """Check a completed file's size, then commit it (or confirm a skipped one).

        Commits run one after another (a ``DeferredLock``), so the manifest records
        files in order, but the body keeps streaming meanwhile: the next part is
        written while the previous one is fsynced, which matters for answers of many
        small DICOM files.  Past :data:`_MAX_COMMITS` commits in flight the returned
        Deferred asks the body to wait (each holds an open descriptor).
        """
        if isinstance(target, Skip):
            recorded = self.manifest.files[index].size
            if target.size == recorded:
                return None
            # The server's file changed since it was stored: forget ours, so the next
            # attempt downloads it again.

            def forget_ours() -> Deferred[None]:
                self.manifest.files.pop(index, None)
                self.manifest.complete = False
                return self.run_blocking(
                    forget,
                    self.folder.child(target.name).path,
                    self.folder.path,
                    self.manifest.to_bytes(),
                )

            def changed(_: object) -> None:
                raise self.error(
                    f"file {index + 1} ({target.name}) is now {target.size} bytes, "
                    f"not {recorded}; it will be downloaded again"
                )

            return self._commits.run(forget_ours).addCallback(changed)
        expected = self.total if self.single_name is not None else None
        if expected is not None and target.size != expected:
            target.abandon()
            raise self.error(
                f"{target.name} has {target.size} bytes, Content-Length said {expected}"
            )
        assert isinstance(target, PartFile)

        def commit() -> Deferred[None]:
            if self.failed:
                target.abandon()  # keep the .part; the attempt is over
                return succeed(None)
            # Built when this commit's turn comes, so earlier commits are included.
            manifest = Manifest(
                self.manifest.slide,
                False,
                {**self.manifest.files, index: Entry(target.name, target.size)},
                None,
            )

            def committed(_: object) -> None:
                self.manifest = manifest
                self.note("file {index} complete ({size} bytes)", index=index, size=target.size)

            return target.finish(manifest.to_bytes()).addCallback(committed)

        self._in_flight += 1
        d = self._commits.run(commit)

        def settled(result: object) -> None:
            self._in_flight -= 1
            if self._in_flight < _MAX_COMMITS:
                waiters, self._room = self._room, []
                for w in waiters:
                    w.callback(None)
            if isinstance(result, Failure) and not self.failed:
                why = result.getErrorMessage() or type(result.value).__name__
                error = (
                    result.value
                    if isinstance(result.value, DownloadError)
                    else self.error(f"cannot write the file: {why}", disk=disk_full(result.value))
                )
                self.fail(error)
            return None

        d.addBoth(settled)
        if self._in_flight >= _MAX_COMMITS:
            room: Deferred[None] = Deferred()
            self._room.append(room)
            return room
        return None

    def all_committed(self) -> Deferred[None]:
        """Fires when every commit started so far has finished."""
        return self._commits.run(lambda: succeed(None))

    def files(self) -> list[FilePath[str]]:
        """The completed files, in answer order."""
        return [self.folder.child(e.name) for _, e in sorted(self.manifest.files.items())]

    # --- the request --------------------------------------------------------------------

    async def open(self) -> IResponse:
        """Request the files: with ``Range`` when a single file can be resumed."""
        pending = self.manifest.pending
        part = self.part_size
        resume = pending is not None and part > 0 and (pending.size is None or part < pending.size)
        if resume:
            assert pending is not None
            try:
                response = await self.sps.open_files(
                    self.callback, self.slide_id, range_from=part, if_range=pending.validator
                )
            except SPSError as e:
                if e.status != 416:
                    raise
                self.note("range not satisfiable; downloading from the start")
            else:
                if response.code == 206 and self._accept_partial(response, part, pending):
                    self.offset = part
                    self.single_name = pending.name
                    return response
                if response.code == 200:
                    self.note("the SPS sent the whole file, not a range; starting over")
                    return response
                _discard(response)
        return await self.sps.open_files(self.callback, self.slide_id)

    def _accept_partial(self, response: IResponse, part: int, pending: Pending) -> bool:
        """Whether a 206 continues exactly the ``.part`` we have."""
        raw = response.headers.getRawHeaders(b"content-range") or [b""]
        match = _CONTENT_RANGE.match(raw[0].decode("latin-1"))
        if match is None:
            return False
        start, end, total = (int(g) for g in match.groups())
        if start != part or end != total - 1:
            return False
        if pending.size is not None and total != pending.size:
            return False
        if response.length is not UNKNOWN_LENGTH and response.length != end - start + 1:
            return False
        self.total = total
        self.note(
            "resuming {name} at byte {offset} of {total}",
            name=pending.name,
            offset=part,
            total=total,
        )
        return True


class _Discard(Protocol):
    """Drops a body we do not want and closes its connection."""

    def connectionMade(self) -> None:
        self.transport.stopProducing()  # type: ignore[union-attr]


def _discard(response: IResponse) -> None:
    """Throw a response away without reading its body."""
    response.deliverBody(_Discard())


def _validator(response: IResponse) -> str | None:
    """A strong ETag, else Last-Modified: what ``If-Range`` may send on a resume."""
    etag = response.headers.getRawHeaders(b"etag")
    if etag and not etag[0].startswith(b"W/"):
        return etag[0].decode("latin-1")
    modified = response.headers.getRawHeaders(b"last-modified")
    return modified[0].decode("latin-1") if modified else None


async def _download(run: _Run) -> list[FilePath[str]]:
    """The body of :func:`download_files` (see there)."""
    try:
        prepared: Prepared = await run.run_blocking(
            prepare, run.folder.path, slide_key(run.slide_id)
        )
    except OSError as e:
        raise run.error(f"cannot use the download folder: {e}", disk=disk_full(e)) from None
    run.manifest = prepared.manifest
    run.present = prepared.present
    manifest = prepared.manifest
    if manifest.complete and manifest.files and prepared.present == set(manifest.files):
        total = sum(e.size for e in manifest.files.values())
        run.note("all {count} files already downloaded; no request", count=len(manifest.files))
        run._report(total, total)
        return run.files()
    run.part_size = prepared.part_size
    response = await run.open()
    try:
        return await _receive(run, response, prepared)
    except BaseException:
        # Whatever went wrong before the body protocol took over (a cancel included),
        # the connection must not be left half-read.
        if not run.delivered:
            _discard(response)
        raise


async def _receive(run: _Run, response: IResponse, prepared: Prepared) -> list[FilePath[str]]:
    """Check the answer's status and type, then stream its body to disk."""
    manifest = run.manifest
    expected = 206 if run.offset else 200
    if response.code != expected:
        raise run.error(
            f"unexpected answer HTTP {response.code} (expected {expected})",
            transient=response.code == 429 or response.code >= 500,
        )
    headers = response.headers
    content_type = (headers.getRawHeaders(b"content-type") or [b""])[0].decode("latin-1")
    length = None if response.length is UNKNOWN_LENGTH else int(response.length)
    try:
        boundary = multipart_boundary(content_type)
    except MultipartError as e:
        raise run.error(f"unusable content type: {e}") from None
    parser: MultipartParser | SinglePart
    if boundary is not None:
        if run.offset:
            raise run.error("the SPS answered a range request with a multipart body")
        parser = MultipartParser(boundary)
        run.total = length
        if manifest.pending is not None:
            # A single file was under way and now the answer is multipart.
            await run.run_blocking(remove_part, run.folder.path, manifest.pending.name)
            manifest.pending = None
    else:
        disposition = (headers.getRawHeaders(b"content-disposition") or [b""])[0]
        if not run.offset:
            ext = extension_for(content_type)
            run.single_name = run.names.allocate(
                disposition_filename(decode_header(disposition)),
                fallback_name(run.slide_id, ext),
            )
            run.total = length
            if (
                length is not None
                and manifest.files == {0: Entry(run.single_name, length)}
                and 0 in prepared.present
            ):
                # The file was complete; only the final manifest write was lost.
                _discard(response)
                run.delivered = True
                run.note("{name} already downloaded; body not read", name=run.single_name)
                return await _close_manifest(run, length)
            if manifest.pending is not None and manifest.pending.name != run.single_name:
                await run.run_blocking(remove_part, run.folder.path, manifest.pending.name)
            # Record what a resumed request must match before the first byte lands.
            manifest.pending = Pending(run.single_name, length, _validator(response))
            manifest.complete = False
            manifest.files = {}
            try:
                await run.run_blocking(save_manifest, run.folder.path, manifest.to_bytes())
            except OSError as e:
                raise run.error(f"cannot write the manifest: {e}", disk=disk_full(e)) from None
        part_headers = PartHeaders(
            (("content-type", content_type),)
            + ((("content-length", str(run.total)),) if run.total is not None else ())
        )
        parser = SinglePart(part_headers)
    run.note(
        "downloading {form} ({length} bytes{resumed})",
        form="multipart" if boundary is not None else "a single file",
        length="?" if length is None else length,
        resumed=f", resuming at {run.offset}" if run.offset else "",
    )
    body = _Body(run, parser)
    run.delivered = True
    response.deliverBody(body)
    await body.done
    if isinstance(parser, MultipartParser):
        if not parser.parts:
            raise run.error("the multipart answer has no parts")
        # Forget files of an earlier, longer answer that this one no longer has.
        run.manifest.files = {i: e for i, e in run.manifest.files.items() if i < parser.parts}
    return await _close_manifest(run, run.offset + run.received_bytes)


async def _close_manifest(run: _Run, total: int) -> list[FilePath[str]]:
    """Record that every file is complete; report the end; return the files."""
    run.manifest.complete = True
    run.manifest.pending = None
    try:
        await run.run_blocking(save_manifest, run.folder.path, run.manifest.to_bytes())
    except OSError as e:
        raise run.error(f"cannot write the manifest: {e}", disk=disk_full(e)) from None
    run._report(total, total)
    return run.files()


async def download_files(
    sps: SPSClient,
    callback: Callback,
    slide_id: str,
    folder: FilePath[str],
    *,
    clock: IReactorTime,
    run_blocking: RunBlocking,
    idle_timeout: float = 60.0,
    deadline: float | None = None,
    progress: Progress | None = None,
) -> list[FilePath[str]]:
    """Download the WSI files of ``slide_id`` into ``folder``; return their paths in order.

    ``folder`` belongs to this download (e.g. ``<job>/wsi``): it is created if missing
    and holds the files, their ``.part`` files while they are written, and the
    manifest.  Names are the server's, sanitised and de-duplicated (``x (2).dcm``).

    A retry with the same folder does no work twice: when the manifest says every file
    is complete and each is on disk with its recorded size, no request is made.
    Otherwise the files are requested again; completed parts of a multipart answer are
    read past without being written, and an interrupted single file resumes with
    ``Range: bytes=N-`` (and ``If-Range:`` the earlier answer's strong ETag or
    Last-Modified): 206 with a matching ``Content-Range`` appends, anything else
    starts the file over.

    ``progress(received, total)`` is called at most twice a second while bytes arrive
    and once at the end (``total`` from Content-Length, ``None`` if the SPS sent
    none).  ``idle_timeout``: seconds without a byte (not counting our own disk waits)
    before giving up; ``deadline``: seconds for the whole download, request included.
    ``run_blocking(f, *args)`` runs file work off the reactor thread.

    Raises :class:`DownloadError` when the body goes wrong (cut short, idle, past the
    deadline, malformed multipart, sizes that disagree, a file that cannot be
    written), and :class:`~dpatia_daemon.sps.errors.SPSError` (as every SPS call does) when
    the request itself fails.  Cancelling the returned coroutine's Deferred closes the
    connection and keeps the ``.part`` file.  A download that meets a full disk (or
    quota) removes its ``.part`` and temp files before it raises (a transient
    :class:`DownloadError` with ``disk``): the space goes back to the spool and the
    other jobs, and the deferred retry starts those files over.
    """
    run = _Run(sps, callback, slide_id, folder, clock, run_blocking, idle_timeout, progress)
    work = ensureDeferred(_download(run))
    if deadline is not None:
        work.addTimeout(deadline, clock)
    try:
        return await work
    except DownloadError as e:
        if e.disk:
            await run.run_blocking(give_back_space, run.folder.path, run.slide_id)
        raise
    except TimeoutError:
        raise run.error(
            f"not finished within the deadline of {deadline:g} s "
            f"({run.offset + run.received_bytes} bytes received)",
            transient=True,
        ) from None
