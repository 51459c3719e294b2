"""One job's run on the daemon's side: :class:`JobRun`, from claim until the spool has its end.

A :class:`JobRun` owns every SPS write of the job (the daemon writes results, never the
worker): it finds or creates the job's result, throttles progress frames to one per
``progress_interval`` (plus the final write), guarantees that no progress frame is
written after the final one, and ends the job in the spool: done, failed (after
``max_attempts``, with a failure frame), retried after a backoff, deferred (a
transient fault, :mod:`.faults`: no attempt spent, and a result already computed stays
in the work folder to be stored when the SPS answers again), cancelled or put back
unharmed at shutdown.  It tells the shared :class:`~.health.SPSHealth` how each call
to the job's SPS went.  Its :class:`RunState` says which of those it may still do.  It knows
nothing about processes: the dispatcher (:mod:`.dispatcher`) tells it how the analysis
ended.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from enum import StrEnum
from typing import Any, TypeVar

import attrs
from attrs import define, field
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..config import WorkersConfig
from ..jobs import Callback, Deferral, Job, JobState
from ..models import Result
from ..spool import ISpool, SpoolError
from ..sps.client import SPSError
from ..sps.results import CONTEXT_KEY, Status
from ..sps.writer import ResultGone, ResultWriter, Superseded, is_final
from ..text import bounded
from .faults import Fault, classify, next_try, too_old
from .folders import Outcome, Verdict, WorkFolders
from .health import SPSHealth
from .timers import cancel_call

log = Logger()

T = TypeVar("T")

#: Longest error text put in a frame's label (the full text goes in a property).
_LABEL_ERROR = 160


# --- one job --------------------------------------------------------------------------


class RunState(StrEnum):
    """What a :class:`JobRun` may still do."""

    RUNNING = "running"  # the analysis runs; progress frames are written
    QUIET = "quiet"  # it runs, but its result was finished elsewhere: no more progress
    ENDING = "ending"  # one ending (complete, fail, ...) runs; no more progress
    ABORTED = "aborted"  # the daemon is stopping: SPS calls are given up
    ENDED = "ended"  # the spool has the job's end; ``ended`` fired


class StopReason(StrEnum):
    """Why the daemon stopped a running analysis (decides how the job ends)."""

    CANCEL = "cancel"
    TIMEOUT = "timeout"
    UNRESPONSIVE = "unresponsive"
    SHUTDOWN = "shutdown"


def observe(d: Deferred[Any]) -> Deferred[None]:
    """A Deferred firing (with None) when ``d`` fires, leaving ``d``'s result alone."""
    waiter: Deferred[None] = Deferred()

    def relay(result: Any) -> Any:
        if not waiter.called:
            waiter.callback(None)
        return result

    d.addBoth(relay)
    return waiter


def _label(error: str) -> str:
    """An error as it fits in a frame's label: one line, bounded."""
    return bounded(" ".join(error.split()), _LABEL_ERROR)


def _noop(run: JobRun) -> None:
    return None


