"""Fault injection for the simulated SPS, and the streaming body of ``slides/{id}/files``.

:class:`Faults` is the set of knobs (all off by default) that :class:`~.fake.FakeSPS`
consults on every callback request: added latency, a seeded fraction of 5xx answers,
a connection dropped part-way through a download, token lifetime, and "SPS down"
windows.  Times are on the fake's clock, so tests drive them with ``task.Clock``.

:class:`FileStream` serves one file or several (``multipart/related``) from disk or
memory through a pull producer, so a 1 GB slide never sits in memory, and it is where
the dropped-download fault happens.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any, Literal

from attrs import define, field
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

log = Logger()

DownMode = Literal["503", "refuse"]
DOWN_MODES: tuple[DownMode, ...] = ("503", "refuse")

#: The 5xx statuses ``error_rate`` picks from.
ERROR_STATUSES = (500, 502, 503, 504)

#: Bytes read from a file per write: fewer, bigger writes cost the simulator less CPU
#: (bench/pipeline.py runs it beside the client on the same cores).
CHUNK = 1024 * 1024


@define
class Faults:
    """What the simulated SPS does wrong, and when.

    - ``latency``: seconds added before every callback request is handled.
    - ``error_rate``: the fraction of callback requests answered with a 5xx chosen from
      ``error_statuses``, decided by ``rng`` (seed it for repeatable runs).
    - ``drop_after_bytes``: a ``files`` download is cut (the connection closed) after
      this many body bytes; ``drop_count`` limits it to the next N downloads (``None``:
      every download).
    - ``token_lifetime``: seconds a callback token issued by the simulator stays valid.
    - ``down_from``/``down_until``: a window (clock seconds) in which the SPS is down:
      ``down_mode`` ``"503"`` answers 503 with ``Retry-After``, ``"refuse"`` aborts the
      connection without an answer.
    """

    latency: float = 0.0
    error_rate: float = 0.0
    error_statuses: tuple[int, ...] = ERROR_STATUSES
    rng: random.Random = field(factory=lambda: random.Random(0))
    drop_after_bytes: int | None = None
    drop_count: int | None = None
    token_lifetime: float | None = None
    down_from: float | None = None
    down_until: float | None = None
    down_mode: DownMode = "503"

    def go_down(self, now: float, duration: float, mode: DownMode = "503") -> None:
        """Be down from ``now`` for ``duration`` seconds."""
        self.down_from, self.down_until, self.down_mode = now, now + duration, mode

    def is_down(self, now: float) -> bool:
        """Whether ``now`` falls in the down window."""
        if self.down_until is None:
            return False
        start = self.down_from if self.down_from is not None else -math.inf
        return start <= now < self.down_until

    def retry_after(self, now: float) -> str:
        """Whole seconds until the down window ends (at least 1), for ``Retry-After``."""
        assert self.down_until is not None
        return str(max(1, math.ceil(self.down_until - now)))

    def injected_error(self) -> int | None:
        """A 5xx status to answer with now, or ``None`` (draws from ``rng`` only when on)."""
        if self.error_rate <= 0:
            return None
        if self.rng.random() < self.error_rate:
            return self.rng.choice(self.error_statuses)
        return None

    def take_drop(self) -> int | None:
        """The byte count after which to cut this download, or ``None``; counts it down."""
        if self.drop_after_bytes is None:
            return None
        if self.drop_count is not None:
            if self.drop_count <= 0:
                return None
            self.drop_count -= 1
        return self.drop_after_bytes

    def to_json(self, now: float) -> dict[str, Any]:
        """The knobs as JSON (for the page and the control API)."""
        return {
            "latency": self.latency,
            "errorRate": self.error_rate,
            "dropAfterBytes": self.drop_after_bytes,
            "dropCount": self.drop_count,
            "tokenLifetime": self.token_lifetime,
            "down": self.is_down(now),
            "downUntil": self.down_until,
            "downMode": self.down_mode,
        }

    def update(self, data: dict[str, Any], now: float) -> None:
        """Apply the JSON keys of :meth:`to_json` that are present (``downFor`` starts a
        window now; ``seed`` reseeds ``rng``); raise ``ValueError`` on a bad value."""

        def number(key: str, *, minimum: float = 0.0, maximum: float = math.inf) -> float:
            value = data[key]
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{key} must be a number")
            if not minimum <= value <= maximum:
                raise ValueError(f"{key} must be between {minimum} and {maximum}")
            return float(value)

        def optional_int(key: str) -> int | None:
            if data[key] is None:
                return None
            return int(number(key))

        if "latency" in data:
            self.latency = number("latency", maximum=600)
        if "errorRate" in data:
            self.error_rate = number("errorRate", maximum=1)
        if "seed" in data:
            self.rng = random.Random(data["seed"])
        if "dropAfterBytes" in data:
            self.drop_after_bytes = optional_int("dropAfterBytes")
        if "dropCount" in data:
            self.drop_count = optional_int("dropCount")
        if "tokenLifetime" in data:
            self.token_lifetime = None if data["tokenLifetime"] is None else number("tokenLifetime")
        if "downFor" in data:
            mode = data.get("downMode", "503")
            if mode not in DOWN_MODES:
                raise ValueError(f"downMode must be one of {', '.join(DOWN_MODES)}")
            self.go_down(now, number("downFor"), mode)


# --- latency --------------------------------------------------------------------------


@implementer(IResource)
class DelayedResource(Resource):
    """Render ``wrapped`` after ``latency()`` seconds on ``clock`` (at once if 0).

    ``latency`` is asked on every request, so changing the knob applies at once.
    """

    isLeaf = True

    def __init__(
        self, wrapped: IResource, latency: Callable[[], float], clock: IReactorTime
    ) -> None:
        super().__init__()
        self.wrapped = wrapped
        self.latency = latency
        self.clock = clock

    def render(self, request: IRequest) -> Any:  # type: ignore[override]
        """Render now, or schedule the render and cancel it if the client goes away."""
        delay = self.latency()
        if delay <= 0:
            return self.wrapped.render(request)
        call = self.clock.callLater(delay, self.wrapped.render, request)

        def gone(_: Any) -> None:
            if call.active():
                call.cancel()

        request.notifyFinish().addErrback(gone)  # type: ignore[attr-defined]
        return NOT_DONE_YET


# --- streaming downloads --------------------------------------------------------------

Segment = bytes | Path


def _quote(name: str) -> str:
    return name.replace("\\", "\\\\").replace('"', '\\"')


def _size(segment: Segment) -> int:
    return len(segment) if isinstance(segment, bytes) else segment.stat().st_size


def multipart_segments(files: Sequence[tuple[str, Segment]], boundary: str) -> list[Segment]:
    """The ``multipart/related`` framing of ``files`` as segments (bytes or file paths)."""
    segments: list[Segment] = []
    for name, content in files:
        head = (
            f"--{boundary}\r\n"
            f'Content-Disposition: attachment; filename="{_quote(name)}"\r\n'
            "Content-Type: application/octet-stream\r\n"
            f"Content-Length: {_size(content)}\r\n"
            "\r\n"
        )
        segments += [head.encode("utf-8"), content, b"\r\n"]
    segments.append(f"--{boundary}--\r\n".encode("ascii"))
    return segments


@implementer(IPushProducer)
class _SegmentProducer:
    """Write segments to a request chunk by chunk until the transport says pause.

    A push producer: Twisted's HTTP channel would wrap a pull producer in a cooperator
    task on the global reactor; a push producer paused by the transport's own buffer
    needs nothing else (and runs in memory under StubTreq).
    """

    def __init__(
        self,
        request: IRequest,
        segments: list[Segment],
        drop_after: int | None,
        skip: int = 0,
    ):
        # A twisted.web Request: IRequest does not declare the consumer methods it has.
        self.request: Any = request
        self.segments = list(segments)
        self.drop_after = drop_after
        #: Bytes of the first (file) segment not to send: a Range request's offset.
        self.skip = skip
        self.sent = 0
        self.file: IO[bytes] | None = None
        self.paused = False
        self.done = False
        self._producing = False

    def start(self) -> None:
        self.request.notifyFinish().addErrback(lambda _: self.stopProducing())  # type: ignore[attr-defined]
        self.request.registerProducer(self, True)
        self._produce()

    def _next_chunk(self) -> bytes | None:
        while self.segments:
            head = self.segments[0]
            if isinstance(head, bytes):
                self.segments.pop(0)
                if head:
                    return head
                continue
            if self.file is None:
                self.file = head.open("rb")
                if self.skip:
                    self.file.seek(self.skip)
                    self.skip = 0
            chunk = self.file.read(CHUNK)
            if chunk:
                return chunk
            self.file.close()
            self.file = None
            self.segments.pop(0)
        return None

    def _produce(self) -> None:
        if self._producing:
            return  # resumed from inside write(); the running loop carries on
        self._producing = True
        try:
            while not self.paused and not self.done:
                self._step()
        finally:
            self._producing = False

    def _step(self) -> None:
        chunk = self._next_chunk()
        if chunk is None:
            self._close()
            self.request.unregisterProducer()
            self.request.finish()
            return
        if self.drop_after is not None and self.sent + len(chunk) >= self.drop_after:
            self._drop(chunk[: max(self.drop_after - self.sent, 0)])
            return
        self.sent += len(chunk)
        self.request.write(chunk)

    def _drop(self, last: bytes) -> None:
        """Send ``last`` and close the connection: the client sees a short body."""
        if last:
            self.request.write(last)
            self.sent += len(last)
        self._close()
        self.request.unregisterProducer()
        log.info("fault injection: download cut after {sent} bytes", sent=self.sent)
        transport = getattr(self.request, "transport", None)
        if transport is not None:
            # The HTTP channel stays registered as the transport's producer; while it
            # is paused the transport would resume it instead of closing, forever.
            transport.unregisterProducer()
            transport.loseConnection()

    def _close(self) -> None:
        self.done = True
        if self.file is not None:
            self.file.close()
            self.file = None

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self._produce()

    def stopProducing(self) -> None:
        self._close()


class FileStream(Resource):
    """``slides/{id}/files``: one file as ``application/octet-stream`` with
    Content-Disposition, or several as ``multipart/related``; always with Content-Length,
    streamed from disk or memory; cut after ``drop_after`` body bytes when set."""

    isLeaf = True

    def __init__(
        self,
        files: Sequence[tuple[str, Segment]],
        boundary: str,
        drop_after: int | None = None,
    ) -> None:
        super().__init__()
        if not files:
            raise ValueError("nothing to stream")
        self.files = list(files)
        self.boundary = boundary
        self.drop_after = drop_after

    def render_GET(self, request: IRequest) -> Any:
        """Set the headers and start the producer.

        A single file honours ``Range: bytes=N-`` (206 with Content-Range; 416 past the
        end) unless an ``If-Range`` names another version than its ``ETag``, so an
        interrupted download can resume as it may with a real server.
        """
        skip = 0
        if len(self.files) == 1:
            name, content = self.files[0]
            segments: list[Segment] = [content]
            size = _size(content)
            etag = _etag(content)
            request.setHeader(b"content-type", b"application/octet-stream")
            request.setHeader(b"content-disposition", f'attachment; filename="{_quote(name)}"')
            request.setHeader(b"etag", etag)
            request.setHeader(b"accept-ranges", b"bytes")
            start = _range_start(request, etag)
            if start is not None and start >= size:
                request.setResponseCode(416)
                request.setHeader(b"content-range", f"bytes */{size}")
                request.setHeader(b"content-length", b"0")
                return b""
            if start:
                request.setResponseCode(206)
                request.setHeader(b"content-range", f"bytes {start}-{size - 1}/{size}")
                if isinstance(content, bytes):
                    segments = [content[start:]]
                else:
                    skip = start
                request.setHeader(b"content-length", str(size - start))
                _SegmentProducer(request, segments, self.drop_after, skip).start()
                return NOT_DONE_YET
        else:
            segments = multipart_segments(self.files, self.boundary)
            request.setHeader(b"content-type", f"multipart/related; boundary={self.boundary}")
        request.setHeader(b"content-length", str(sum(_size(s) for s in segments)))
        request.setResponseCode(200)
        _SegmentProducer(request, segments, self.drop_after).start()
        return NOT_DONE_YET


def _etag(content: Segment) -> str:
    """A strong validator: the bytes' digest, or a file's size and modification time."""
    if isinstance(content, bytes):
        return '"' + hashlib.sha256(content).hexdigest()[:24] + '"'
    st = content.stat()
    return f'"{st.st_size:x}-{st.st_mtime_ns:x}"'


def _range_start(request: IRequest, etag: str) -> int | None:
    """N of a ``Range: bytes=N-`` request that may be honoured, else None."""
    raw = request.getHeader(b"range")
    if raw is None:
        return None
    if_range = request.getHeader(b"if-range")
    if if_range is not None and if_range.decode("latin-1") != etag:
        return None  # another version than the client has: send it whole
    match = re.fullmatch(rb"bytes=(\d+)-", raw.strip())
    return int(match.group(1)) if match else None


__all__ = [
    "DOWN_MODES",
    "ERROR_STATUSES",
    "DelayedResource",
    "DownMode",
    "Faults",
    "FileStream",
    "multipart_segments",
]
