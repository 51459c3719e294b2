"""Worker output as log lines: :class:`LineLog` splits, decodes, cuts and rate-limits.

A worker's stdout and stderr are whatever its analysis prints: possibly huge lines,
binary bytes or a flood.  Each stream goes through one :class:`LineLog`, so the daemon's
log stays readable and bounded whatever the analysis does.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from attrs import define, field
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from .timers import cancel_call

log = Logger()

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


@define
class LineLog:
    """Turns a byte stream into log lines: split, decoded, cut and rate-limited.

    Lines longer than ``max_line`` bytes are cut (the rest of that line is skipped);
    bytes that are not UTF-8 and control characters are escaped; at most ``rate``
    lines per second are logged (bursts of ``burst``), the rest are counted and
    reported as one "dropped" line.  ``emit(text)`` logs one line.
    """

    emit: Callable[[str], None]
    clock: IReactorTime
    max_line: int = 4096
    rate: float = 50.0
    burst: float = 200.0
    _buffer: bytearray = field(factory=bytearray, init=False)
    _skipping: bool = field(default=False, init=False)
    _tokens: float = field(default=-1.0, init=False)
    _last: float = field(default=0.0, init=False)
    _dropped: int = field(default=0, init=False)
    _report: IDelayedCall | None = field(default=None, init=False)

    def feed(self, data: bytes) -> None:
        """Take more output."""
        self._buffer += data
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                break
            line = bytes(self._buffer[:end])
            del self._buffer[: end + 1]
            if self._skipping:
                self._skipping = False  # the tail of a line already cut
                continue
            self._line(line)
        if len(self._buffer) > self.max_line:
            if not self._skipping:
                self._line(bytes(self._buffer[: self.max_line]), cut=True)
            self._skipping = True
            self._buffer.clear()

    def flush(self) -> None:
        """Log what is left (the process ended without a final newline)."""
        if self._buffer and not self._skipping:
            self._line(bytes(self._buffer))
        self._buffer.clear()
        self._skipping = False
        self._report_dropped()

    def _report_dropped(self) -> None:
        cancel_call(self._report)
        self._report = None
        if self._dropped:
            self._say(f"[{self._dropped} lines dropped: more than {self.rate:g} lines/s]")
            self._dropped = 0

    def _line(self, raw: bytes, cut: bool = False) -> None:
        now = self.clock.seconds()
        if self._tokens < 0:
            self._tokens = self.burst
        else:
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        if self._tokens < 1:
            self._dropped += 1
            if self._report is None:
                # Say so within a second even if the flood was the last output.
                self._report = self.clock.callLater(1.0, self._report_dropped)
            return
        self._tokens -= 1
        self._report_dropped()
        text = raw.rstrip(b"\r").decode("utf-8", "backslashreplace")
        text = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
        if cut:
            text += f" [line cut at {self.max_line} bytes]"
        self._say(text)

    def _say(self, text: str) -> None:
        try:
            self.emit(text)
        except Exception:
            log.failure("logging a worker's output failed")


__all__ = ["LineLog"]
