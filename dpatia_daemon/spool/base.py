"""What the two spool services share: the watchers and the ISpool methods over a core.

Both spools are a Twisted service over a synchronous core with the same methods (the
blocking :class:`~dpatia_daemon.spool.store.SpoolStore`, or the dictionaries of
:class:`~dpatia_daemon.spool.memory.MemorySpool`).  :class:`SpoolService` turns the
core's methods into the Deferred-returning :class:`~dpatia_daemon.spool.ISpool`
methods, once for both; a subclass says how a call runs (:meth:`SpoolService._call`:
in a thread pool, or at once), how a job becoming QUEUED is announced, and how ``add``
works (group commit, or at once).
"""

from __future__ import annotations

from collections.abc import Callable, Container
from typing import Any, Protocol

from attrs import define, field
from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger

from ..jobs import Deferral, Job, JobState
from .interface import ACTIVE, SpoolRoom, check_id, check_job
from .transitions import JobFilter

log = Logger()


@define(eq=False)
class _Subscription:
    """One watcher's place in :class:`Watchers`; calling it unsubscribes (once)."""

    watchers: Watchers
    callback: Callable[[Job], None]

    def __call__(self) -> None:
        if self in self.watchers.subscriptions:
            self.watchers.subscriptions.remove(self)


@define(eq=False)
class Watchers:
    """Observers of jobs becoming QUEUED; a raising observer is logged, never propagated."""

    subscriptions: list[_Subscription] = field(factory=list)

    def add(self, callback: Callable[[Job], None]) -> Callable[[], None]:
        """Call ``callback`` for every job notified from now on; return an unsubscribe."""
        subscription = _Subscription(self, callback)
        self.subscriptions.append(subscription)
        return subscription

    def notify(self, job: Job) -> None:
        """Call every watcher with ``job``; log (and swallow) what they raise."""
        for subscription in list(self.subscriptions):
            try:
                subscription.callback(job)
            except Exception:
                log.failure("spool watcher {callback!r} failed", callback=subscription.callback)


class SpoolCore(Protocol):
    """The synchronous operations a spool service runs (see :class:`ISpool` for each)."""

    def get(self, job_id: str) -> Job | None: ...

    def find(self, criteria: JobFilter) -> list[Job]: ...

    def queued(self) -> list[Job]: ...

    def queued_head(
        self, limit: int, skip: Container[str] = (), after: Job | None = None
    ) -> list[Job]: ...

    def active_keys(self) -> set[str]: ...

    def counts(self) -> dict[JobState, int]: ...

    def room(self, count_queued: bool = False) -> SpoolRoom: ...

    def queued_of(self, key: str, seen: object = None) -> tuple[object, Job | None]: ...

    def update(self, job: Job) -> Job: ...

    def claim(self, job_id: str, now: float | None = None) -> Job | None: ...

    def finish(self, job_id: str, state: JobState, error: str | None = None) -> Job: ...

    def release(
        self,
        job_id: str,
        *,
        count_attempt: bool,
        error: str | None = None,
        deferral: Deferral | None = None,
    ) -> Job: ...

    def cancel(self, job_id: str, reason: str = "cancelled") -> Job | None: ...

    def request_cancel(self, job_id: str) -> None: ...

    def cancel_requested(self, job_id: str) -> bool: ...

    def recover(self) -> list[Job]: ...


