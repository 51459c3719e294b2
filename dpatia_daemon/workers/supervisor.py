"""The worker supervisor: spawns, watches and restarts analysis workers; dispatches jobs.

:class:`Supervisor` is the ``workers`` service of the daemon's tree.  It keeps
``[workers] count`` worker processes (``python -m dpatia_daemon.workers.child``, see
:mod:`dpatia_daemon.workers.child`) and talks to them over AMP on dedicated pipes
(:mod:`dpatia_daemon.workers.commands`); their stdout/stderr become log lines tagged with the worker
and its current job, cut to a bounded length and rate (:class:`LineLog`).

Lifecycle.  One :class:`Worker` record per process, with a :class:`WorkerState`
(``starting → idle → busy → stopping → dead``) changed only by :meth:`Supervisor._set`.
A worker is never reused after it exits: :meth:`Supervisor._exited` is the one code
path that retires it and schedules its replacement, after a :class:`Backoff` delay that
doubles while workers die young (or cannot load their analysis) and resets after a
healthy run, capped at ``[workers] restart_backoff_cap``.

Dispatch is push.  Jobs come from the spool's watch (a job became QUEUED) into an
in-memory :class:`~dpatia_daemon.workers.run.Candidates` list; an idle worker takes the
best candidate the moment either appears, and ``spool.queued()`` (a directory listing)
is read only when the list runs dry or on the periodic sweep.  A claimed job becomes a
:class:`~dpatia_daemon.workers.run.JobRun`, which owns its SPS writes and its end in the
spool; the supervisor only tells it how the analysis ended.

Liveness.  Every job has a deadline (``job_timeout``: SIGTERM, SIGKILL after
``kill_grace``); workers answer a ``Ping`` every ``heartbeat_interval`` or are killed
after three misses; a cancellation (the spool's durable marker, polled every second
and on every progress report, or :meth:`Supervisor.cancel`) sends ``CancelJob`` and
kills the worker if the analysis has not stopped ``kill_grace`` later.

Stopping (daemon SIGTERM): no new jobs; running ones get ``shutdown_grace`` seconds;
then their workers are stopped and their jobs go back to the queue without an attempt
counted; ``stopService`` fires once every job is back in the spool and every child
has exited.  The spool must still be running meanwhile: the service tree stops its
children one after another (``workers`` before ``sps`` and ``spool``).

Why not ampoule or procmon: see the README ("Workers").  In short, ampoule's pool
uses the global reactor and wall-clock time, starts a LoopingCall in its constructor,
keeps workers in parallel sets, and has no heartbeat, cancellation, backoff or
per-job progress; procmon restarts plain commands (no extra fds for AMP, no job
coupling) and its ``stopService`` does not wait for the children.  Their good ideas
are here: fds 3/4 with stdout/stderr as logs and exit on EOF (ampoule, trial's
``_dist``), TERM-then-KILL and doubling backoff that resets after a healthy run
(procmon), and procmon's MemoryReactor+Clock test double.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Iterable, Mapping
from enum import StrEnum
from typing import Any

import attrs
from attrs import define, field, frozen
from twisted.application.service import IService, Service
from twisted.internet import error as ierror
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.interfaces import IAddress, IDelayedCall, ITransport
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.protocols.amp import AMP
from twisted.python.failure import Failure
from zope.interface import implementer

import dpatia_daemon

from ..config import WorkersConfig
from ..jobs import Callback, Job
from ..pipeline.prepare import PipelineSettings
from ..spool import ISpool
from ..sps.tokens import Credentials, TokenBook, without_credentials
from ..sps.writer import ResultWriter
from .commands import (
    WORKER_AMP_IN,
    WORKER_AMP_OUT,
    AnalysisFailed,
    CancelJob,
    Hello,
    JobCancelled,
    Ping,
    Progress,
    RunJob,
    WorkerBusy,
)
from .run import Candidates, JobRun, StopReason, UnusableResult, WorkFolders, _observe

log = Logger()

#: The child's file descriptors: stdin (closed at once), stdout and stderr as log
#: streams, and the two AMP pipes.
CHILD_FDS: dict[int, str] = {0: "w", 1: "r", 2: "r", WORKER_AMP_IN: "w", WORKER_AMP_OUT: "r"}

#: The directory that holds the dpatia_daemon package: put first on the workers'
#: PYTHONPATH so they run the same code as the daemon, however it was started.
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(dpatia_daemon.__file__)))


class WorkerState(StrEnum):
    """Where a worker process is in its life."""

    STARTING = "starting"  # spawned; has not answered Hello yet
    IDLE = "idle"  # ready for a job
    BUSY = "busy"  # claiming a job or running its analysis
    STOPPING = "stopping"  # asked to exit (EOF or a signal)
    DEAD = "dead"  # exited; its slot has a replacement scheduled


_TRANSITIONS: dict[WorkerState, frozenset[WorkerState]] = {
    WorkerState.STARTING: frozenset({WorkerState.IDLE, WorkerState.STOPPING, WorkerState.DEAD}),
    WorkerState.IDLE: frozenset({WorkerState.BUSY, WorkerState.STOPPING, WorkerState.DEAD}),
    WorkerState.BUSY: frozenset({WorkerState.IDLE, WorkerState.STOPPING, WorkerState.DEAD}),
    WorkerState.STOPPING: frozenset({WorkerState.DEAD}),
    WorkerState.DEAD: frozenset(),
}

_LIVE = frozenset({WorkerState.STARTING, WorkerState.IDLE, WorkerState.BUSY, WorkerState.STOPPING})


# --- restart policy -------------------------------------------------------------------


@define
class Backoff:
    """Restart delays of one worker slot (procmon's policy, with its own state).

    A worker that ran at least ``healthy_after`` seconds (and loaded its analysis) is
    replaced at once and resets the delay to ``initial``; one that died young waits
    the current delay, which then doubles up to ``cap``.
    """

    initial: float = 1.0
    cap: float = 60.0
    healthy_after: float = 5.0
    delay: float = field(init=False)

    @delay.default
    def _initial_delay(self) -> float:
        return self.initial

    def after_exit(self, lifetime: float, healthy: bool) -> float:
        """The delay before the next start, given how the last worker lived."""
        if healthy and lifetime >= self.healthy_after:
            self.delay = self.initial
            return 0.0
        delay = min(self.delay, self.cap)
        self.delay = min(self.delay * 2, self.cap)
        return delay


# --- worker output --------------------------------------------------------------------

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


@define
class LineLog:
    """Turns a byte stream into log lines: split, decoded, cut and rate-limited.

    Lines longer than ``max_line`` bytes are cut (the rest of that line is skipped);
    bytes that are not UTF-8 and control characters are escaped; at most ``rate``
    lines per second are logged (bursts of ``burst``), the rest are counted and
    reported as one "dropped" line.  ``emit(text)`` logs one line.
    """

    emit: Callable[[str], None]
    clock: Any
    max_line: int = 4096
    rate: float = 50.0
    burst: float = 200.0
    _buffer: bytearray = field(factory=bytearray, init=False)
    _skipping: bool = field(default=False, init=False)
    _tokens: float = field(default=-1.0, init=False)
    _last: float = field(default=0.0, init=False)
    _dropped: int = field(default=0, init=False)
    _report: IDelayedCall | None = field(default=None, init=False)

    def feed(self, data: bytes) -> None:
        """Take more output."""
        self._buffer += data
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                break
            line = bytes(self._buffer[:end])
            del self._buffer[: end + 1]
            if self._skipping:
                self._skipping = False  # the tail of a line already cut
                continue
            self._line(line)
        if len(self._buffer) > self.max_line:
            if not self._skipping:
                self._line(bytes(self._buffer[: self.max_line]), cut=True)
            self._skipping = True
            self._buffer.clear()

    def flush(self) -> None:
        """Log what is left (the process ended without a final newline)."""
        if self._buffer and not self._skipping:
            self._line(bytes(self._buffer))
        self._buffer.clear()
        self._skipping = False
        self._report_dropped()

    def _report_dropped(self) -> None:
        if self._report is not None and self._report.active():
            self._report.cancel()
        self._report = None
        if self._dropped:
            self._say(f"[{self._dropped} lines dropped: more than {self.rate:g} lines/s]")
            self._dropped = 0

    def _line(self, raw: bytes, cut: bool = False) -> None:
        now = self.clock.seconds()
        if self._tokens < 0:
            self._tokens = self.burst
        else:
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        if self._tokens < 1:
            self._dropped += 1
            if self._report is None:
                # Say so within a second even if the flood was the last output.
                self._report = self.clock.callLater(1.0, self._report_dropped)
            return
        self._tokens -= 1
        self._report_dropped()
        text = raw.rstrip(b"\r").decode("utf-8", "backslashreplace")
        text = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
        if cut:
            text += f" [line cut at {self.max_line} bytes]"
        self._say(text)

    def _say(self, text: str) -> None:
        try:
            self.emit(text)
        except Exception:
            log.failure("logging a worker's output failed")


# --- plumbing between a process and AMP -----------------------------------------------


@implementer(IAddress)
class _PipeAddress:
    """The (meaningless) address of an AMP pipe."""

    def __repr__(self) -> str:
        return "<worker pipe>"


@implementer(ITransport)
class _PipeTransport:
    """AMP's transport: writes go to the child's AMP fd; closing it is EOF for the child."""

    def __init__(self, process: Any) -> None:
        self._process = process

    def write(self, data: bytes) -> None:
        try:
            self._process.writeToChild(WORKER_AMP_IN, data)
        except (KeyError, OSError, ierror.ProcessExitedAlready):
            pass  # the child is gone; processEnded tells AMP

    def writeSequence(self, data: Iterable[bytes]) -> None:
        for chunk in data:
            self.write(chunk)

    def loseConnection(self) -> None:
        try:
            self._process.closeChildFD(WORKER_AMP_IN)
        except (KeyError, OSError, ierror.ProcessExitedAlready):
            pass

    def getPeer(self) -> IAddress:
        return _PipeAddress()

    def getHost(self) -> IAddress:
        return _PipeAddress()


class _DaemonAMP(AMP):
    """The daemon's side of one worker's AMP connection (worker → daemon commands)."""

    def __init__(self, on_progress: Callable[[str, int, str], None]) -> None:
        super().__init__()
        self._on_progress = on_progress

    @Progress.responder
    def progress(self, job_id: str, percent: int, text: str) -> dict[str, Any]:
        """Relay a progress report to the supervisor."""
        try:
            self._on_progress(job_id, percent, text)
        except Exception:
            log.failure("handling progress of job {job_id} failed", job_id=job_id)
        return {}


class _WorkerProcess(ProcessProtocol):
    """Connects one child process to its :class:`Worker` record and the supervisor."""

    def __init__(self, supervisor: Supervisor, worker: Worker) -> None:
        self.supervisor = supervisor
        self.worker = worker

    def connectionMade(self) -> None:
        self.worker.transport = self.transport
        self.worker.amp.makeConnection(_PipeTransport(self.transport))
        try:
            self.transport.closeStdin()  # type: ignore[union-attr]
        except (KeyError, OSError, ierror.ProcessExitedAlready):
            pass
        self.supervisor._connected(self.worker)

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == WORKER_AMP_OUT:
            self.worker.amp.dataReceived(data)
        elif childFD == 1:
            self.worker.stdout.feed(data)
        elif childFD == 2:
            self.worker.stderr.feed(data)

    def processEnded(self, reason: Failure) -> None:  # type: ignore[override]
        self.worker.stdout.flush()
        self.worker.stderr.flush()
        self.supervisor._exited(self.worker, reason)


# --- records --------------------------------------------------------------------------


@define(eq=False)
class _Slot:
    """A place for one worker: its current process and its restart policy."""

    number: int
    backoff: Backoff
    worker: Worker | None = None
    restart: IDelayedCall | None = None


@define(eq=False)
class Worker:
    """One worker process, from spawn to exit (never reused after it exits)."""

    slot: _Slot
    name: str
    started: float
    amp: _DaemonAMP
    stdout: LineLog
    stderr: LineLog
    state: WorkerState = WorkerState.STARTING
    transport: Any = None
    pid: int | None = None
    load_error: str = ""
    run: JobRun | None = None
    claiming: str | None = None
    jobs: int = 0
    planned: bool = False
    term_sent: bool = False
    stop_why: str = ""
    ping_pending: bool = False
    missed: int = 0
    start_timer: IDelayedCall | None = None
    job_timer: IDelayedCall | None = None
    cancel_timer: IDelayedCall | None = None
    kill_timer: IDelayedCall | None = None
    exit: Failure | None = None
    ended: Deferred[None] = field(factory=Deferred)

    def timers(self) -> list[IDelayedCall | None]:
        return [self.start_timer, self.job_timer, self.cancel_timer, self.kill_timer]


@frozen
class SupervisorEvent:
    """Something the supervisor did, for observers (tests, benchmarks, a status page).

    ``kind`` is one of ``worker-spawned``, ``worker-ready``, ``worker-exited``,
    ``job-started``, ``job-progress``, ``job-ended``.
    """

    kind: str
    worker: str | None = None
    job_id: str | None = None
    detail: Mapping[str, Any] = field(factory=dict)


def describe_exit(reason: Failure | None) -> str:
    """``exit code 3`` / ``signal 9`` / ``exit code 0`` for a processEnded reason."""
    if reason is None:
        return "unknown"
    value = reason.value
    if isinstance(value, ierror.ProcessTerminated):
        if value.signal is not None:
            return f"signal {value.signal}"
        return f"exit code {value.exitCode}"
    if isinstance(value, ierror.ProcessDone):
        return "exit code 0"
    return reason.getErrorMessage()


# --- the service ----------------------------------------------------------------------


@implementer(IService)
@define(eq=False)
class Supervisor(Service):
    """Runs analyses in supervised worker processes (the ``workers`` service).

    Collaborators: the ``reactor`` (``IReactorProcess`` + ``IReactorTime``: all time
    is its time), the ``spool`` jobs are claimed from, the ``writer`` for SPS
    results, the frozen ``[workers]`` ``config``, the ``analysis`` spec and its
    ``settings`` (passed to workers), the job ``folders``, and the workers' ``env``
    (default: this process's environment).  ``python`` runs the workers.  ``tokens``
    tells running jobs of newer callback tokens for their slide; ``credentials`` (the
    SPS client credentials) reach workers through their environment, never their
    command line (which every local user can read).  The rest are tunables with
    production defaults that tests shorten.
    """

    reactor: Any
    spool: ISpool
    writer: ResultWriter
    config: WorkersConfig
    analysis: str
    settings: Mapping[str, str] = field(factory=dict)
    #: Fetch the slide before the analysis (None: the analysis alone, as in tests).
    pipeline: PipelineSettings | None = None
    folders: WorkFolders = field()
    env: Mapping[str, str] | None = None
    tokens: TokenBook | None = None
    credentials: Credentials | None = field(default=None, repr=False)
    python: str = sys.executable
    sweep_interval: float = 30.0
    cancel_poll_interval: float = 1.0
    start_timeout: float = 120.0
    restart_initial: float = 1.0
    healthy_after: float = 5.0
    missed_heartbeats: int = 3
    _slots: list[_Slot] = field(factory=list, init=False)
    _candidates: Candidates = field(factory=Candidates, init=False)
    _runs: dict[str, JobRun] = field(factory=dict, init=False)
    _parked: dict[str, Job] = field(factory=dict, init=False)
    _accepting: bool = field(default=False, init=False)
    _need_refresh: bool = field(default=True, init=False)
    _refreshing: bool = field(default=False, init=False)
    _unwatch: Callable[[], None] | None = field(default=None, init=False)
    _untoken: Callable[[], None] | None = field(default=None, init=False)
    _loops: list[LoopingCall] = field(factory=list, init=False)
    _observers: list[Callable[[SupervisorEvent], None]] = field(factory=list, init=False)
    _serial: int = field(default=0, init=False)

    @folders.default
    def _default_folders(self) -> WorkFolders:
        return WorkFolders(self.config.work_directory)

    # --- lifecycle --------------------------------------------------------------------

    def startService(self) -> None:
        """Spawn the workers, subscribe to the spool, start the periodic checks."""
        Service.startService(self)
        self._accepting = True
        self._need_refresh = True
        self._unwatch = self.spool.watch(self._on_queued)
        if self.tokens is not None:
            self._untoken = self.tokens.subscribe(self._new_callback)
        self._slots = [
            _Slot(
                number=n,
                backoff=Backoff(
                    initial=self.restart_initial,
                    cap=self.config.restart_backoff_cap,
                    healthy_after=self.healthy_after,
                ),
            )
            for n in range(1, self.config.count + 1)
        ]
        log.info(
            "starting {count} workers for analysis {analysis!r}",
            count=self.config.count,
            analysis=self.analysis,
        )
        for slot in self._slots:
            self._spawn(slot)
        self._loops = [
            self._every(self.config.heartbeat_interval, self._heartbeat, now=False),
            self._every(self.cancel_poll_interval, self._poll_cancellations, now=False),
            self._every(self.sweep_interval, self._sweep, now=True),
        ]

    def stopService(self) -> Deferred[None]:
        """Drain: fires once every job is back in the spool and every worker exited."""
        Service.stopService(self)
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        self._accepting = False
        if self._unwatch is not None:
            self._unwatch()
            self._unwatch = None
        if self._untoken is not None:
            self._untoken()
            self._untoken = None
        for loop in self._loops:
            if loop.running:
                loop.stop()
        self._loops = []
        for slot in self._slots:
            if slot.restart is not None and slot.restart.active():
                slot.restart.cancel()
            slot.restart = None
        for worker in self._live():
            if worker.state in (WorkerState.STARTING, WorkerState.IDLE):
                self._stop_worker(worker, "the daemon is stopping")
        if self._runs:
            log.info(
                "stopping: {count} running jobs get up to {grace} s to finish",
                count=len(self._runs),
                grace=self.config.shutdown_grace,
            )
            await self._wait_runs(self.config.shutdown_grace)
        for worker in self._live():
            run = worker.run
            if run is not None:
                if run.stop_reason is None:
                    run.stop_reason = StopReason.SHUTDOWN
                self._terminate(worker, "the daemon is stopping", planned=True)
            else:
                self._stop_worker(worker, "the daemon is stopping")
        if self._runs:
            # Jobs being written get a little longer; then their SPS calls are given
            # up and they go back to the queue (a stored result.json is kept).
            await self._wait_runs(self.config.kill_grace + 1.0)
            for run in list(self._runs.values()):
                run.abort()
            await self._wait_runs(self.config.kill_grace + 1.0)
        ended = [_observe(w.ended) for w in self._live()]
        if ended:
            await gatherResults(ended)
        if self._runs:
            log.warn(
                "stopped with {count} jobs not back in the spool; the next start recovers them",
                count=len(self._runs),
            )
        log.info("all workers stopped")

    async def _wait_runs(self, timeout: float) -> None:
        """Wait until no job is running, or ``timeout`` seconds."""
        pending = [_observe(run.ended) for run in self._runs.values()]
        if not pending:
            return
        done: Deferred[None] = Deferred()

        def fire(_: object = None) -> None:
            if not done.called:
                done.callback(None)

        timer = self.reactor.callLater(timeout, fire)
        gatherResults(pending).addBoth(fire)
        await done
        if timer.active():
            timer.cancel()

    def _every(self, interval: float, body: Callable[[], Any], *, now: bool) -> LoopingCall:
        def safely() -> Deferred[None]:
            # A LoopingCall stops for good on its first error: log everything here.
            try:
                d = body()
            except Exception:
                log.failure("supervisor timer {name} failed", name=body.__name__)
                return succeed(None)
            if isinstance(d, Deferred):
                d.addErrback(
                    lambda f: log.failure("supervisor timer {name} failed", f, name=body.__name__)
                )
                return d
            return succeed(None)

        loop = LoopingCall(safely)
        loop.clock = self.reactor
        loop.start(interval, now=now)
        return loop

    # --- observers and introspection ------------------------------------------------

    def observe(self, callback: Callable[[SupervisorEvent], None]) -> Callable[[], None]:
        """Call ``callback(event)`` for every :class:`SupervisorEvent`; return an unsubscribe."""
        entry = [callback]
        self._observers.append(callback)

        def unsubscribe() -> None:
            if entry:
                self._observers.remove(entry.pop())

        return unsubscribe

    def _emit(
        self, kind: str, worker: Worker | None = None, job_id: str | None = None, **detail: Any
    ) -> None:
        event = SupervisorEvent(kind, worker.name if worker else None, job_id, detail)
        for callback in list(self._observers):
            try:
                callback(event)
            except Exception:
                log.failure("supervisor observer {callback!r} failed", callback=callback)

    def snapshot(self) -> list[dict[str, Any]]:
        """One dict per worker slot: name, state, pid, job id, jobs done."""
        out = []
        for slot in self._slots:
            worker = slot.worker
            out.append(
                {
                    "slot": slot.number,
                    "worker": worker.name if worker else None,
                    "state": worker.state.value if worker else WorkerState.DEAD.value,
                    "pid": worker.pid if worker else None,
                    "job": worker.run.job_id if worker and worker.run else None,
                    "jobs": worker.jobs if worker else 0,
                    "restart_delay": slot.backoff.delay,
                }
            )
        return out

    def _live(self) -> list[Worker]:
        return [s.worker for s in self._slots if s.worker is not None and s.worker.state in _LIVE]

    # --- worker state -----------------------------------------------------------------

    def _set(self, worker: Worker, state: WorkerState) -> None:
        """The one place a worker's state changes."""
        if state not in _TRANSITIONS[worker.state]:
            raise RuntimeError(f"worker {worker.name}: no transition {worker.state} → {state}")
        log.debug("worker {worker}: {old} → {new}", worker=worker.name, old=worker.state, new=state)
        worker.state = state

    def _spawn(self, slot: _Slot) -> None:
        """Start a new worker process in ``slot``."""
        slot.restart = None
        if not self._accepting:
            return
        self._serial += 1
        name = f"{slot.number}.{self._serial}"
        this: list[Worker] = []  # the callbacks below need the record they belong to
        worker = Worker(
            slot=slot,
            name=name,
            started=self.reactor.seconds(),
            amp=_DaemonAMP(lambda job_id, pct, text: self._on_progress(this[0], job_id, pct, text)),
            stdout=LineLog(lambda text: self._output(this[0], "stdout", text), self.reactor),
            stderr=LineLog(lambda text: self._output(this[0], "stderr", text), self.reactor),
        )
        this.append(worker)
        slot.worker = worker
        argv = [self.python, "-m", "dpatia_daemon.workers.child", "--analysis", self.analysis]
        for key, value in sorted(self.settings.items()):
            argv += ["--setting", f"{key}={value}"]
        if self.pipeline is not None:
            argv += ["--pipeline", self.pipeline.to_json()]
        env = dict(os.environ if self.env is None else self.env)
        without_credentials(env)
        if self.credentials is not None:
            env.update(self.credentials.to_environ())
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH", "")) if p
        )
        try:
            self.reactor.spawnProcess(
                _WorkerProcess(self, worker), self.python, argv, env=env, childFDs=CHILD_FDS
            )
        except Exception:
            log.failure(
                "worker {worker}: could not spawn {python}", worker=name, python=self.python
            )
            self._exited(worker, Failure())
            return
        if worker.state is WorkerState.STARTING:
            worker.pid = getattr(worker.transport, "pid", None)
            worker.start_timer = self.reactor.callLater(
                self.start_timeout, self._start_timed_out, worker
            )
            log.info("worker {worker} spawned (pid {pid})", worker=name, pid=worker.pid)
            self._emit("worker-spawned", worker, pid=worker.pid)

    def _connected(self, worker: Worker) -> None:
        d = worker.amp.callRemote(Hello)
        d.addCallbacks(lambda answer: self._hello(worker, answer), lambda f: None)

    def _hello(self, worker: Worker, answer: dict[str, Any]) -> None:
        if worker.start_timer is not None and worker.start_timer.active():
            worker.start_timer.cancel()
        worker.start_timer = None
        if worker.state is not WorkerState.STARTING:
            return
        worker.pid = answer["pid"]
        worker.load_error = answer["load_error"]
        if worker.load_error:
            log.error(
                "worker {worker}: cannot load analysis {analysis!r}: {error}",
                worker=worker.name,
                analysis=self.analysis,
                error=worker.load_error,
            )
        self._set(worker, WorkerState.IDLE)
        log.info("worker {worker} ready (pid {pid})", worker=worker.name, pid=worker.pid)
        self._emit("worker-ready", worker, pid=worker.pid, load_error=worker.load_error)
        self._pump()

    def _start_timed_out(self, worker: Worker) -> None:
        worker.start_timer = None
        if worker.state is WorkerState.STARTING:
            log.error(
                "worker {worker} did not start within {timeout} s; killing it",
                worker=worker.name,
                timeout=self.start_timeout,
            )
            self._terminate(worker, "it did not start in time")

    def _stop_worker(self, worker: Worker, why: str) -> None:
        """Ask ``worker`` to exit: close its AMP pipe (EOF); SIGTERM if it lingers."""
        if worker.state in (WorkerState.STOPPING, WorkerState.DEAD):
            return
        self._set(worker, WorkerState.STOPPING)
        worker.planned = True
        worker.stop_why = why
        log.info("worker {worker}: stopping ({why})", worker=worker.name, why=why)
        if worker.transport is not None:
            _PipeTransport(worker.transport).loseConnection()
        worker.kill_timer = self.reactor.callLater(
            self.config.kill_grace, self._terminate, worker, why, True
        )

    def _terminate(self, worker: Worker, why: str, planned: bool = False) -> None:
        """SIGTERM ``worker`` now, SIGKILL after ``kill_grace``."""
        if worker.state is WorkerState.DEAD or worker.term_sent:
            return
        if worker.state is not WorkerState.STOPPING:
            self._set(worker, WorkerState.STOPPING)
            worker.planned = planned
            worker.stop_why = why
        worker.term_sent = True
        log.info("worker {worker}: SIGTERM ({why})", worker=worker.name, why=why)
        self._signal(worker, "TERM")
        if worker.kill_timer is not None and worker.kill_timer.active():
            worker.kill_timer.cancel()
        worker.kill_timer = self.reactor.callLater(self.config.kill_grace, self._kill, worker)

    def _kill(self, worker: Worker) -> None:
        worker.kill_timer = None
        if worker.state is not WorkerState.DEAD:
            log.warn("worker {worker}: SIGKILL (it ignored SIGTERM)", worker=worker.name)
            self._signal(worker, "KILL")

    def _signal(self, worker: Worker, signal: str) -> None:
        try:
            worker.transport.signalProcess(signal)
        except (AttributeError, OSError, ierror.ProcessExitedAlready):
            pass

    def _exited(self, worker: Worker, reason: Failure) -> None:
        """The one path by which a worker leaves, and where its replacement is scheduled."""
        if worker.state is WorkerState.DEAD:
            return
        worker.exit = reason
        for timer in worker.timers():
            if timer is not None and timer.active():
                timer.cancel()
        expected = worker.state is WorkerState.STOPPING
        self._set(worker, WorkerState.DEAD)
        lifetime = self.reactor.seconds() - worker.started
        how = describe_exit(reason)
        if expected:
            log.info(
                "worker {worker} exited ({how}; {why})",
                worker=worker.name,
                how=how,
                why=worker.stop_why,
            )
        else:
            log.warn(
                "worker {worker} (pid {pid}) exited unexpectedly ({how}) after {lifetime:.1f} s",
                worker=worker.name,
                pid=worker.pid,
                how=how,
                lifetime=lifetime,
            )
        # Fail the calls still waiting for an answer (RunJob, Ping): their handlers
        # see the worker dead, with its exit reason.
        try:
            worker.amp.connectionLost(reason)
        except Exception:
            log.failure("worker {worker}: closing its AMP connection failed", worker=worker.name)
        worker.ended.callback(None)
        slot = worker.slot
        if slot.worker is worker:
            slot.worker = None
        self._emit("worker-exited", worker, pid=worker.pid, how=how, lifetime=lifetime)
        if self._accepting:
            healthy = not worker.load_error and (worker.planned or lifetime >= self.healthy_after)
            delay = slot.backoff.after_exit(
                lifetime if not worker.planned else max(lifetime, self.healthy_after), healthy
            )
            if delay > 0:
                log.warn(
                    "worker slot {slot}: restarting in {delay:g} s (its workers keep failing)",
                    slot=slot.number,
                    delay=delay,
                )
            slot.restart = self.reactor.callLater(delay, self._spawn, slot)

    # --- output, progress ---------------------------------------------------------

    def _output(self, worker: Worker, stream: str, text: str) -> None:
        job = worker.run.job_id if worker.run else "-"
        log.info(
            "worker {worker} job {job_id} {stream}: {line}",
            worker=worker.name,
            job_id=job,
            stream=stream,
            line=text,
        )

    def _on_progress(self, worker: Worker, job_id: str, percent: int, text: str) -> None:
        run = worker.run
        if run is None or run.job_id != job_id:
            return
        run.on_progress(percent, text)
        self._emit("job-progress", worker, job_id, percent=percent, text=text)
        if self.reactor.seconds() - run.last_cancel_check >= self.cancel_poll_interval:
            self._check_cancel(run)

    # --- dispatch -------------------------------------------------------------------

    def _on_queued(self, job: Job) -> None:
        """The spool's watch: ``job`` is QUEUED (new, released, recovered or swept)."""
        self._candidates.offer(job)
        self._pump()

    def _pump(self) -> None:
        """Hand the best candidates to idle workers."""
        if not self._accepting:
            return
        for slot in self._slots:
            worker = slot.worker
            if worker is None or worker.state is not WorkerState.IDLE:
                continue
            job = self._candidates.pop()
            if job is None:
                self._refresh()
                return
            self._claim(worker, job)

    def _refresh(self) -> None:
        """Refill the candidates from ``spool.queued()`` (when dry; once per need)."""
        if self._refreshing or not (self._need_refresh or self._candidates.truncated):
            return
        self._refreshing = True
        self._need_refresh = False

        def got(jobs: list[Job]) -> None:
            self._refreshing = False
            self._candidates.offer_all(jobs)
            if len(self._candidates):
                self._pump()

        def failed(f: Failure) -> None:
            self._refreshing = False
            log.failure("listing queued jobs failed", f)

        self.spool.queued().addCallbacks(got, failed)

    def _claim(self, worker: Worker, candidate: Job) -> None:
        self._set(worker, WorkerState.BUSY)
        job_id = worker.claiming = candidate.job_id

        def failed(f: Failure) -> None:
            log.failure("claiming job {job_id} failed", f, job_id=job_id)

        d = self.spool.claim(job_id)
        d.addErrback(failed)
        d.addCallback(lambda job: self._claimed(worker, candidate, job))
        d.addErrback(lambda f: log.failure("dispatching job {job_id} failed", f, job_id=job_id))

    def _claimed(self, worker: Worker, candidate: Job, job: Job | None) -> None:
        worker.claiming = None
        job_id = candidate.job_id
        if job is None:
            # Gone, merged, held elsewhere, or its key is running.  If we run that key,
            # the job waits until our run ends (the spool will not announce it again).
            if any(run.job.key == candidate.key for run in self._runs.values()):
                self._parked[candidate.key] = candidate
            if worker.state is WorkerState.BUSY:
                self._set(worker, WorkerState.IDLE)
            self._pump()
            return
        if worker.state is not WorkerState.BUSY or not self._accepting:
            # The worker died (or we are stopping) while the claim was in flight.
            log.info("job {job_id}: claimed but not run; back to the queue", job_id=job_id)
            self.spool.release(job_id, count_attempt=False, error=None).addErrback(
                lambda f: log.failure("releasing job {job_id} failed", f, job_id=job_id)
            )
            if worker.state is WorkerState.BUSY:
                self._set(worker, WorkerState.IDLE)
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
        )
        self._runs[job.job_id] = run
        worker.run = run
        run.ended.addCallback(self._run_ended, run)
        d = Deferred.fromCoroutine(self._execute(worker, run))
        d.addErrback(self._execute_failed, worker, run)

    def _new_callback(self, application_id: str, slide_id: str, callback: Callback) -> None:
        """A request brought a newer callback for a slide: its running jobs use it."""
        for run in list(self._runs.values()):
            if run.job.slide_id == slide_id and run.job.application_id == application_id:
                run.use_callback(callback)

    def _run_ended(self, final: Job | None, run: JobRun) -> Job | None:
        if self._runs.get(run.job_id) is run:
            del self._runs[run.job_id]
        state = final.state.value if final is not None else None
        self._emit("job-ended", None, run.job_id, state=state, ran_on=run.worker)
        parked = self._parked.pop(run.job.key, None)
        if parked is not None:
            self._candidates.offer(parked)
        self._need_refresh = True
        self._pump()
        return final

    def _execute_failed(self, f: Failure, worker: Worker, run: JobRun) -> None:
        log.failure("job {job_id}: internal error while running it", f, job_id=run.job_id)
        if worker.run is run:
            run.stop_reason = run.stop_reason or StopReason.UNRESPONSIVE
            self._terminate(worker, "internal error")
        if not run.ended.called:
            Deferred.fromCoroutine(run.fail(f"internal error: {f.getErrorMessage()}")).addErrback(
                lambda f2: log.failure("job {job_id}: could not end it", f2, job_id=run.job_id)
            )

    def _free(self, worker: Worker) -> None:
        """The worker is not needed for its claimed job after all."""
        worker.run = None
        if worker.state is WorkerState.BUSY:
            if self._accepting:
                self._set(worker, WorkerState.IDLE)
                self._pump()
            else:
                self._stop_worker(worker, "the daemon is stopping")

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
            await run.complete(done)
            return
        run.begin()
        worker.job_timer = self.reactor.callLater(
            self.config.job_timeout, self._timed_out, worker, run
        )
        self._emit("job-started", worker, run.job_id, attempt=run.job.attempts + 1)
        log.info(
            "job {job_id}: running on worker {worker} (attempt {attempt})",
            job_id=run.job_id,
            worker=worker.name,
            attempt=run.job.attempts + 1,
        )
        outcome: str | Exception
        try:
            answer = await worker.amp.callRemote(RunJob, job_id=run.job_id, work_dir=work_dir)
            outcome = answer["result_path"]
        except (AnalysisFailed, JobCancelled) as e:
            outcome = e
        except Exception as e:  # the pipe broke or the worker died: see below
            outcome = e
        for name in ("job_timer", "cancel_timer"):
            timer = getattr(worker, name)
            if timer is not None and timer.active():
                timer.cancel()
            setattr(worker, name, None)

        if isinstance(outcome, Exception) and not isinstance(
            outcome, AnalysisFailed | JobCancelled
        ):
            if worker.state is not WorkerState.DEAD:
                if isinstance(outcome, WorkerBusy):
                    log.error("worker {worker} was busy: a dispatch bug", worker=worker.name)
                self._terminate(worker, "its AMP connection failed")
                await _observe(worker.ended)
            worker.run = None
            await self._after_crash(worker, run)
            return

        self._analysis_returned(worker, run)
        if run.cancel_reason is not None or run.result_gone:
            await run.cancel()
        elif isinstance(outcome, JobCancelled):
            run.cancel_reason = "stopped by the analysis"
            await run.cancel()
        elif isinstance(outcome, AnalysisFailed):
            await run.fail(outcome.message)
        else:
            try:
                result = run.read_result(outcome)
            except UnusableResult as e:
                await run.fail(str(e))
                return
            await run.complete(result)

    async def _after_crash(self, worker: Worker, run: JobRun) -> None:
        """The worker died during the analysis: decide the job's fate by why."""
        reason = run.stop_reason
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
            await run.fail(
                f"the worker process died while running the analysis ({describe_exit(worker.exit)})"
            )

    def _analysis_returned(self, worker: Worker, run: JobRun) -> None:
        """The worker answered RunJob: it is free for the next job (or recycled)."""
        worker.run = None
        worker.jobs += 1
        if worker.state is not WorkerState.BUSY:
            return
        limit = self.config.max_jobs_per_worker
        if worker.load_error:
            # Restart it (with backoff) so a fixed analysis is picked up.
            self._stop_worker(worker, "its analysis could not be loaded")
        elif limit and worker.jobs >= limit:
            self._stop_worker(worker, f"recycled after {worker.jobs} jobs")
        elif not self._accepting:
            self._stop_worker(worker, "the daemon is stopping")
        else:
            self._set(worker, WorkerState.IDLE)
            self._need_refresh = True
            self._pump()

    # --- deadlines, heartbeats, cancellation ----------------------------------------

    def _timed_out(self, worker: Worker, run: JobRun) -> None:
        worker.job_timer = None
        if worker.run is run and worker.state is WorkerState.BUSY:
            log.warn(
                "job {job_id}: still running after job_timeout ({timeout:g} s); "
                "stopping worker {worker}",
                job_id=run.job_id,
                timeout=self.config.job_timeout,
                worker=worker.name,
            )
            run.stop_reason = StopReason.TIMEOUT
            self._terminate(worker, "job timeout", planned=True)

    def _heartbeat(self) -> None:
        for worker in self._live():
            if worker.state not in (WorkerState.IDLE, WorkerState.BUSY):
                continue
            if worker.ping_pending:
                worker.missed += 1
                if worker.missed >= self.missed_heartbeats:
                    log.warn(
                        "worker {worker}: no heartbeat answer for {missed} intervals; killing it",
                        worker=worker.name,
                        missed=worker.missed,
                    )
                    if worker.run is not None and worker.run.stop_reason is None:
                        worker.run.stop_reason = StopReason.UNRESPONSIVE
                    self._terminate(worker, "it stopped answering heartbeats")
                continue
            worker.ping_pending = True
            worker.amp.callRemote(Ping).addCallbacks(
                lambda _, w=worker: self._pong(w), lambda f: None
            )

    @staticmethod
    def _pong(worker: Worker) -> None:
        worker.ping_pending = False
        worker.missed = 0

    def _poll_cancellations(self) -> Deferred[Any]:
        runs = [w.run for w in self._live() if w.run is not None and w.run.cancel_reason is None]
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

        The durable way to cancel is ``spool.request_cancel`` (seen within a second);
        this is the in-process shortcut.
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
        worker = next((w for w in self._live() if w.run is run), None)
        log.info("job {job_id}: cancelling ({reason})", job_id=run.job_id, reason=reason)
        if worker is None or worker.state is not WorkerState.BUSY:
            return  # no analysis running: how the job ends already knows
        worker.amp.callRemote(CancelJob, job_id=run.job_id).addErrback(lambda f: None)
        worker.cancel_timer = self.reactor.callLater(
            self.config.kill_grace, self._cancel_overdue, worker, run
        )

    def _cancel_overdue(self, worker: Worker, run: JobRun) -> None:
        worker.cancel_timer = None
        if worker.run is run and worker.state is WorkerState.BUSY:
            log.warn(
                "job {job_id}: the analysis did not stop within {grace:g} s of its "
                "cancellation; stopping worker {worker}",
                job_id=run.job_id,
                grace=self.config.kill_grace,
                worker=worker.name,
            )
            run.stop_reason = StopReason.CANCEL
            self._terminate(worker, "a cancelled analysis did not stop", planned=True)

    # --- the sweep ------------------------------------------------------------------

    def _sweep(self) -> Deferred[Any]:
        """Periodically: re-list the queue once, and remove work folders of ended jobs."""
        self._need_refresh = True
        self._pump()
        now = self.reactor.seconds()

        def prune(jobs: list[Job]) -> Deferred[Any]:
            keep = {job.key for job in jobs} | {run.job.key for run in self._runs.values()}
            return self.folders.prune(keep, now)

        return self.spool.find().addCallback(prune)


__all__ = [
    "CHILD_FDS",
    "Backoff",
    "LineLog",
    "Supervisor",
    "SupervisorEvent",
    "Worker",
    "WorkerState",
    "describe_exit",
]
