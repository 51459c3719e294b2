"""The spool in memory, for unit tests of other modules: :class:`MemorySpool`.

Same semantics as the directory spool (both pass the contract tests in
``tests/spool/``), no disk: :class:`_MemoryRecords` is the synchronous core in
dictionaries, and :class:`MemorySpool` runs it at once through
:class:`~dpatia_daemon.spool.base.SpoolService`.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Container, Iterator
from typing import Any

import attrs
from attrs import define, field
from twisted.application.service import IService, Service
from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from ..jobs import Deferral, Job, JobState
from .base import SpoolService
from .interface import (
    ACTIVE,
    ISpool,
    JobChanged,
    JobMoved,
    NotHeld,
    SpoolRoom,
    check_id,
    check_job,
)
from .transitions import JobFilter, conflicts, merge_added, merge_released_into, requeued


@define(eq=False)
class _MemoryRecords:
    """The jobs of a :class:`MemorySpool` by state, and the ones it holds.

    Its public methods are :class:`~dpatia_daemon.spool.base.SpoolCore`'s, with the
    semantics :class:`~dpatia_daemon.spool.ISpool` documents.
    """

    queued_jobs: dict[str, Job] = field(factory=dict)  # key → job
    running: dict[str, Job] = field(factory=dict)  # key → job
    history: dict[str, Job] = field(factory=dict)  # job_id → job
    markers: dict[str, str] = field(factory=dict)  # job_id → key
    held: set[str] = field(factory=set)
    #: What :meth:`room` reports as free (tests set it to play a full disk).
    free_bytes: int = 2**62

    def _all(self) -> Iterator[Job]:
        yield from self.queued_jobs.values()
        yield from self.running.values()
        yield from self.history.values()

    def _enqueue(self, job: Job, merge: Callable[[Job, Job], Job]) -> Job:
        existing = self.queued_jobs.get(job.key)
        stored = merge(existing, job) if existing is not None else job
        self.queued_jobs[job.key] = stored
        return stored

    def add(self, job: Job) -> Job:
        check_job(job)
        if job.state is not JobState.QUEUED:
            raise ValueError(f"only queued jobs can be added, not {job.state.value}")
        return self._enqueue(job, merge_added)

    def _find_active(self, job_id: str) -> Job | None:
        check_id(job_id)
        for job in (*self.queued_jobs.values(), *self.running.values()):
            if job.job_id == job_id:
                return job
        return None

    def get(self, job_id: str) -> Job | None:
        return self._find_active(job_id) or self.history.get(job_id)

    def find(self, criteria: JobFilter) -> list[Job]:
        return [job for job in self._all() if criteria.matches(job)]

    def queued(self) -> list[Job]:
        return sorted(self.queued_jobs.values(), key=Job.sort_key)

    def queued_head(
        self, limit: int, skip: Container[str] = (), after: Job | None = None
    ) -> list[Job]:
        start = after.sort_key() if after is not None else None
        jobs = (
            job
            for job in self.queued_jobs.values()
            if job.job_id not in skip and (start is None or job.sort_key() > start)
        )
        return heapq.nsmallest(max(0, limit), jobs, key=Job.sort_key)

    def active_keys(self) -> set[str]:
        return set(self.queued_jobs) | set(self.running)

    def counts(self) -> dict[JobState, int]:
        out = dict.fromkeys(JobState, 0)
        for job in self._all():
            out[job.state] += 1
        return out

    def room(self, count_queued: bool = False) -> SpoolRoom:
        return SpoolRoom(self.free_bytes, len(self.queued_jobs) if count_queued else None)

    def queued_of(self, key: str, seen: object = None) -> tuple[object, Job | None]:
        job = self.queued_jobs.get(key)
        if job is None:
            return None, None
        # A record is a frozen value: a change is a different value.
        return job, (None if job == seen else job)

    def update(self, job: Job) -> Job:
        check_job(job)
        if job.state not in ACTIVE:
            raise ValueError(f"only queued or running jobs can be updated, not {job.state}")
        table = self.queued_jobs if job.state is JobState.QUEUED else self.running
        stored = table.get(job.key)
        if job.state is JobState.RUNNING and stored is not None:
            if stored.job_id == job.job_id and job.job_id not in self.held:
                raise NotHeld(f"job {job.job_id} is not held by this spool")
        if stored is None or stored.job_id != job.job_id:
            raise JobMoved(f"job {job.job_id} is no longer {job.state.value}")
        if job.state is JobState.QUEUED and conflicts(stored, job):
            raise JobChanged(f"job {job.job_id} was changed meanwhile")
        table[job.key] = job
        return job

    def claim(self, job_id: str, now: float | None = None) -> Job | None:
        job = self._find_active(job_id)
        if job is None or job.state is not JobState.QUEUED or job.key in self.running:
            return None
        if now is not None and not job.ready(now):
            return None
        del self.queued_jobs[job.key]
        running = self.running[job.key] = attrs.evolve(job, state=JobState.RUNNING)
        self.held.add(job_id)
        return running

    def _held_job(self, job_id: str) -> Job:
        job = self._find_active(job_id)
        if job is None or job.state is not JobState.RUNNING or job_id not in self.held:
            raise NotHeld(f"job {job_id} is not held by this spool")
        return job

    def _end(self, job: Job, state: JobState, error: str | None) -> Job:
        del self.running[job.key]
        self.held.discard(job.job_id)
        self.markers.pop(job.job_id, None)
        final = attrs.evolve(job, state=state, last_error=error)
        self.history[job.job_id] = final.without_secret()
        return final

    def finish(self, job_id: str, state: JobState, error: str | None = None) -> Job:
        if not state.terminal:
            raise ValueError(f"finish needs a terminal state, not {state.value}")
        return self._end(self._held_job(job_id), state, error)

    def _requeue(
        self, job: Job, *, count_attempt: bool, error: str | None, deferral: Deferral | None = None
    ) -> Job:
        if job.job_id in self.markers:
            return self._end(job, JobState.CANCELLED, error or "cancelled while it was running")
        del self.running[job.key]
        self.held.discard(job.job_id)
        return self._enqueue(
            requeued(job, count_attempt=count_attempt, error=error, deferral=deferral),
            merge_released_into,
        )

    def release(
        self,
        job_id: str,
        *,
        count_attempt: bool,
        error: str | None = None,
        deferral: Deferral | None = None,
    ) -> Job:
        return self._requeue(
            self._held_job(job_id), count_attempt=count_attempt, error=error, deferral=deferral
        )

    def cancel(self, job_id: str, reason: str = "cancelled") -> Job | None:
        job = self._find_active(job_id)
        if job is None or job.state is not JobState.QUEUED:
            return None
        del self.queued_jobs[job.key]
        final = attrs.evolve(job, state=JobState.CANCELLED, last_error=reason)
        self.history[job_id] = final.without_secret()
        return final

    def request_cancel(self, job_id: str) -> None:
        job = self._find_active(job_id)
        if job is None:
            return
        if job.state is JobState.RUNNING:
            self.markers[job_id] = job.key
        else:
            self.cancel(job_id, "cancellation requested")

    def cancel_requested(self, job_id: str) -> bool:
        return check_id(job_id) in self.markers

    def recover(self) -> list[Job]:
        """Requeue (attempts + 1) every RUNNING job not held; return the requeued ones."""
        out: list[Job] = []
        for job in list(self.running.values()):
            if job.job_id in self.held:
                continue
            stored = self._requeue(
                job, count_attempt=True, error="its holder process died while running it"
            )
            if stored.state is JobState.QUEUED:
                out.append(stored)
        return out


@implementer(ISpool, IService)
@define(eq=False)
class MemorySpool(SpoolService):
    """The spool in memory, for unit tests of other modules: same semantics, no disk.

    Every Deferred it returns has already fired.  It is one holder: everything it claims
    is held until finished or released; :meth:`abandon_held` simulates its death so that
    :meth:`recover` has something to do.
    """

    _records: _MemoryRecords = field(init=False, factory=_MemoryRecords)

    def startService(self) -> None:
        """Start (nothing to do but be running)."""
        Service.startService(self)

    def stopService(self) -> Deferred[None]:
        """Stop; held jobs are abandoned as a directory spool's would be."""
        Service.stopService(self)
        self._records.held.clear()
        return succeed(None)

    def abandon_held(self) -> None:
        """Forget every held job, as if this holder had died (test helper)."""
        self._records.held.clear()

    def _core(self) -> _MemoryRecords:
        return self._records

    def _call(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
        try:
            return succeed(f(*args, **kwargs))
        except Exception:
            return fail()

    def _announce(self, job: Job) -> None:
        if job.state is JobState.QUEUED:
            self._watchers.notify(job)

    def add(self, job: Job) -> Deferred[Job]:
        """Queue ``job``, merging into a queued job with the same key."""
        return self._call(self._records.add, job).addCallback(
            lambda stored: self._announce_all([stored])[0]
        )
