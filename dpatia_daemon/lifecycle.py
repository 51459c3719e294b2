"""The life of the daemon's service tree, apart from any one part of it: the root that
stops its children in order, the "ready" line, services that only wait at stop, and the
reactor's thread pool for the parts that do blocking file work.

:func:`dpatia_daemon.service.build_service` wires these; they know nothing of jobs, the
SPS or HTTP.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet import threads
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorCore, IReactorThreads
from twisted.logger import ILogObserver, Logger
from twisted.python.components import Componentized

from .spool import SpoolError

log = Logger()


class OrderedRoot(MultiService):
    """The tree's root: a child that cannot start (an unusable spool) stops the daemon
    with one line, not a traceback, and a non-zero exit status; at stop, the children
    stop one after another, last started first.

    ``log_observer``, when set, is what twistd logs to: the root hands it to twistd's
    application as its ``ILogObserver`` component, which twistd uses unless its
    command line names another (``--logger``).
    """

    log_observer: ILogObserver | None = None

    def setServiceParent(self, parent: Any) -> None:
        if self.log_observer is not None and isinstance(parent, Componentized):
            parent.setComponent(ILogObserver, self.log_observer)
        super().setServiceParent(parent)

    def startService(self) -> None:
        try:
            super().startService()
        except SpoolError as e:
            raise SystemExit(f"dpatia: cannot start: {e}") from None

    def stopService(self) -> Deferred[None]:
        """Stop the children one at a time, last started first.

        MultiService would stop them all at once; the workers' drain needs the SPS
        pool and the spool until it is over.
        """
        Service.stopService(self)
        return Deferred.fromCoroutine(self._stop_in_order())

    async def _stop_in_order(self) -> None:
        for service in reversed(list(self)):
            try:
                await maybeDeferred(service.stopService)
            except Exception:
                log.failure("stopping service {name} failed", name=service.name)


class Ready(Service):
    """Logs ``message`` ("ready") once the reactor runs: only then are its signal
    handlers in place, so a SIGTERM from then on is a clean shutdown.  Harnesses wait
    for this line."""

    def __init__(self, reactor: IReactorCore, message: str) -> None:
        self.reactor = reactor
        self.message = message

    def startService(self) -> None:
        super().startService()
        self.reactor.callWhenRunning(log.info, self.message)
        self.reactor.callWhenRunning(settle_gc)


#: The collector's thresholds once started: young collections every 10 000 net
#: allocations instead of 700 (a request allocates hundreds of objects), older ones
#: as before relative to them.
GC_THRESHOLDS = (10_000, 20, 10)


def settle_gc() -> None:
    """After start-up: collect once, move everything alive into the permanent
    generation (``gc.freeze``: modules, config, the service tree are never scanned
    again, so full collections, whose pauses grow with the heap, stay short), and
    raise the thresholds (:data:`GC_THRESHOLDS`)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


class Stopper(Service):
    """A service whose only job is to wait, at stop, for what ``on_stop`` returns
    (closing a connection pool, draining a queue)."""

    def __init__(self, on_stop: Callable[[], Deferred[None] | None]) -> None:
        self.on_stop = on_stop

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        return self.on_stop()


def in_thread(reactor: IReactorThreads, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
    """Run blocking file work (removing a job's work folder) in ``reactor``'s thread pool."""
    return threads.deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)
