"""A small FIFO of fire-and-forget SPS writes, run a few at a time (one at a time while
the front door is busy answering).

The front door answers image notifications at once and stores their "queued" frame
afterwards.  Run unbounded, a burst of imports would start two SPS calls per
notification at the same moment: the daemon would spend its CPU on those instead of
acknowledging, and the SPS would see a thundering herd.  This queue runs them oldest
first with bounded concurrency; each task decides for itself, when its turn comes,
whether it is still worth doing (a job a worker already picked up needs no frame).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any

from attrs import define, field
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()

Task = Callable[[], Coroutine[Any, Any, Any]]


@define
class BackgroundQueue:
    """Runs submitted tasks oldest first, at most ``concurrency`` at a time."""

    concurrency: int = 4
    #: While this says the front door is answering requests, run one task at a time:
    #: an acknowledgement is what the SPS waits for; nobody waits for these writes.
    busy: Callable[[], bool] = lambda: False
    _waiting: deque[tuple[str, Task]] = field(factory=deque, init=False)
    _running: int = field(default=0, init=False)
    _idle: list[Deferred[None]] = field(factory=list, init=False)
    _closed: bool = field(default=False, init=False)

    def submit(self, name: str, task: Task) -> None:
        """Queue ``task`` (a coroutine factory); ``name`` labels it in the log."""
        if self._closed:
            log.warn("not running {name}: the daemon is stopping", name=name)
            return
        self._waiting.append((name, task))
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

    def _next(self) -> None:
        while self._waiting and self._running < (1 if self.busy() else self.concurrency):
            name, task = self._waiting.popleft()
            self._running += 1
            ensureDeferred(task()).addErrback(self._failed, name).addBoth(self._done)
        if not self.backlog:
            idle, self._idle = self._idle, []
            for d in idle:
                d.callback(None)

    @staticmethod
    def _failed(failure: Failure, name: str) -> None:
        log.failure("background task {name} failed", failure, name=name)

    def _done(self, _: object) -> None:
        self._running -= 1
        self._next()
