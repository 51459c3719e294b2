"""The dispatcher: which job runs on which worker, and how each job ends.

:class:`Dispatcher` owns the jobs' side of the workers: the candidates, claiming, each
job's :class:`~.run.JobRun`, its deadline, its cancellation and its fate.  It takes
workers from a :class:`~.pool.WorkerPool` (which knows nothing about jobs) and gives
them back when their job is over.

Dispatch is push.  Jobs come from the spool's watch (a job became QUEUED) into an
in-memory :class:`~.candidates.Candidates` window of the best queued jobs (bounded:
a backlog stays on disk); an idle worker takes the best candidate the moment either
appears, and the window is refilled from ``spool.queued_head()`` (the spool's index:
the best jobs, not a read of the whole queue) when it runs low, when it runs dry after
a job ended, or on the periodic sweep.  A claimed job becomes a
:class:`~.run.JobRun`, which owns its SPS writes and its end in the spool; the
dispatcher only tells it how the analysis ended.

Deadlines and cancellation.  Every analysis has a deadline (``job_timeout``, a timeout
on the ``RunJob`` call: the worker gets SIGTERM, SIGKILL after ``kill_grace``); a
cancellation (:meth:`Dispatcher.cancel`, pushed by this daemon's front door, or the
spool's durable marker, polled every second and on every progress report for
cancellations made through another process on the spool) sends ``CancelJob`` and stops
the worker if the analysis has not stopped ``kill_grace`` later.

Deferred jobs and a failing SPS.  Before claiming, every candidate passes the
:class:`~.waiting.WaitingRoom`: a job deferred past now, or whose SPS the shared
:class:`~.health.SPSHealth` knows to be failing, waits there (one of them at a time
goes through as the SPS's probe), and claims pass the clock so that the spool refuses
a deferred job on every daemon.  When the SPS answers again its jobs resume at once.

Fates.  How the analysis ended decides how the job ends: a result is stored, an error
is a failed attempt (retried after a backoff), a transient fault defers the job (no
attempt spent, :mod:`.faults`), a cancellation cancels; a worker that died decides by why
(:meth:`Dispatcher._after_crash`): the daemon stopping puts the job back without an
attempt counted, a deadline or missed heartbeats fail the attempt with that reason.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
from attrs import define, field
from twisted.internet.defer import Deferred, DeferredList, TimeoutError, gatherResults
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..config import WorkersConfig
from ..jobs import Callback, Job
from ..spool import ISpool
from ..sps.tokens import TokenBook
from ..sps.writer import ResultWriter
from .candidates import Candidates
from .commands import (
    AnalysisFailed,
    CancelJob,
    JobCancelled,
    NewCallback,
    RunJob,
    TransientFailure,
    WorkerBusy,
)
from .events import Observers
from .faults import classify
from .folders import UnusableResult, Verdict, WorkFolders
from .health import SPSHealth
from .limits import died
from .pool import StopCause, Worker, WorkerPool, WorkerState, describe_exit
from .run import JobRun, StopReason, observe
from .timers import cancel_call, every
from .waiting import WaitingRoom

log = Logger()


@define(eq=False)
class _Assignment:
    """A job's run on a worker, and the deadline of its cancellation."""

    worker: Worker
    run: JobRun
    cancel_timer: IDelayedCall | None = None


@define(eq=False)
class _InHand:
    """The jobs a dispatcher has in hand (waiting, being claimed, running, parked), as a
    live container: a refill's ``skip``.  Not a copy: with a backlog waiting out an
    outage, a copy per refill is a set of every waiting id each time (and the heap
    fragments under them).  The file spool asks ``in`` from its thread, which the GIL
    makes safe beside the reactor thread's changes."""

    waiting: WaitingRoom
    claiming: set[str]
    runs: dict[str, JobRun]
    parked: dict[str, Job]

    def __contains__(self, job_id: object) -> bool:
        return (
            job_id in self.waiting
            or job_id in self.claiming
            or job_id in self.runs
            or any(job.job_id == job_id for job in list(self.parked.values()))
        )