@define(eq=False)
class SpoolService(Service):
    """The ISpool methods (all but ``add``) over :meth:`_core`, run by :meth:`_call`."""

    _watchers: Watchers = field(init=False, factory=Watchers)

    def _core(self) -> SpoolCore:
        """The synchronous core whose methods this service runs."""
        raise NotImplementedError

    def _call(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
        """Run ``f(*args, **kwargs)`` of the core; a Deferred of its result."""
        raise NotImplementedError

    def _announce(self, job: Job) -> None:
        """Tell the watchers that ``job`` is QUEUED (if it is)."""
        raise NotImplementedError

    def watch(self, callback: Callable[[Job], None]) -> Callable[[], None]:
        """Register ``callback`` for jobs becoming QUEUED; return an unsubscribe function."""
        return self._watchers.add(callback)

    def _checked(self, job_id: str, f: Callable[..., Any], *args: Any, **kw: Any) -> Deferred[Any]:
        try:
            check_id(job_id)
        except ValueError:
            return fail()
        return self._call(f, job_id, *args, **kw)

    def _announce_all(self, jobs: list[Job]) -> list[Job]:
        for job in jobs:
            self._announce(job)
        return jobs

    def get(self, job_id: str) -> Deferred[Job | None]:
        """Return the job with ``job_id`` in any state, or None."""
        return self._checked(job_id, self._core().get)

    def find(
        self,
        *,
        slide_id: str | None = None,
        result_id: int | None = None,
        cancellation_token: str | None = None,
        states: frozenset[JobState] = ACTIVE,
    ) -> Deferred[list[Job]]:
        """Return the jobs in ``states`` matching every given criterion."""
        criteria = JobFilter(frozenset(states), slide_id, result_id, cancellation_token)
        return self._call(self._core().find, criteria)

    def queued(self) -> Deferred[list[Job]]:
        """Return all QUEUED jobs in dispatch order."""
        return self._call(self._core().queued)

    def queued_head(
        self, limit: int, skip: Container[str] = (), after: Job | None = None
    ) -> Deferred[list[Job]]:
        """Return the best ``limit`` QUEUED jobs in dispatch order, but those in ``skip``
        and, with ``after``, those not after it.  ``skip`` is read (``in`` only) from the
        spool's thread while the call runs: a frozen set, or a live container whose
        single lookups the GIL keeps safe (the dispatcher's jobs in hand)."""
        return self._call(self._core().queued_head, limit, skip, after)

    def active_keys(self) -> Deferred[set[str]]:
        """Return the keys of every QUEUED or RUNNING job."""
        return self._call(self._core().active_keys)

    def counts(self) -> Deferred[dict[JobState, int]]:
        """Return the number of jobs in each state."""
        return self._call(self._core().counts)

    def room(self, count_queued: bool = False) -> Deferred[SpoolRoom]:
        """Return the free space (and, with ``count_queued``, the queued records)."""
        return self._call(self._core().room, count_queued)

    def update(self, job: Job) -> Deferred[Job]:
        """Rewrite a QUEUED or RUNNING job's record durably."""
        try:
            check_job(job)
        except ValueError:
            return fail()
        return self._call(self._core().update, job)

    def claim(self, job_id: str, now: float | None = None) -> Deferred[Job | None]:
        """Move a QUEUED job to RUNNING, held by this spool; None if not possible
        (with ``now``: also while the job is deferred past it)."""
        return self._checked(job_id, self._core().claim, now)

    def finish(self, job_id: str, state: JobState, error: str | None = None) -> Deferred[Job]:
        """End a held RUNNING job as DONE, FAILED or CANCELLED."""
        return self._checked(job_id, self._core().finish, state, error)

    def release(
        self,
        job_id: str,
        *,
        count_attempt: bool,
        error: str | None = None,
        deferral: Deferral | None = None,
    ) -> Deferred[Job]:
        """Put a held RUNNING job back to QUEUED (or CANCELLED if that was requested),
        waiting until ``deferral.not_before`` when given."""
        d = self._checked(
            job_id,
            self._core().release,
            count_attempt=count_attempt,
            error=error,
            deferral=deferral,
        )
        return d.addCallback(lambda job: self._announce_all([job])[0])

    def cancel(self, job_id: str, reason: str = "cancelled") -> Deferred[Job | None]:
        """Cancel a QUEUED job; None if it is not queued any more."""
        return self._checked(job_id, self._core().cancel, reason)

    def request_cancel(self, job_id: str) -> Deferred[None]:
        """Ask the holder of a RUNNING job to stop it (a QUEUED job is cancelled at once)."""
        return self._checked(job_id, self._core().request_cancel)

    def cancel_requested(self, job_id: str) -> Deferred[bool]:
        """Return whether a cancellation of ``job_id`` was requested."""
        return self._checked(job_id, self._core().cancel_requested)

    def recover(self) -> Deferred[list[Job]]:
        """Requeue (attempts + 1) every RUNNING job whose holder process is dead."""
        return self._call(self._core().recover).addCallback(self._announce_all)

    def queued_of(self, key: str, seen: object = None) -> Deferred[tuple[object, Job | None]]:
        """The QUEUED record of ``key`` if it changed since tag ``seen`` (see ISpool)."""
        try:
            check_id(key, "job key")
        except ValueError:
            return fail()
        return self._call(self._core().queued_of, key, seen)
