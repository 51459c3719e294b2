"""What the workers' side of the daemon did, for observers (tests, benchmarks, a status page).

The pool (:mod:`.pool`) reports its processes, the dispatcher (:mod:`.dispatcher`) its
jobs, both through one :class:`Observers`, so an observer sees one ordered stream.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from attrs import define, field, frozen
from twisted.logger import Logger

log = Logger()


@frozen
class SupervisorEvent:
    """Something the workers' side did.

    ``kind`` is one of ``worker-spawned``, ``worker-ready``, ``worker-exited`` (from
    the pool; its ``cause`` a bounded label), ``job-step`` (a step of the job's attempt
    timed in the worker, from the pool: ``step``, ``seconds``, ``size``, ``requests``),
    ``job-started``, ``job-progress``, ``job-callback`` (a newer callback was handed to
    the job's worker), ``job-ended`` (from the dispatcher: ``state``, and the job's
    ``deferral`` kind and ``error`` when it went back to wait).
    """

    kind: str
    worker: str | None = None
    job_id: str | None = None
    detail: Mapping[str, Any] = field(factory=dict)


@define
class Observers:
    """The callbacks that see every :class:`SupervisorEvent`."""

    _callbacks: list[Callable[[SupervisorEvent], None]] = field(factory=list)

    def observe(self, callback: Callable[[SupervisorEvent], None]) -> Callable[[], None]:
        """Call ``callback(event)`` for every event; return an unsubscribe."""
        entry = [callback]
        self._callbacks.append(callback)

        def unsubscribe() -> None:
            if entry:
                self._callbacks.remove(entry.pop())

        return unsubscribe

    def emit(
        self, kind: str, worker: str | None = None, job_id: str | None = None, **detail: Any
    ) -> None:
        """Tell every observer; one that raises is logged and the others still hear."""
        event = SupervisorEvent(kind, worker, job_id, detail)
        for callback in list(self._callbacks):
            try:
                callback(event)
            except Exception:
                log.failure("supervisor observer {callback!r} failed", callback=callback)


__all__ = ["Observers", "SupervisorEvent"]