@define(eq=False)
class Dispatcher:
    """Claims queued jobs for the pool's idle workers and decides each job's fate.

    Collaborators: the ``reactor`` (``IReactorTime``: deadlines, polls, the sweep), the
    ``spool`` jobs are claimed from, the ``writer`` for SPS results, the frozen
    ``[workers]`` ``config``, the job ``folders``, the ``pool`` its workers come from,
    the shared ``events``, the ``tokens`` book (newer callback tokens of running
    jobs go to their worker), and the shared ``health`` view of the SPSes (one is
    made if none is given).
    """

    reactor: Any
    spool: ISpool
    writer: ResultWriter
    config: WorkersConfig
    folders: WorkFolders
    pool: WorkerPool
    events: Observers
    tokens: TokenBook | None = None
    sweep_interval: float = 30.0
    cancel_poll_interval: float = 1.0
    health: SPSHealth | None = None
    _sps: SPSHealth = field(init=False)
    _waiting: WaitingRoom = field(init=False)
    _unhealth: Callable[[], None] | None = field(default=None, init=False)
    _candidates: Candidates = field(factory=Candidates, init=False)
    _runs: dict[str, JobRun] = field(factory=dict, init=False)
    _on: dict[Worker, _Assignment] = field(factory=dict, init=False)
    _parked: dict[str, Job] = field(factory=dict, init=False)
    _claiming: set[str] = field(factory=set, init=False)
    _accepting: bool = field(default=False, init=False)
    _need_refresh: bool = field(default=True, init=False)
    _pumping: bool = field(default=False, init=False)
    _pump_again: bool = field(default=False, init=False)
    _refreshing: bool = field(default=False, init=False)
    #: Where the next refill continues: the last job the window took from the spool,
    #: while every queued job before it is known to be in the window or in hand.
    _cursor: Job | None = field(default=None, init=False)
    _unwatch: Callable[[], None] | None = field(default=None, init=False)
    _untoken: Callable[[], None] | None = field(default=None, init=False)
    _loops: list[LoopingCall] = field(factory=list, init=False)

    def __attrs_post_init__(self) -> None:
        self._sps = self.health or SPSHealth(self.reactor, self.config.sps_probe_interval)
        self._waiting = WaitingRoom(self.reactor, self.spool, self._sps, self._on_queued)

    # --- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        """Subscribe to the spool (and the token book, and the SPS health view); start
        the polls and the sweep."""
        self._accepting = True
        self._need_refresh = True
        self._unwatch = self.spool.watch(self._on_queued)
        self._unhealth = self._sps.subscribe(self._sps_recovered)
        if self.tokens is not None:
            self._untoken = self.tokens.subscribe(self._new_callback)
        self._loops = [
            every(self.reactor, self.cancel_poll_interval, self._poll_cancellations, now=False),
            every(self.reactor, self.sweep_interval, self._sweep, now=True),
        ]

    def close(self) -> None:
        """Take no new jobs (running ones go on)."""
        self._accepting = False
        for unsubscribe in (self._unwatch, self._untoken, self._unhealth):
            if unsubscribe is not None:
                unsubscribe()
        self._unwatch = self._untoken = self._unhealth = None
        self._waiting.close()
        for loop in self._loops:
            if loop.running:
                loop.stop()
        self._loops = []

    @property
    def running(self) -> int:
        """How many jobs are running (claimed and not yet back in the spool)."""
        return len(self._runs)

    def running_jobs(self) -> list[Job]:
        """The jobs running here now, as their runs know them (newest callback)."""
        return [run.job for run in self._runs.values()]

    async def wait_runs(self, timeout: float) -> None:
        """Wait until no job is running, or ``timeout`` seconds."""
        pending = [observe(run.ended) for run in self._runs.values()]
        if not pending:
            return
        # A DeferredList: the timeout cancels the waiters (not the runs), and a
        # cancelled waiter is no error.
        try:
            await DeferredList(pending, consumeErrors=True).addTimeout(timeout, self.reactor)
        except TimeoutError:
            pass

    def interrupt(self) -> None:
        """The daemon is stopping and the grace is over: stop every running analysis
        (its job goes back to the queue, no attempt counted)."""
        for worker, assignment in list(self._on.items()):
            self._stop_analysis(worker, assignment.run, StopReason.SHUTDOWN)
            self.pool.terminate(worker, "the daemon is stopping", planned=True)

    def abort(self) -> None:
        """Give up the SPS calls of every job still ending (it goes back to the queue)."""
        for run in list(self._runs.values()):
            run.abort()

    def job_on(self, worker: Worker) -> str | None:
        """The id of the job running on ``worker``, if any."""
        assignment = self._on.get(worker)
        return assignment.run.job_id if assignment is not None else None

    # --- dispatch -------------------------------------------------------------------

    def worker_ready(self, worker: Worker) -> None:
        """The pool has an idle worker: give it work."""
        self._pump()

    def _on_queued(self, job: Job) -> None:
        """The spool's watch: ``job`` is QUEUED (new, released, recovered or swept)."""
        if not self._candidates.offer(job):
            self._cursor = None  # left out: the next refill starts from the head
        self._pump()

    def _pump(self) -> None:
        """Hand the best candidates to idle workers.

        Re-entered (a claim, a resumed job or an SPS's recovery can ask for a pump while
        one runs), it runs once more after the current one instead of inside it.
        """
        if not self._accepting:
            return
        if self._pumping:
            self._pump_again = True
            return
        self._pumping = True
        try:
            self._pump_again = True
            while self._pump_again and self._accepting:
                self._pump_again = False
                self._pump_once()
        finally:
            self._pumping = False

    def _pump_once(self) -> None:
        for worker in self.pool.idle():
            if worker.state is not WorkerState.IDLE:
                continue
            job = self._candidates.pop()
            while job is not None and not self._waiting.admit(job):
                job = self._candidates.pop()
            if job is None:
                self._refresh()
                return
            self._claim(worker, job)
        if self._candidates.low:
            self._refresh()  # before it runs dry, so idle workers need not wait for it

    def _sps_recovered(self, sps: str) -> None:
        """The health view: a failing SPS answers again; its waiting jobs resume."""
        self._waiting.sps_recovered(sps)
        self._pump()

    @property
    def waiting(self) -> WaitingRoom:
        """The jobs held back (deferred, or waiting for their SPS)."""
        return self._waiting

    def _refresh(self) -> None:
        """Refill the candidates from the spool's head (when low or dry; once per need).

        The head asked for is the best ``window`` queued jobs this dispatcher does not
        already have in hand (waiting, being claimed, running, parked): the spool skips
        those by their index names, before reading any record, so a refill reads at
        most a window of records however many jobs wait (a long outage of an SPS can
        leave the whole backlog in the waiting room, walked once, a window at a time).
        A refill only because the window ran low continues after the last job it took
        (the cursor), so that walking the queue reads each window once; a refill for
        another reason (a job ended, the sweep, the start) reads the head from the
        start, and sees the jobs other daemons queued meanwhile.  A refill that brings
        nothing new waits for the next reason instead of asking again at once.
        """
        if self._refreshing or not (self._need_refresh or self._candidates.truncated):
            return
        self._refreshing = True
        after = None if self._need_refresh else self._cursor
        self._need_refresh = False
        in_hand = _InHand(self._waiting, self._claiming, self._runs, self._parked)
        limit = self._candidates.limit

        def got(jobs: list[Job]) -> None:
            self._refreshing = False
            fresh = [job for job in jobs if job.job_id not in in_hand]
            complete = len(jobs) < limit
            new = self._candidates.refill(fresh, complete=complete)
            # The last job taken: a full window may have left the worst of them out.
            taken = [job for job in jobs if job.job_id in self._candidates or job.job_id in in_hand]
            self._cursor = taken[-1] if taken and not complete else None
            if complete and after is not None and len(self._waiting):
                # A walk through the queue ended: say why nothing runs, once per walk.
                log.info(
                    "walked the queue: {count} queued jobs wait (deferred, or for a failing SPS)",
                    count=len(self._waiting),
                )
            if not new:
                self._candidates.truncated = False
            if len(self._candidates):
                self._pump()

        def failed(f: Failure) -> None:
            self._refreshing = False
            log.failure("listing queued jobs failed", f)

        self.spool.queued_head(limit, skip=in_hand, after=after).addCallbacks(got, failed)

    def _claim(self, worker: Worker, candidate: Job) -> None:
        self.pool.acquire(worker)
        job_id = candidate.job_id
        self._claiming.add(job_id)

        def failed(f: Failure) -> None:
            log.failure("claiming job {job_id} failed", f, job_id=job_id)

        def answered(result: Any) -> Any:
            self._claiming.discard(job_id)
            return result

        d = self.spool.claim(job_id, now=self.reactor.seconds())
        d.addBoth(answered)
        d.addErrback(failed)
        d.addCallback(lambda job: self._claimed(worker, candidate, job))
        d.addErrback(lambda f: log.failure("dispatching job {job_id} failed", f, job_id=job_id))

    def _claimed(self, worker: Worker, candidate: Job, job: Job | None) -> None:
        job_id = candidate.job_id
        if job is None:
            self._sps.probe_ended(candidate.callback.url, job_id)
            # Gone, merged, held elsewhere, or its key is running.  If we run that key,
            # the job waits until our run ends (the spool will not announce it again).
            if any(run.job.key == candidate.key for run in self._runs.values()):
                self._parked[candidate.key] = candidate
            self.pool.release(worker)
            self._pump()
            return
        if worker.state is not WorkerState.BUSY or not self._accepting:
            # The worker died (or we are stopping) while the claim was in flight.
            log.info("job {job_id}: claimed but not run; back to the queue", job_id=job_id)
            self.spool.release(job_id, count_attempt=False, error=None).addErrback(
                lambda f: log.failure("releasing job {job_id} failed", f, job_id=job_id)
            )
            self.pool.release(worker)
            self._pump()
            return
        if self.tokens is not None:
            # A newer request for the slide may have come (for another key, or to
            # another daemon's record): the worker starts with the newest token.
            job = attrs.evolve(job, callback=self.tokens.newest(job))
        run = JobRun(
            job=job,
            spool=self.spool,
            writer=self.writer,
            folders=self.folders,
            clock=self.reactor,
            max_attempts=self.config.max_attempts,
            progress_interval=self.config.progress_interval,
            on_result_gone=self._result_gone,
            worker=worker.name,
            retry=self.config,
            health=self._sps,
        )
        self._runs[job.job_id] = run
        self._on[worker] = _Assignment(worker, run)
        run.ended.addCallback(self._run_ended, run)
        d = Deferred.fromCoroutine(self._execute(worker, run))
        d.addErrback(self._execute_failed, worker, run)

    def _run_ended(self, final: Job | None, run: JobRun) -> Job | None:
        if self._runs.get(run.job_id) is run:
            del self._runs[run.job_id]
        self._sps.probe_ended(run.job.callback.url, run.job_id)
        state = final.state.value if final is not None else None
        self.events.emit(
            "job-ended",
            None,
            run.job_id,
            state=state,
            ran_on=run.worker,
            deferral=final.deferral_kind if final is not None else None,
            error=final.last_error if final is not None else None,
        )
        parked = self._parked.pop(run.job.key, None)
        if parked is not None:
            self._candidates.offer(parked)
        self._need_refresh = True
        self._pump()
        return final

    def _execute_failed(self, f: Failure, worker: Worker, run: JobRun) -> None:
        log.failure("job {job_id}: internal error while running it", f, job_id=run.job_id)
        if self._assigned(worker, run):
            run.stop_reason = run.stop_reason or StopReason.UNRESPONSIVE
            self.pool.terminate(worker, "internal error")
        if not run.is_ended:
            Deferred.fromCoroutine(run.fail(f"internal error: {f.getErrorMessage()}")).addErrback(
                lambda f2: log.failure("job {job_id}: could not end it", f2, job_id=run.job_id)
            )

    def _assigned(self, worker: Worker, run: JobRun) -> bool:
        assignment = self._on.get(worker)
        return assignment is not None and assignment.run is run

    def _unassign(self, worker: Worker) -> None:
        assignment = self._on.pop(worker, None)
        if assignment is not None:
            cancel_call(assignment.cancel_timer)

    def _free(self, worker: Worker) -> None:
        """The worker is not needed for its claimed job after all."""
        self._unassign(worker)
        self.pool.release(worker)

    async def _execute(self, worker: Worker, run: JobRun) -> None:
        """Run one claimed job on ``worker`` and end it."""
        if run.job.attempts >= self.config.max_attempts:
            self._free(worker)
            await run.give_up()
            return
        try:
            work_dir = run.prepare()
        except OSError as e:
            self._free(worker)
            await run.fail(f"cannot prepare the job's work folder: {e}")
            return
        done = run.completed_result()
        if done is not None:
            self._free(worker)
            log.info(
                "job {job_id}: an earlier attempt computed its result; storing it",
                job_id=run.job_id,
            )
            await run.complete(done.result, done.verdict)
            return
        run.begin()
        self.events.emit("job-started", worker.name, run.job_id, attempt=run.job.attempts + 1)
        log.info(
            "job {job_id}: running on worker {worker} (attempt {attempt})",
            job_id=run.job_id,
            worker=worker.name,
            attempt=run.job.attempts + 1,
        )
        outcome: dict[str, Any] | Exception
        answer = worker.amp.callRemote(RunJob, job_id=run.job_id, work_dir=work_dir)
        # The deadline: cancelling an AMP call only stops our waiting; the worker is
        # stopped by _timed_out.
        answer.addTimeout(self.config.job_timeout, self.reactor)
        try:
            outcome = await answer
        except (AnalysisFailed, JobCancelled, TransientFailure) as e:
            outcome = e
        except TimeoutError as e:
            self._overdue(
                worker, run, StopReason.TIMEOUT, "still running after job_timeout ({timeout:g} s)"
            )
            outcome = e
        except Exception as e:  # the pipe broke or the worker died: see below
            outcome = e
        assignment = self._on.get(worker)
        if assignment is not None:
            cancel_call(assignment.cancel_timer)

        if isinstance(outcome, Exception) and not isinstance(
            outcome, AnalysisFailed | JobCancelled | TransientFailure
        ):
            if worker.state is not WorkerState.DEAD:
                if isinstance(outcome, WorkerBusy):
                    log.error("worker {worker} was busy: a dispatch bug", worker=worker.name)
                self.pool.terminate(worker, "its AMP connection failed")
                await observe(worker.ended)
            self._unassign(worker)
            await self._after_crash(worker, run)
            return

        self._unassign(worker)
        self._need_refresh = True
        self.pool.job_done(worker)
        if run.cancel_reason is not None or run.result_gone:
            await run.cancel()
        elif isinstance(outcome, JobCancelled):
            run.cancel_reason = "stopped by the analysis"
            await run.cancel()
        elif isinstance(outcome, TransientFailure):
            await run.defer(classify(outcome))
        elif isinstance(outcome, AnalysisFailed):
            await run.fail(outcome.message)
        else:
            try:
                result = run.read_result(outcome["result_path"])
            except UnusableResult as e:
                await run.fail(str(e))
                return
            verdict = Verdict.of(outcome.get("quality_control"), outcome.get("qc_version"))
            await run.complete(result, verdict)

    async def _after_crash(self, worker: Worker, run: JobRun) -> None:
        """The worker died during the analysis: decide the job's fate by why."""
        reason = run.stop_reason
        if reason is None and worker.cause is StopCause.UNRESPONSIVE:
            reason = StopReason.UNRESPONSIVE
        if reason is None and not self._accepting:
            # Stopping, and the worker died on its own: most likely the same signal
            # reached it (a terminal's Ctrl-C, KillMode=control-group).  Not the job's
            # fault: no attempt is counted.
            reason = StopReason.SHUTDOWN
        if reason is StopReason.SHUTDOWN:
            await run.requeue("interrupted: the daemon stopped while it ran")
        elif reason is StopReason.CANCEL or run.cancel_reason is not None or run.result_gone:
            await run.cancel()
        elif reason is StopReason.TIMEOUT:
            await run.fail(
                f"the analysis ran longer than job_timeout ({self.config.job_timeout:g} s) "
                "and was stopped"
            )
        elif reason is StopReason.UNRESPONSIVE:
            await run.fail("the worker stopped answering heartbeats and was killed")
        else:
            await run.fail(died(worker.exit, describe_exit(worker.exit), self.config.memory_limit))

    # --- deadlines, cancellation, newer tokens --------------------------------------

    def _stop_analysis(self, worker: Worker, run: JobRun, reason: StopReason) -> bool:
        """Record why the daemon stops ``run``'s analysis, unless a reason came first
        (the pool killing an unresponsive worker counts as one); True if it is this."""
        if run.stop_reason is not None or worker.cause is not None:
            return False
        run.stop_reason = reason
        return True

    def _overdue(self, worker: Worker, run: JobRun, reason: StopReason, warning: str) -> None:
        """A deadline of ``run``'s analysis passed: stop its worker (TERM, then KILL)."""
        if not (self._assigned(worker, run) and worker.state is WorkerState.BUSY):
            return
        log.warn(
            "job {job_id}: " + warning + "; stopping worker {worker}",
            job_id=run.job_id,
            worker=worker.name,
            timeout=self.config.job_timeout,
            grace=self.config.kill_grace,
        )
        self._stop_analysis(worker, run, reason)
        why = "job timeout" if reason is StopReason.TIMEOUT else "a cancelled analysis did not stop"
        self.pool.terminate(worker, why, planned=True)

    def progress(self, worker: Worker, job_id: str, percent: int, text: str) -> None:
        """A worker reported progress of its job."""
        assignment = self._on.get(worker)
        if assignment is None or assignment.run.job_id != job_id:
            return
        run = assignment.run
        run.on_progress(percent, text)
        self.events.emit("job-progress", worker.name, job_id, percent=percent, text=text)
        if self.reactor.seconds() - run.last_cancel_check >= self.cancel_poll_interval:
            self._check_cancel(run)

    def _poll_cancellations(self) -> Deferred[Any]:
        runs = [a.run for a in self._on.values() if a.run.cancel_reason is None]
        return gatherResults([self._check_cancel(run) for run in runs])

    def _check_cancel(self, run: JobRun) -> Deferred[Any]:
        run.last_cancel_check = self.reactor.seconds()

        def answered(requested: bool) -> None:
            if requested:
                self._cancel_run(run, "cancellation requested")

        d = self.spool.cancel_requested(run.job_id)
        d.addCallback(answered)
        d.addErrback(
            lambda f: log.failure("job {job_id}: cancel check failed", f, job_id=run.job_id)
        )
        return d

    def cancel(self, job_id: str, reason: str = "cancelled") -> bool:
        """Stop the running analysis of ``job_id`` now; False if it is not running here.

        The front door of this daemon calls it after ``spool.request_cancel``; the
        spool's marker (polled) covers cancellations made through other processes.
        """
        run = self._runs.get(job_id)
        if run is None:
            return False
        self._cancel_run(run, reason)
        return True

    def _result_gone(self, run: JobRun) -> None:
        self._cancel_run(run, "the result was deleted at the SPS")

    def _cancel_run(self, run: JobRun, reason: str) -> None:
        if run.cancel_reason is not None:
            return
        run.cancel_reason = reason
        assignment = next((a for a in self._on.values() if a.run is run), None)
        log.info("job {job_id}: cancelling ({reason})", job_id=run.job_id, reason=reason)
        if assignment is None or assignment.worker.state is not WorkerState.BUSY:
            return  # no analysis running: how the job ends already knows
        worker = assignment.worker
        worker.amp.callRemote(CancelJob, job_id=run.job_id).addErrback(lambda f: None)
        assignment.cancel_timer = self.reactor.callLater(
            self.config.kill_grace, self._cancel_overdue, worker, run
        )

    def _cancel_overdue(self, worker: Worker, run: JobRun) -> None:
        assignment = self._on.get(worker)
        if assignment is not None:
            assignment.cancel_timer = None
        self._overdue(
            worker,
            run,
            StopReason.CANCEL,
            "the analysis did not stop within {grace:g} s of its cancellation",
        )

    def _new_callback(self, application_id: str, slide_id: str, callback: Callback) -> None:
        """A request brought a newer callback for a slide: its running jobs use it, and
        their workers are sent it at once (``NewCallback``)."""
        for run in list(self._runs.values()):
            if run.job.slide_id != slide_id or run.job.application_id != application_id:
                continue
            if not run.use_callback(callback):
                continue
            worker = next((w for w, a in self._on.items() if a.run is run), None)
            if worker is not None and worker.state is WorkerState.BUSY:
                self._hand_over(worker, run.job_id, callback)

    def _hand_over(self, worker: Worker, job_id: str, callback: Callback) -> None:
        def sent(answer: dict[str, Any]) -> None:
            self.events.emit("job-callback", worker.name, job_id, running=answer["running"])
            if answer["running"]:
                log.info(
                    "job {job_id}: a newer callback token arrived; handed to its worker",
                    job_id=job_id,
                )

        def failed(f: Failure) -> None:
            log.warn(
                "job {job_id}: could not hand a newer callback token to its worker ({error})",
                job_id=job_id,
                error=f.getErrorMessage(),
            )

        d = worker.amp.callRemote(
            NewCallback, job_id=job_id, url=callback.url, token=callback.token
        )
        d.addCallbacks(sent, failed)

    # --- the sweep ------------------------------------------------------------------

    def _sweep(self) -> Deferred[Any]:
        """Periodically: re-list the queue once, and remove work folders of ended jobs."""
        self._need_refresh = True
        self._pump()
        now = self.reactor.seconds()

        def prune(keys: set[str]) -> Deferred[Any]:
            keep = keys | {run.job.key for run in self._runs.values()}
            return self.folders.prune(keep, now)

        # The keys only (file names): no record of the queue is read for this.
        return self.spool.active_keys().addCallback(prune)


__all__ = ["Dispatcher"]
