"""The workers' timers: a LoopingCall that survives its errors, and cancelling a delayed call.

Heartbeats, cancellation polls, the sweep, deadlines and throttles all use these two
helpers, so that a timer body's error never stops its loop and a delayed call is never
cancelled twice.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

log = Logger()


def every(
    clock: IReactorTime, interval: float, body: Callable[[], Any], *, now: bool
) -> LoopingCall:
    """Start a LoopingCall of ``body`` on ``clock`` that logs (and survives) its errors."""

    def safely() -> Deferred[None]:
        # A LoopingCall stops for good on its first error: log everything here.
        try:
            d = body()
        except Exception:
            log.failure("supervisor timer {name} failed", name=body.__name__)
            return succeed(None)
        if isinstance(d, Deferred):
            d.addErrback(
                lambda f: log.failure("supervisor timer {name} failed", f, name=body.__name__)
            )
            return d
        return succeed(None)

    loop = LoopingCall(safely)
    loop.clock = clock
    loop.start(interval, now=now)
    return loop


def cancel_call(call: IDelayedCall | None) -> None:
    """Cancel ``call`` if it is still pending (a fired or cancelled one is left alone)."""
    if call is not None and call.active():
        call.cancel()


__all__ = ["cancel_call", "every"]
