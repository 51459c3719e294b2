"""The waiting room: queued jobs the dispatcher may not start yet, and when each may.

A queued job waits while it is deferred (its ``not_before`` is in the future, see
:mod:`.faults`) or while its SPS is failing (:class:`~.health.SPSHealth`).  The
dispatcher asks :meth:`WaitingRoom.admit` of every candidate before claiming it: a job
that may not start is kept here, and one timer (the earliest ``not_before`` or probe
due) hands it back when it may.  When a failing SPS answers again, every job waiting
for it is handed back at once, and a job deferred *because of* that SPS has its
deferral cleared in the spool first (:meth:`resume`), so that no daemon on the spool
waits out its backoff.

Only a :class:`Waiting` note of each job is kept (its id, key, SPS and deferral: a few
hundred bytes), not the job: an outage can leave the whole backlog waiting here, and
the parsed requests stay on disk.  A job handed back is read again from its record
(``spool.queued_of``: one file read), which is also the truth after a merge or a
claim by another daemon meanwhile.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from attrs import define, field, frozen
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from ..jobs import DeferralKind, Job
from ..spool import ISpool, JobChanged, JobMoved
from ..spool.transitions import resumed
from .health import SPSHealth, sps_of
from .timers import cancel_call

log = Logger()


def _shared(text: str | None) -> str | None:
    # The same SPS URL and deferral reason recur across a whole backlog: one copy each.
    return sys.intern(text) if text is not None else None


@frozen
class Waiting:
    """What the waiting room keeps of a job: enough to know when it may go, and to
    read it again then."""

    job_id: str
    key: str
    url: str
    not_before: float | None
    kind: DeferralKind | None
    reason: str | None

    @classmethod
    def of(cls, job: Job) -> Waiting:
        url = _shared(job.callback.url)
        assert url is not None
        return cls(
            job.job_id,
            job.key,
            url,
            job.not_before,
            job.deferral_kind,
            _shared(job.deferred_reason),
        )

    def ready(self, now: float) -> bool:
        return self.not_before is None or self.not_before <= now


@define(eq=False)
class WaitingRoom:
    """Jobs held back from dispatch, and the timer that hands them back.

    Collaborators: the ``clock``, the ``spool`` (to read a job again, and to clear a
    deferral), the shared ``health`` view, and ``offer``, which gives a job back to the
    dispatcher.
    """

    clock: IReactorTime
    spool: ISpool
    health: SPSHealth
    offer: Callable[[Job], None]
    _jobs: dict[str, Waiting] = field(factory=dict, init=False)
    _timer: IDelayedCall | None = field(default=None, init=False)
    _timer_at: float = field(default=float("inf"), init=False)

    def __len__(self) -> int:
        return len(self._jobs)

    def __contains__(self, job_id: object) -> bool:
        """Whether ``job_id`` waits here (a refill of the candidates skips it)."""
        return job_id in self._jobs

    def jobs(self) -> list[Waiting]:
        """What is kept of the jobs waiting here (for the status page and tests)."""
        return list(self._jobs.values())

    def admit(self, job: Job) -> bool:
        """Whether ``job`` may be claimed now; if not, it waits here."""
        url, now = job.callback.url, self.clock.seconds()
        if (
            not self.health.down(url)
            and not job.ready(now)
            and job.deferral_kind is DeferralKind.SPS
        ):
            # Deferred for its SPS by another daemon, or before a restart: this daemon
            # does not know the SPS is failing.  A probe, due now, finds out.
            self.health.suspect(url, job.deferred_reason or "deferred")
        if self.health.down(url):
            if self.health.probe_due(url):
                self.health.probing(url, job.job_id)
                if job.ready(now):
                    return True
                self.resume(job)  # the probe runs now, whatever its own backoff says
                return False
            if job.ready(now) and self.health.is_probe(url, job.job_id):
                return True
            self._hold(Waiting.of(job))
            return False
        if job.ready(now):
            return True
        self._hold(Waiting.of(job))
        return False

    def _hold(self, waiting: Waiting) -> None:
        self._jobs[waiting.job_id] = waiting
        due = self._due(waiting)
        if due < self._timer_at:
            self._schedule(due)

    def _due(self, waiting: Waiting) -> float:
        probe = self.health.next_probe(waiting.url)
        if probe is not None:
            return probe
        return waiting.not_before if waiting.not_before is not None else self.clock.seconds()

    def _schedule(self, at: float) -> None:
        cancel_call(self._timer)
        self._timer_at = at
        self._timer = self.clock.callLater(max(0.0, at - self.clock.seconds()), self._wake)

    def _wake(self) -> None:
        """Hand back every job whose time came; wait for the next one.

        Of the jobs of a failing SPS, one goes back at its probe time (the probe): the
        rest wait for its answer, here, without being read again, however many they are.
        """
        self._timer, self._timer_at = None, float("inf")
        now = self.clock.seconds()
        due: list[Waiting] = []
        probes: set[str] = set()
        for waiting in self._jobs.values():
            if self._due(waiting) > now:
                continue
            if self.health.down(waiting.url):
                sps = sps_of(waiting.url)
                if sps in probes:
                    continue
                probes.add(sps)
            due.append(waiting)
        for waiting in due:
            del self._jobs[waiting.job_id]

        def at(waiting: Waiting) -> float:
            when = self._due(waiting)
            if sps_of(waiting.url) in probes:
                return max(when, now + self.health.probe_interval)
            return when

        later = min((at(waiting) for waiting in self._jobs.values()), default=None)
        if later is not None:
            self._schedule(later)
        for waiting in due:
            self._hand_back(waiting)

    def _hand_back(self, waiting: Waiting) -> None:
        """Read ``waiting``'s job again and give it to the dispatcher, if still queued."""
        d = Deferred.fromCoroutine(self._read_again(waiting))
        d.addErrback(
            lambda f: log.failure(
                "job {job_id}: reading it again failed; the next sweep finds it",
                f,
                job_id=waiting.job_id,
            )
        )

    async def _read_again(self, waiting: Waiting) -> None:
        try:
            job = await self._latest(waiting)
        except JobMoved:
            # Claimed, cancelled or merged away meanwhile: whatever is queued for its
            # key now was announced on its own.
            self.health.probe_ended(waiting.url, waiting.job_id)
            return
        self.offer(job)

    def sps_recovered(self, sps: str) -> None:
        """The SPS ``sps`` answers again: its jobs go back now (their deferral cleared)."""
        mine = [waiting for waiting in self._jobs.values() if sps_of(waiting.url) == sps]
        now = self.clock.seconds()
        for waiting in mine:
            del self._jobs[waiting.job_id]
            if waiting.kind is DeferralKind.SPS:
                self._run_resume(waiting, None)
            elif waiting.ready(now):
                self._hand_back(waiting)
            else:
                self._hold(waiting)

    def discard(self, job_id: str) -> None:
        """Forget ``job_id`` (it was cancelled, say)."""
        self._jobs.pop(job_id, None)

    def resume(self, job: Job) -> None:
        """Clear ``job``'s deferral in the spool, then give it back."""
        self._run_resume(Waiting.of(job), job)

    def _run_resume(self, waiting: Waiting, job: Job | None) -> None:
        d = Deferred.fromCoroutine(self._resume(waiting, job))
        d.addErrback(
            lambda f: log.failure("job {job_id}: resuming it failed", f, job_id=waiting.job_id)
        )

    async def _latest(self, waiting: Waiting) -> Job:
        """The queued record of ``waiting``'s job as it is now; JobMoved if it is not."""
        _, latest = await self.spool.queued_of(waiting.key)
        if latest is None or latest.job_id != waiting.job_id:
            raise JobMoved(waiting.job_id)
        return latest

    async def _resume(self, waiting: Waiting, job: Job | None) -> None:
        try:
            try:
                stored = await self.spool.update(resumed(job or await self._latest(waiting)))
            except JobChanged:
                # A newer request was merged in meanwhile: resume the record as it is now.
                stored = await self.spool.update(resumed(await self._latest(waiting)))
        except JobMoved:
            # Claimed, cancelled or gone meanwhile: nothing to resume (and if it was to
            # probe its SPS, the next job will).
            self.health.probe_ended(waiting.url, waiting.job_id)
            return
        log.info(
            "job {job_id}: resumed at once (it was deferred: {reason})",
            job_id=stored.job_id,
            reason=waiting.reason,
        )
        self.offer(stored)

    def close(self) -> None:
        """Stop the timer (the jobs stay queued in the spool)."""
        cancel_call(self._timer)
        self._timer, self._timer_at = None, float("inf")
        self._jobs.clear()


__all__ = ["Waiting", "WaitingRoom"]
