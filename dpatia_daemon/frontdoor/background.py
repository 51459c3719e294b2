"""A small FIFO of fire-and-forget SPS writes, run a few at a time, and held back while
the front door is busy answering.

The front door answers image notifications at once and stores their "queued" frame
afterwards.  Run unbounded, a burst of imports would start two SPS calls per
notification at the same moment: the daemon would spend its CPU on those instead of
acknowledging, and the SPS would see a thundering herd.  This queue runs them oldest
first with bounded concurrency; each task decides for itself, when its turn comes,
whether it is still worth doing (a job a worker already picked up needs no frame).

While requests are being answered, a task waits until the front door is idle or until
it has waited ``max_delay`` seconds, and then runs alone: during a burst of imports the
CPU goes to acknowledgements (what the SPS waits for), the frames follow within
seconds (nobody is looking at a slide being imported), and a stream that never pauses
still gets every frame, one after another.

The front door's writes tell the shared :class:`~dpatia_daemon.workers.health.SPSHealth`
how the SPS answered (:func:`reporting`), as the workers' calls do: an SPS the workers
know to be failing gets no doomed "queued" frame (the worker writes its own progress
when the job runs), and one that fails a front-door write is known to the workers at
once.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from attrs import define, field
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..sps.errors import SPSError, is_transient
from ..workers.health import SPSHealth

log = Logger()
T = TypeVar("T")

Task = Callable[[], Coroutine[Any, Any, Any]]


@define
class BackgroundQueue:
    """Runs submitted tasks oldest first, at most ``concurrency`` at a time.

    ``clock`` (the reactor in the daemon, a ``task.Clock`` in tests) times the
    hold-back while the front door is busy.
    """

    clock: IReactorTime
    concurrency: int = 4
    #: While this says the front door is answering requests, a task waits (see above).
    busy: Callable[[], bool] = lambda: False
    #: The longest a task waits for the front door to go idle before it runs anyway.
    max_delay: float = 5.0
    _waiting: deque[tuple[str, Task, float]] = field(factory=deque, init=False)
    _running: int = field(default=0, init=False)
    _idle: list[Deferred[None]] = field(factory=list, init=False)
    _closed: bool = field(default=False, init=False)
    _timer: IDelayedCall | None = field(default=None, init=False)

    def submit(self, name: str, task: Task) -> None:
        """Queue ``task`` (a coroutine factory); ``name`` labels it in the log."""
        if self._closed:
            log.warn("not running {name}: the daemon is stopping", name=name)
            return
        self._waiting.append((name, task, self.clock.seconds()))
        self._next()

    @property
    def backlog(self) -> int:
        return len(self._waiting) + self._running

    def drain(self) -> Deferred[None]:
        """Fire when every submitted task has run."""
        if not self.backlog:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle.append(d)
        return d

    def close(self) -> Deferred[None]:
        """Drop the tasks not started yet (they are best effort); wait for the rest."""
        self._closed = True
        self._cancel_timer()
        if self._waiting:
            log.info(
                "stopping: {count} background SPS writes not started are dropped",
                count=len(self._waiting),
            )
            self._waiting.clear()
        return self.drain()

    def wake(self) -> None:
        """The front door went idle: use the full concurrency again."""
        self._next()

    def _limit(self) -> int:
        if not self.busy():
            return self.concurrency
        overdue = self.clock.seconds() - self._waiting[0][2] >= self.max_delay
        return 1 if overdue else 0

    def _next(self) -> None:
        while self._waiting and self._running < self._limit():
            name, task, _ = self._waiting.popleft()
            self._running += 1
            ensureDeferred(task()).addErrback(self._failed, name).addBoth(self._done)
        if self._waiting and not self._running and not self._closed:
            # Held back by a busy front door with nothing running: come back when the
            # oldest task is due (sooner if the front door goes idle: wake()).
            due = self._waiting[0][2] + self.max_delay - self.clock.seconds()
            if self._timer is None:
                self._timer = self.clock.callLater(max(0.0, due), self._due)
        if not self.backlog:
            self._cancel_timer()
            idle, self._idle = self._idle, []
            for d in idle:
                d.callback(None)

    def _due(self) -> None:
        self._timer = None
        self._next()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None

    @staticmethod
    def _failed(failure: Failure, name: str) -> None:
        log.failure("background task {name} failed", failure, name=name)

    def _done(self, _: object) -> None:
        self._running -= 1
        self._next()


async def reporting(health: SPSHealth | None, url: str, call: Awaitable[T]) -> T:
    """Await ``call`` (an SPS write to callback ``url``) and tell ``health`` how the
    SPS answered: a success clears a failing SPS, a transient failure marks it."""
    try:
        result = await call
    except SPSError as e:
        if health is not None and is_transient(e):
            health.failed(url, str(e) or type(e).__name__, e.retry_after)
        raise
    if health is not None:
        health.succeeded(url)
    return result

