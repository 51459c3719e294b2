"""The waiting room: queued jobs the dispatcher may not start yet, and when each may.

A queued job waits while it is deferred (its ``not_before`` is in the future, see
:mod:`.faults`) or while its SPS is failing (:class:`~.health.SPSHealth`).  The
dispatcher asks :meth:`WaitingRoom.admit` of every candidate before claiming it: a job
that may not start is kept here, and one timer (the earliest ``not_before`` or probe
due) hands it back when it may.  When a failing SPS answers again, every job waiting
for it is handed back at once, and a job deferred *because of* that SPS has its
deferral cleared in the spool first (:meth:`resume`), so that no daemon on the spool
waits out its backoff.
"""

from __future__ import annotations

from collections.abc import Callable

from attrs import define, field
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from ..jobs import DeferralKind, Job, JobState
from ..spool import ISpool, JobChanged, JobMoved
from ..spool.transitions import resumed
from .health import SPSHealth, sps_of
from .timers import cancel_call

log = Logger()


@define(eq=False)
class WaitingRoom:
    """Jobs held back from dispatch, and the timer that hands them back.

    Collaborators: the ``clock``, the ``spool`` (to clear a deferral), the shared
    ``health`` view, and ``offer``, which gives a job back to the dispatcher.
    """

    clock: IReactorTime
    spool: ISpool
    health: SPSHealth
    offer: Callable[[Job], None]
    _jobs: dict[str, Job] = field(factory=dict, init=False)
    _timer: IDelayedCall | None = field(default=None, init=False)
    _timer_at: float = field(default=float("inf"), init=False)

    def __len__(self) -> int:
        return len(self._jobs)

    def jobs(self) -> list[Job]:
        """The jobs waiting here (for the status page and tests)."""
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
            self._hold(job)
            return False
        if job.ready(now):
            return True
        self._hold(job)
        return False

    def _hold(self, job: Job) -> None:
        self._jobs[job.job_id] = job
        due = self._due(job)
        if due < self._timer_at:
            self._schedule(due)

    def _due(self, job: Job) -> float:
        probe = self.health.next_probe(job.callback.url)
        if probe is not None:
            return probe
        return job.not_before if job.not_before is not None else self.clock.seconds()

    def _schedule(self, at: float) -> None:
        cancel_call(self._timer)
        self._timer_at = at
        self._timer = self.clock.callLater(max(0.0, at - self.clock.seconds()), self._wake)

    def _wake(self) -> None:
        """Hand back every job whose time came; wait for the next one."""
        self._timer, self._timer_at = None, float("inf")
        now = self.clock.seconds()
        due = [job for job in self._jobs.values() if self._due(job) <= now]
        for job in due:
            del self._jobs[job.job_id]
        later = min((self._due(job) for job in self._jobs.values()), default=None)
        if later is not None:
            self._schedule(later)
        for job in due:
            self.offer(job)

    def sps_recovered(self, sps: str) -> None:
        """The SPS ``sps`` answers again: its jobs go back now (their deferral cleared)."""
        mine = [job for job in self._jobs.values() if sps_of(job.callback.url) == sps]
        for job in mine:
            del self._jobs[job.job_id]
            if job.deferral_kind is DeferralKind.SPS:
                self.resume(job)
            elif job.ready(self.clock.seconds()):
                self.offer(job)
            else:
                self._hold(job)

    def discard(self, job_id: str) -> None:
        """Forget ``job_id`` (it was cancelled, say)."""
        self._jobs.pop(job_id, None)

    def resume(self, job: Job) -> None:
        """Clear ``job``'s deferral in the spool, then give it back."""
        d = Deferred.fromCoroutine(self._resume(job))
        d.addErrback(
            lambda f: log.failure("job {job_id}: resuming it failed", f, job_id=job.job_id)
        )

    async def _resume(self, job: Job) -> None:
        try:
            try:
                stored = await self.spool.update(resumed(job))
            except JobChanged:
                # A newer request was merged in meanwhile: resume the record as it is now.
                latest = await self.spool.get(job.job_id)
                if latest is None or latest.state is not JobState.QUEUED:
                    raise JobMoved(job.job_id) from None
                stored = await self.spool.update(resumed(latest))
        except JobMoved:
            # Claimed, cancelled or gone meanwhile: nothing to resume (and if it was to
            # probe its SPS, the next job will).
            self.health.probe_ended(job.callback.url, job.job_id)
            return
        log.info(
            "job {job_id}: resumed at once (it was deferred: {reason})",
            job_id=stored.job_id,
            reason=job.deferred_reason,
        )
        self.offer(stored)

    def close(self) -> None:
        """Stop the timer (the jobs stay queued in the spool)."""
        cancel_call(self._timer)
        self._timer, self._timer_at = None, float("inf")
        self._jobs.clear()


__all__ = ["WaitingRoom"]