@define(eq=False)
class JobRun:
    """One claimed job, from dispatch until the spool records its end.

    Collaborators: the ``spool`` holding the job, the ``writer`` for SPS writes, the
    job's ``folders``, the ``clock`` (progress throttling).  ``on_result_gone`` is
    called when the SPS says the job's result was deleted (the supervisor then stops
    the analysis).  Exactly one of the ending coroutines (:meth:`complete`,
    :meth:`fail`, :meth:`cancel`, :meth:`requeue`, :meth:`give_up`) runs; ``ended``
    fires with the job's last record once the spool has it (None if the spool
    refused).
    """

    job: Job
    spool: ISpool
    writer: ResultWriter
    folders: WorkFolders
    clock: IReactorTime
    max_attempts: int = 3
    progress_interval: float = 2.0
    on_result_gone: Callable[[JobRun], None] = _noop
    worker: str = ""
    #: The backoff settings (``min_backoff``, ``max_backoff``, ``max_deferral_age``).
    retry: WorkersConfig = field(factory=WorkersConfig)
    health: SPSHealth | None = None
    stored: Result | None = field(default=None, init=False)
    result_gone: bool = field(default=False, init=False)
    cancel_reason: str | None = field(default=None, init=False)
    stop_reason: StopReason | None = field(default=None, init=False)
    last_cancel_check: float = field(default=float("-inf"), init=False)
    ended: Deferred[Job | None] = field(factory=Deferred, init=False)
    _resolving: Deferred[None] | None = field(default=None, init=False)
    state: RunState = field(default=RunState.RUNNING, init=False)
    #: Which ending runs (its method's name), once one was chosen: only one may.
    ending: str | None = field(default=None, init=False)
    _latest: tuple[int, str] | None = field(default=None, init=False)
    _timer: IDelayedCall | None = field(default=None, init=False)
    _inflight: Deferred[None] | None = field(default=None, init=False)
    _last_write: float = field(default=float("-inf"), init=False)
    _calls: set[Deferred[Any]] = field(factory=set, init=False)

    @property
    def job_id(self) -> str:
        return self.job.job_id

    # --- start ------------------------------------------------------------------------

    def prepare(self) -> str:
        """Create the work folder with ``job.json``; return its path (OSError if not)."""
        return self.folders.prepare(self.job).path

    def completed_result(self) -> Outcome | None:
        """What an earlier attempt of this job computed but could not store."""
        return self.folders.completed(self.job)

    def read_result(self, path: str) -> Result:
        """The result the worker wrote (:class:`UnusableResult` if it cannot be used)."""
        return self.folders.read_result(self.job, path)

    def use_callback(self, callback: Callback) -> bool:
        """A newer request for the job's slide brought ``callback``: the job's writes use
        it from now on.  True if it is new to the job and the analysis may still call
        the SPS (the dispatcher then hands it to the worker)."""
        if callback == self.job.callback:
            return False
        self.job = attrs.evolve(self.job, callback=callback)
        return self.ending is None

    def begin(self) -> None:
        """Find (or create) the job's result at the SPS, while the analysis starts."""
        if self._resolving is None:
            self._resolving = ensureDeferred(self._resolve())
            self._resolving.addErrback(
                lambda f: log.failure(
                    "job {job_id}: finding its result failed", f, job_id=self.job_id
                )
            )

    async def _resolve(self) -> None:
        try:
            self.stored = await self._call(self.writer.resolve(self.job))
        except ResultGone:
            self._gone()
            return
        except CancelledError:
            return
        except SPSError as e:
            self._sps_failed(e)
            log.warn(
                "job {job_id}: cannot find or create its result at the SPS ({error}); "
                "no progress will be shown, the final write will try again",
                job_id=self.job_id,
                error=str(e),
            )
            return
        self.sps_answered()
        await self._remember_result_id()

    async def _remember_result_id(self) -> None:
        """Record the result id in the spool, so that a delete of it finds this job."""
        stored = self.stored
        if stored is None or stored.id is None or stored.id == self.job.result_id:
            return
        try:
            self.job = await self.spool.update(attrs.evolve(self.job, result_id=stored.id))
        except SpoolError as e:
            log.warn(
                "job {job_id}: could not record result id {result_id} ({error})",
                job_id=self.job_id,
                result_id=stored.id,
                error=str(e),
            )

    def sps_answered(self) -> None:
        """A call to the job's SPS succeeded: tell the shared health view."""
        if self.health is not None:
            self.health.succeeded(self.job.callback.url)

    def _sps_failed(self, error: SPSError) -> Fault:
        """A call to the job's SPS failed: judge it, and tell the health view if the
        SPS is failing."""
        fault = classify(error, retrying=self._retrying)
        if fault.sps and self.health is not None:
            self.health.failed(self.job.callback.url, fault.reason, fault.retry_after)
        return fault

    @property
    def _retrying(self) -> bool:
        return self.job.attempts > 0 or self.job.deferred_since is not None

    def _gone(self) -> None:
        if not self.result_gone:
            self.result_gone = True
            log.info("job {job_id}: its result was deleted at the SPS", job_id=self.job_id)
            self.on_result_gone(self)

    async def _result(self, *, retry: bool) -> Result | None:
        """The stored result to write to; with ``retry``, resolve again if needed."""
        if self.stored is None and self._resolving is not None:
            await observe(self._resolving)
        if self.stored is not None or not retry:
            return self.stored
        if self.result_gone:
            raise ResultGone(f"the result of job {self.job_id} is gone")
        self.stored = await self._call(self.writer.resolve(self.job))
        await self._remember_result_id()
        return self.stored

    async def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Await an SPS call that :meth:`abort` can cancel."""
        if self.state is RunState.ABORTED:
            coro.close()
            raise CancelledError()
        d: Deferred[T] = ensureDeferred(coro)
        self._calls.add(d)
        try:
            return await d
        finally:
            self._calls.discard(d)

    def abort(self) -> None:
        """Give up every SPS call in flight (and future ones): the daemon is stopping."""
        if self.state is not RunState.ENDED:
            self.state = RunState.ABORTED
        self._cancel_timer()
        for d in list(self._calls):
            d.cancel()

    # --- progress ---------------------------------------------------------------------

    def on_progress(self, percent: int, text: str) -> None:
        """The analysis reported progress: show it, at most once per interval."""
        if self.state is not RunState.RUNNING:
            return
        self._latest = (percent, text)
        self._schedule_progress()

    def _schedule_progress(self) -> None:
        if self._inflight is not None or self._timer is not None or self._latest is None:
            return
        due = self._last_write + self.progress_interval
        now = self.clock.seconds()
        if now >= due:
            self._write_progress()
        else:
            self._timer = self.clock.callLater(due - now, self._timer_fired)

    def _timer_fired(self) -> None:
        self._timer = None
        self._write_progress()

    def _cancel_timer(self) -> None:
        cancel_call(self._timer)
        self._timer = None

    def _write_progress(self) -> None:
        latest, self._latest = self._latest, None
        if latest is None or self.state is not RunState.RUNNING:
            return
        self._last_write = self.clock.seconds()
        d = self._inflight = ensureDeferred(self._put_progress(*latest))

        def done(result: object) -> None:
            self._inflight = None
            if isinstance(result, Failure):
                log.failure("job {job_id}: progress write failed", result, job_id=self.job_id)
            if self.state is RunState.RUNNING:
                self._schedule_progress()

        d.addBoth(done)

    async def _put_progress(self, percent: int, text: str) -> None:
        try:
            stored = await self._result(retry=False)
            if stored is None or self.state is not RunState.RUNNING:
                return
            frame = self.writer.frame(self.job, Status.RUNNING, text, progress=percent)
            self.stored = await self._call(
                self.writer.update(self.job, stored, frame, keep=is_final)
            )
        except Superseded:
            if self.state is RunState.RUNNING:
                self.state = RunState.QUIET
            log.info(
                "job {job_id}: its result was finished elsewhere; no more progress frames",
                job_id=self.job_id,
            )
        except ResultGone:
            self._gone()
        except CancelledError:
            pass
        except SPSError as e:
            log.warn(
                "job {job_id}: progress update failed ({error})", job_id=self.job_id, error=str(e)
            )

    async def _quiesce(self, ending: str) -> None:
        """Choose ``ending``; stop progress frames and wait for the one in flight (the
        final write is last)."""
        if self.ending is not None:
            raise RuntimeError(f"job {self.job_id} is already ending ({self.ending})")
        self.ending = ending
        if self.state in (RunState.RUNNING, RunState.QUIET):
            self.state = RunState.ENDING
        self._cancel_timer()
        if self._inflight is not None:
            await observe(self._inflight)

    # --- endings ----------------------------------------------------------------------

    async def complete(self, result: Result, verdict: Verdict | None = None) -> None:
        """The analysis produced ``result`` (and perhaps a QC ``verdict``): store it in
        place of the frame, then the verdict; done."""
        await self._quiesce("complete")
        final = self.writer.final(self.job, result)
        try:
            stored = await self._result(retry=True)
            assert stored is not None
            self.stored = await self._call(self.writer.update(self.job, stored, final))
        except ResultGone:
            await self._end(JobState.CANCELLED, "the result was deleted at the SPS")
            return
        except CancelledError:
            # Stopping: result.json stays in the work folder; the next start writes it.
            await self._release(
                count_attempt=False, error="the daemon stopped before the result was stored"
            )
            return
        except SPSError as e:
            fault = self._sps_failed(e)
            reason = f"could not store the result at the SPS: {e}"
            if fault.transient:
                # result.json stays in the work folder: stored, never recomputed, later.
                await self._deferred(attrs.evolve(fault, reason=reason))
            else:
                await self._failed_attempt(reason)
            return
        self.sps_answered()
        log.info(
            "job {job_id}: result {result_id} stored", job_id=self.job_id, result_id=self.stored.id
        )
        if verdict is not None:
            await self._store_quality_control(verdict)
        await self._end(JobState.DONE, None)

    async def _store_quality_control(self, verdict: Verdict) -> None:
        """Send the analysis's QC verdict (IA-API.md §2.7) through the writer.

        After the result: a verdict the SPS refuses (an older SPS, a QC state changed
        by a user meanwhile) is logged, and the job still counts as done.
        """
        status = verdict.status
        try:
            done = await self._call(
                self.writer.quality_control(self.job, status, verdict.version_id)
            )
        except (SPSError, ValueError) as e:
            log.warn(
                "job {job_id}: the slide's quality-control verdict {status} was not stored: {error}",
                job_id=self.job_id,
                status=status,
                error=str(e),
            )
            return
        if done != "stored":
            log.warn(
                "job {job_id}: the slide's quality-control verdict {status} was {what}",
                job_id=self.job_id,
                status=status,
                what=done,
            )
            return
        log.info("job {job_id}: quality control set to {status}", job_id=self.job_id, status=status)

    async def fail(self, error: str) -> None:
        """The attempt failed (analysis error, crash, timeout): retry or give up."""
        await self._quiesce("fail")
        await self._failed_attempt(error)

    async def defer(self, fault: Fault) -> None:
        """The attempt hit a transient ``fault`` (the worker's fetch, say): back to the
        queue after a backoff, no attempt spent."""
        await self._quiesce("defer")
        if fault.sps and self.health is not None:
            self.health.failed(self.job.callback.url, fault.reason, fault.retry_after)
        await self._deferred(fault)

    async def _deferred(self, fault: Fault) -> None:
        """Defer the job after ``fault``, or fail it for good past ``max_deferral_age``.

        No frame is written: the SPS is most likely what failed, and the job's result
        keeps showing what it showed (queued or in progress) until the job runs again.
        """
        now = self.clock.seconds()
        later = next_try(self.retry, self.job, fault, now)
        if later is None:
            error = too_old(self.retry, self.job, fault)
            log.warn("job {job_id}: {error}; failed for good", job_id=self.job_id, error=error)
            await self._frame(Status.FAILED, f"failed ({_label(error)})", error=error)
            await self._end(JobState.FAILED, error)
            return
        log.info(
            "job {job_id}: deferred for {delay:.0f} s, no attempt spent ({reason})",
            job_id=self.job_id,
            delay=later.not_before - now,
            not_before=later.not_before,
            reason=fault.reason,
            kind=later.kind.value,
            deferred_since=later.since,
        )
        await self._release(count_attempt=False, error=fault.reason, deferral=later)

    async def cancel(self) -> None:
        """The job was cancelled (or its result deleted): mark the result, end it."""
        await self._quiesce("cancel")
        await self._frame(Status.CANCELLED, "cancelled", create=False)
        if self.result_gone:
            reason = "the result was deleted at the SPS"
        else:
            reason = self.cancel_reason or "cancelled"
        await self._end(JobState.CANCELLED, reason)

    async def requeue(self, reason: str) -> None:
        """Put the job back unharmed (no attempt counted): the daemon is stopping."""
        await self._quiesce("requeue")
        await self._frame(Status.QUEUED, "queued (the analysis service is restarting)")
        await self._release(count_attempt=False, error=reason)

    async def give_up(self) -> None:
        """Fail a job that already used all its attempts (e.g. it kept killing daemons)."""
        await self._quiesce("give_up")
        error = f"gave up after {self.job.attempts} attempts"
        if self.job.last_error:
            error += f"; last error: {self.job.last_error}"
        await self._frame(Status.FAILED, f"failed ({_label(error)})", error=error)
        await self._end(JobState.FAILED, error)

    async def _failed_attempt(self, error: str) -> None:
        attempts = self.job.attempts + 1
        log.warn(
            "job {job_id}: attempt {attempt} of {max_attempts} failed: {error}",
            job_id=self.job_id,
            attempt=attempts,
            max_attempts=self.max_attempts,
            error=error,
        )
        if attempts >= self.max_attempts:
            await self._frame(Status.FAILED, f"failed ({_label(error)})", error=error)
            await self._end(JobState.FAILED, error)
        else:
            now = self.clock.seconds()
            later = next_try(self.retry, self.job, Fault(False, error), now)
            assert later is not None  # a permanent fault always gets its retry
            log.info(
                "job {job_id}: attempt {attempt} retried in {delay:.0f} s",
                job_id=self.job_id,
                attempt=attempts + 1,
                delay=later.not_before - now,
                not_before=later.not_before,
                reason=error,
                kind=later.kind.value,
            )
            await self._frame(
                Status.QUEUED,
                f"retrying after an error (attempt {attempts + 1} of {self.max_attempts})",
                error=error,
            )
            await self._release(count_attempt=True, error=error, deferral=later)

    async def _frame(
        self, status: Status, text: str, *, error: str | None = None, create: bool = True
    ) -> None:
        """Best effort: show ``status`` on the job's result (never re-creating a deleted
        one; with ``create=False`` never creating one at all)."""
        if self.result_gone or self.state is RunState.ABORTED:
            return
        frame = self.writer.frame(self.job, status, text, error=error)
        try:
            if create:
                stored = await self._result(retry=True)
            else:
                if self._resolving is not None and not self._resolving.called:
                    self._resolving.cancel()  # do not create a result just to cancel it
                stored = self.stored
                if stored is None:
                    found = await self._call(self.writer.find(self.job))
                    if found is not None and _job_of(found) == self.job_id:
                        stored = found
            if stored is None:
                return
            self.stored = await self._call(self.writer.update(self.job, stored, frame))
        except ResultGone:
            self.result_gone = True
        except CancelledError:
            pass
        except SPSError as e:
            log.warn(
                "job {job_id}: could not mark its result {status} ({error})",
                job_id=self.job_id,
                status=status.value.lower(),
                error=str(e),
            )

    async def _end(self, state: JobState, error: str | None) -> None:
        try:
            job = await self.spool.finish(self.job_id, state, error)
        except Exception:
            log.failure(
                "job {job_id}: the spool refused to end it as {state}",
                job_id=self.job_id,
                state=state.value,
            )
            self._ended(None)
            return
        self._remove_folder()
        self._ended(job)

    async def _release(
        self, *, count_attempt: bool, error: str, deferral: Deferral | None = None
    ) -> None:
        try:
            job = await self.spool.release(
                self.job_id, count_attempt=count_attempt, error=error, deferral=deferral
            )
        except Exception:
            log.failure("job {job_id}: the spool refused to release it", job_id=self.job_id)
            self._ended(None)
            return
        if job.state is JobState.CANCELLED:
            # Its cancellation was requested meanwhile: the spool cancelled it instead.
            await self._frame(Status.CANCELLED, "cancelled", create=False)
            self._remove_folder()
        self._ended(job)

    def _remove_folder(self) -> None:
        self.folders.remove(self.job).addErrback(
            lambda f: log.failure(
                "job {job_id}: removing its work folder failed", f, job_id=self.job_id
            )
        )

    @property
    def is_ended(self) -> bool:
        """Whether the spool has the job's end (``ended`` fired)."""
        return self.state is RunState.ENDED

    def _ended(self, job: Job | None) -> None:
        if self.state is not RunState.ENDED:
            self.state = RunState.ENDED
            self.ended.callback(job)


def _job_of(result: Result) -> str | None:
    """The job id recorded in one of dpatia's results, if any."""
    mine = (result.data.context or {}).get(CONTEXT_KEY)
    job_id = mine.get("jobId") if isinstance(mine, dict) else None
    return job_id if isinstance(job_id, str) else None


__all__ = ["JobRun", "RunState", "StopReason", "observe"]
