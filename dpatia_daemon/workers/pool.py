"""The worker pool: spawns worker processes, watches them, stops and replaces them.

:class:`WorkerPool` keeps ``[workers] count`` processes (``python -m
dpatia_daemon.workers.child``, see :mod:`.child`) and talks to them over AMP on
dedicated pipes (:mod:`.commands`); their stdout/stderr become log lines through a
:class:`~.linelog.LineLog` each.  It knows nothing about jobs: it tells its owner when
a worker is ready for work (``on_ready``), when one is gone (``on_gone``), what one
printed (``on_output``) and what one reported (``on_progress``), and it takes workers
back when their job is over (:meth:`WorkerPool.job_done`).

Lifecycle.  One :class:`Worker` record per process, with a :class:`WorkerState`
(``starting → idle → busy → stopping → dead``) changed only by :meth:`Worker.set_state`.
A worker is never reused after it exits: :meth:`WorkerPool._exited` is the one code path
that retires it and schedules its replacement, after a :class:`~dpatia_daemon.backoff.Backoff`
delay that doubles while workers die young (or cannot load their analysis) and resets
after a healthy run, capped at ``[workers] restart_backoff_cap``.

Liveness.  A worker must answer ``Hello`` within ``start_timeout`` and a ``Ping`` every
``heartbeat_interval``; after ``missed_heartbeats`` misses it is killed, and its record
says so (:attr:`StopCause.UNRESPONSIVE`), for whoever ran a job on it.  Stopping a
worker is closing its AMP pipe (EOF: the child exits); SIGTERM if it lingers
``kill_grace`` seconds, SIGKILL ``kill_grace`` after that.

The same record, slot and backoff serve the extra front-door processes
(:mod:`dpatia_daemon.frontdoor.processes`), which need no AMP.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from enum import StrEnum
from typing import Any

from attrs import define, field
from twisted.internet import error as ierror
from twisted.internet.defer import Deferred, TimeoutError, gatherResults
from twisted.internet.interfaces import IAddress, IDelayedCall, ITransport
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.protocols.amp import AMP
from twisted.python.failure import Failure
from zope.interface import implementer

import dpatia_daemon

from ..backoff import Backoff
from ..config import SLOT_ENV, WorkersConfig
from .commands import WORKER_AMP_IN, WORKER_AMP_OUT, Hello, Ping, Progress, StepDone
from .events import Observers
from .limits import limits_environ
from .linelog import LineLog
from .timers import cancel_call, every

log = Logger()

#: The child's file descriptors: stdin (closed at once), stdout and stderr as log
#: streams, and the two AMP pipes.
CHILD_FDS: dict[int, str] = {0: "w", 1: "r", 2: "r", WORKER_AMP_IN: "w", WORKER_AMP_OUT: "r"}

#: The directory that holds the dpatia_daemon package: put first on the workers'
#: PYTHONPATH so they run the same code as the daemon, however it was started.
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(dpatia_daemon.__file__)))


class WorkerState(StrEnum):
    """Where a supervised process is in its life."""

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

LIVE = frozenset({WorkerState.STARTING, WorkerState.IDLE, WorkerState.BUSY, WorkerState.STOPPING})


class StopCause(StrEnum):
    """Why the pool itself stopped a worker (None on the record: it was asked to)."""

    START_TIMEOUT = "start-timeout"
    UNRESPONSIVE = "unresponsive"


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


class DaemonAMP(AMP):
    """The daemon's side of one worker's AMP connection (worker → daemon commands)."""

    def __init__(
        self,
        on_progress: Callable[[str, int, str], None],
        on_step: Callable[..., None] = lambda job_id, **step: None,
    ) -> None:
        super().__init__()
        self._on_progress = on_progress
        self._on_step = on_step

    @Progress.responder
    def progress(self, job_id: str, percent: int, text: str) -> dict[str, Any]:
        """Relay a progress report to the pool's owner."""
        try:
            self._on_progress(job_id, percent, text)
        except Exception:
            log.failure("handling progress of job {job_id} failed", job_id=job_id)
        return {}

    @StepDone.responder
    def step_done(
        self, job_id: str, step: str, seconds: float, size: int, requests: str
    ) -> dict[str, Any]:
        """Relay a step's timing (for the metrics) to the pool's owner."""
        try:
            self._on_step(job_id, step=step, seconds=seconds, size=size, requests=requests)
        except Exception:
            log.failure("handling a step of job {job_id} failed", job_id=job_id)
        return {}


class _WorkerProcess(ProcessProtocol):
    """Connects one child process to its :class:`Worker` record and the pool."""

    def __init__(self, pool: WorkerPool, worker: Worker) -> None:
        self.pool = pool
        self.worker = worker

    def connectionMade(self) -> None:
        worker = self.worker
        worker.transport = self.transport
        worker.amp.makeConnection(_PipeTransport(self.transport))
        try:
            self.transport.closeStdin()  # type: ignore[union-attr]
        except (KeyError, OSError, ierror.ProcessExitedAlready):
            pass
        self.pool._connected(worker)

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
        self.pool._exited(self.worker, reason)


# --- records --------------------------------------------------------------------------


@define(eq=False)
class Slot:
    """A place for one supervised process: its current process and its restart policy."""

    number: int
    backoff: Backoff
    worker: Worker | None = None
    restart: IDelayedCall | None = None

    def cancel_restart(self) -> None:
        """Forget a scheduled restart (the owner is stopping)."""
        cancel_call(self.restart)
        self.restart = None


@define(eq=False)
class Worker:
    """One supervised process, from spawn to exit (never reused after it exits).

    ``amp``, ``stdout`` and ``stderr`` are set for workers (a front-door copy has no AMP
    and writes its log itself).
    """

    slot: Slot
    name: str
    started: float
    amp: DaemonAMP = field(default=None)
    stdout: LineLog = field(default=None)
    stderr: LineLog = field(default=None)
    state: WorkerState = WorkerState.STARTING
    transport: Any = None
    pid: int | None = None
    load_error: str = ""
    jobs: int = 0
    #: Stopped on purpose (recycled, not needed, a deadline): a healthy end for backoff.
    planned: bool = False
    term_sent: bool = False
    stop_why: str = ""
    cause: StopCause | None = None
    ping_pending: bool = False
    missed: int = 0
    kill_timer: IDelayedCall | None = None
    exit: Failure | None = None
    ended: Deferred[None] = field(factory=Deferred)

    def set_state(self, state: WorkerState) -> None:
        """The one place a process's state changes (only along :data:`_TRANSITIONS`)."""
        if state not in _TRANSITIONS[self.state]:
            raise RuntimeError(f"worker {self.name}: no transition {self.state} → {state}")
        log.debug("worker {worker}: {old} → {new}", worker=self.name, old=self.state, new=state)
        self.state = state

    def signal(self, name: str) -> None:
        """Send signal ``name`` (``TERM``, ``KILL``) if the process is still there."""
        try:
            self.transport.signalProcess(name)
        except (AttributeError, OSError, ierror.ProcessExitedAlready):
            pass

    def exited(self, reason: Failure) -> bool:
        """Record the process's end: dead, timers off, ``ended`` fired; False if it was
        dead already."""
        if self.state is WorkerState.DEAD:
            return False
        self.exit = reason
        cancel_call(self.kill_timer)
        self.set_state(WorkerState.DEAD)
        self.ended.callback(None)
        return True


def exit_cause(worker: Worker) -> str:
    """Why ``worker`` exited, as a short bounded label (the metrics' ``cause``):
    ``load-error``, ``start-timeout``, ``unresponsive``, ``planned`` (recycled, not
    needed, a deadline, the daemon stopping) or ``crash``."""
    if worker.load_error:
        return "load-error"
    if worker.cause is not None:
        return worker.cause.value
    return "planned" if worker.planned else "crash"


def _noop(*args: Any) -> None:
    return None


# --- the pool -------------------------------------------------------------------------


@define(eq=False)
class WorkerPool:
    """Keeps ``config.count`` worker processes running (see the module docstring).

    Collaborators: the ``reactor`` (``IReactorProcess`` + ``IReactorTime``: it spawns
    the processes, and all time is its time), the frozen ``[workers]`` ``config``, the
    worker's command line ``argv`` (``argv[0]`` the executable) and the environment
    ``env`` every worker starts from (each slot adds its own: :func:`slot_environ`),
    the shared ``events``, and the owner's callbacks.  The rest are tunables
    with production defaults that tests shorten.
    """

    reactor: Any
    config: WorkersConfig
    argv: Sequence[str]
    #: May hold the SPS client credentials: never in a repr.
    env: Mapping[str, str] = field(repr=False)
    events: Observers = field(factory=Observers)
    #: A worker is ready for a job (it said hello, or its last job is over).
    on_ready: Callable[[Worker], None] = _noop
    #: A worker exited (its ``exit``, ``cause`` and ``stop_why`` say how and why).
    on_gone: Callable[[Worker], None] = _noop
    #: A worker printed a line: ``(worker, "stdout" | "stderr", text)``.
    on_output: Callable[[Worker, str, str], None] = _noop
    #: A worker reported progress: ``(worker, job_id, percent, text)``.
    on_progress: Callable[[Worker, str, int, str], None] = _noop
    analysis: str = ""
    start_timeout: float = 120.0
    restart_initial: float = 1.0
    healthy_after: float = 5.0
    missed_heartbeats: int = 3
    _slots: list[Slot] = field(factory=list, init=False)
    _open: bool = field(default=False, init=False)
    _heartbeat: LoopingCall | None = field(default=None, init=False)
    _serial: int = field(default=0, init=False)

    # --- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        """Spawn the workers and start the heartbeats."""
        self._open = True
        self._slots = [
            Slot(
                number=n,
                backoff=Backoff(
                    initial=self.restart_initial,
                    cap=self.config.restart_backoff_cap,
                    healthy_after=self.healthy_after,
                ),
            )
            for n in range(1, self.config.count + 1)
        ]
        for slot in self._slots:
            self._spawn(slot)
        self._heartbeat = every(self.reactor, self.config.heartbeat_interval, self._beat, now=False)

    def close(self, why: str) -> None:
        """No more workers: no restarts, no heartbeats; idle and starting ones stop now,
        busy ones once their job is over (:meth:`job_done`, :meth:`release`)."""
        self._open = False
        if self._heartbeat is not None and self._heartbeat.running:
            self._heartbeat.stop()
        self._heartbeat = None
        for slot in self._slots:
            slot.cancel_restart()
        for worker in self.live():
            if worker.state in (WorkerState.STARTING, WorkerState.IDLE):
                self.retire(worker, why)

    def stop(self, why: str) -> Deferred[None]:
        """Close, stop every worker still running, and fire once all have exited."""
        self.close(why)
        for worker in self.live():
            self.retire(worker, why)
        return self.ended()

    def ended(self) -> Deferred[None]:
        """Fires once every worker alive now has exited."""
        return gatherResults([w.ended for w in self.live()]).addCallback(lambda _: None)

    # --- introspection ----------------------------------------------------------------

    def live(self) -> list[Worker]:
        """The workers not yet dead, in slot order."""
        return [s.worker for s in self._slots if s.worker is not None and s.worker.state in LIVE]

    def idle(self) -> list[Worker]:
        """The workers ready for a job, in slot order."""
        return [w for w in self.live() if w.state is WorkerState.IDLE]

    def snapshot(self, job_of: Callable[[Worker], str | None]) -> list[dict[str, Any]]:
        """One dict per slot: name, state, pid, job id (from ``job_of``), jobs done."""
        out = []
        for slot in self._slots:
            worker = slot.worker
            out.append(
                {
                    "slot": slot.number,
                    "worker": worker.name if worker else None,
                    "state": worker.state.value if worker else WorkerState.DEAD.value,
                    "pid": worker.pid if worker else None,
                    "job": job_of(worker) if worker else None,
                    "jobs": worker.jobs if worker else 0,
                    "restart_delay": slot.backoff.delay,
                    "gpus": self.config.devices(slot.number),
                }
            )
        return out

    # --- handing workers out and back -------------------------------------------------

    def acquire(self, worker: Worker) -> None:
        """An idle worker is taken for a job."""
        worker.set_state(WorkerState.BUSY)

    def release(self, worker: Worker) -> None:
        """A busy worker ran no analysis after all: ready again (or stopped, if closed)."""
        if worker.state is not WorkerState.BUSY:
            return
        if self._open:
            worker.set_state(WorkerState.IDLE)
            self.on_ready(worker)
        else:
            self.retire(worker, "the daemon is stopping")

    def job_done(self, worker: Worker) -> None:
        """A busy worker answered its job: ready again, or recycled."""
        worker.jobs += 1
        if worker.state is not WorkerState.BUSY:
            return
        limit = self.config.max_jobs_per_worker
        if worker.load_error:
            # Restart it (with backoff) so a fixed analysis is picked up.
            self.retire(worker, "its analysis could not be loaded")
        elif limit and worker.jobs >= limit:
            self.retire(worker, f"recycled after {worker.jobs} jobs")
        elif not self._open:
            self.retire(worker, "the daemon is stopping")
        else:
            worker.set_state(WorkerState.IDLE)
            self.on_ready(worker)

    # --- spawning ---------------------------------------------------------------------

    def _spawn(self, slot: Slot) -> None:
        """Start a new worker process in ``slot``."""
        slot.restart = None
        if not self._open:
            return
        self._serial += 1
        name = f"{slot.number}.{self._serial}"
        worker = Worker(slot=slot, name=name, started=self.reactor.seconds())
        worker.amp = DaemonAMP(
            lambda job_id, pct, text: self.on_progress(worker, job_id, pct, text),
            lambda job_id, **step: self.events.emit("job-step", name, job_id, **step),
        )
        worker.stdout = LineLog(lambda text: self.on_output(worker, "stdout", text), self.reactor)
        worker.stderr = LineLog(lambda text: self.on_output(worker, "stderr", text), self.reactor)
        slot.worker = worker
        devices = self.config.devices(slot.number)
        executable = self.argv[0]
        try:
            self.reactor.spawnProcess(
                _WorkerProcess(self, worker),
                executable,
                list(self.argv),
                env=slot_environ(self.env, self.config, slot.number),
                childFDs=CHILD_FDS,
            )
        except Exception:
            log.failure("worker {worker}: could not spawn {python}", worker=name, python=executable)
            self._exited(worker, Failure())
            return
        if worker.state is WorkerState.STARTING:
            worker.pid = getattr(worker.transport, "pid", None)
            log.info(
                "worker {worker} spawned (pid {pid}{gpus})",
                worker=name,
                pid=worker.pid,
                gpus="" if devices is None else f", GPUs {devices}",
            )
            self.events.emit("worker-spawned", name, pid=worker.pid)

    def _connected(self, worker: Worker) -> None:
        # The start deadline is Hello's: a worker stuck before its reactor runs (an
        # import that hangs) never answers it.
        d = worker.amp.callRemote(Hello)
        d.addTimeout(self.start_timeout, self.reactor)
        d.addCallbacks(
            lambda answer: self._hello(worker, answer),
            lambda f: self._start_timed_out(worker) if f.check(TimeoutError) else None,
        )

    def _hello(self, worker: Worker, answer: dict[str, Any]) -> None:
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
        worker.set_state(WorkerState.IDLE)
        log.info("worker {worker} ready (pid {pid})", worker=worker.name, pid=worker.pid)
        self.events.emit("worker-ready", worker.name, pid=worker.pid, load_error=worker.load_error)
        self.on_ready(worker)

    def _start_timed_out(self, worker: Worker) -> None:
        if worker.state is WorkerState.STARTING:
            log.error(
                "worker {worker} did not start within {timeout} s; killing it",
                worker=worker.name,
                timeout=self.start_timeout,
            )
            self.terminate(worker, "it did not start in time", cause=StopCause.START_TIMEOUT)

    # --- stopping ---------------------------------------------------------------------

    def retire(self, worker: Worker, why: str) -> None:
        """Ask ``worker`` to exit: close its AMP pipe (EOF); SIGTERM if it lingers."""
        if worker.state in (WorkerState.STOPPING, WorkerState.DEAD):
            return
        worker.set_state(WorkerState.STOPPING)
        worker.planned = True
        worker.stop_why = why
        log.info("worker {worker}: stopping ({why})", worker=worker.name, why=why)
        if worker.transport is not None:
            _PipeTransport(worker.transport).loseConnection()
        worker.kill_timer = self.reactor.callLater(
            self.config.kill_grace, self.terminate, worker, why, True
        )

    def terminate(
        self, worker: Worker, why: str, planned: bool = False, cause: StopCause | None = None
    ) -> None:
        """SIGTERM ``worker`` now, SIGKILL after ``kill_grace``."""
        if worker.state is WorkerState.DEAD or worker.term_sent:
            return
        if worker.state is not WorkerState.STOPPING:
            worker.set_state(WorkerState.STOPPING)
            worker.planned = planned
            worker.stop_why = why
            worker.cause = cause
        worker.term_sent = True
        log.info("worker {worker}: SIGTERM ({why})", worker=worker.name, why=why)
        worker.signal("TERM")
        cancel_call(worker.kill_timer)
        worker.kill_timer = self.reactor.callLater(self.config.kill_grace, self._kill, worker)

    def _kill(self, worker: Worker) -> None:
        worker.kill_timer = None
        if worker.state is not WorkerState.DEAD:
            log.warn("worker {worker}: SIGKILL (it ignored SIGTERM)", worker=worker.name)
            worker.signal("KILL")

    def _exited(self, worker: Worker, reason: Failure) -> None:
        """The one path by which a worker leaves, and where its replacement is scheduled."""
        expected = worker.state is WorkerState.STOPPING
        if not worker.exited(reason):
            return
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
        # see the worker dead, with its exit reason.  (A worker that could not be
        # spawned never had a connection.)
        if worker.transport is not None:
            try:
                worker.amp.connectionLost(reason)
            except Exception:
                log.failure(
                    "worker {worker}: closing its AMP connection failed", worker=worker.name
                )
        slot = worker.slot
        if slot.worker is worker:
            slot.worker = None
        self.events.emit(
            "worker-exited",
            worker.name,
            pid=worker.pid,
            how=how,
            lifetime=lifetime,
            cause=exit_cause(worker),
        )
        try:
            self.on_gone(worker)
        except Exception:
            log.failure("worker {worker}: handling its exit failed", worker=worker.name)
        if self._open:
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

    # --- heartbeats -------------------------------------------------------------------

    def _beat(self) -> None:
        for worker in self.live():
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
                    self.terminate(
                        worker, "it stopped answering heartbeats", cause=StopCause.UNRESPONSIVE
                    )
                continue
            worker.ping_pending = True
            worker.amp.callRemote(Ping).addCallbacks(
                lambda _, w=worker: self._pong(w), lambda f: None
            )

    @staticmethod
    def _pong(worker: Worker) -> None:
        worker.ping_pending = False
        worker.missed = 0


def worker_argv(
    python: str,
    analysis: str,
    settings: Mapping[str, str],
    pipeline_json: str | None,
) -> list[str]:
    """The command line of a worker process."""
    argv = [python, "-m", "dpatia_daemon.workers.child", "--analysis", analysis]
    for key, value in sorted(settings.items()):
        argv += ["--setting", f"{key}={value}"]
    if pipeline_json is not None:
        argv += ["--pipeline", pipeline_json]
    return argv


def child_environ(base: Mapping[str, str] | None, *, own_code: bool = True) -> dict[str, str]:
    """A child's environment: ``base`` (default: ours), unbuffered output, and (with
    ``own_code``) this checkout first on its PYTHONPATH."""
    env = dict(os.environ if base is None else base)
    env["PYTHONUNBUFFERED"] = "1"
    if own_code:
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (PACKAGE_ROOT, env.get("PYTHONPATH", "")) if p
        )
    return env


def workers_environ(config: WorkersConfig, base: Mapping[str, str] | None) -> dict[str, str]:
    """What every worker's environment starts from: ``base`` (default: ours) with
    ``[workers] environment`` on top, unbuffered output, and our code first on the
    PYTHONPATH unless the workers run ``[workers] python``: that interpreter has dpatia
    installed, and our site-packages must not mix with its own."""
    env = dict(os.environ if base is None else base)
    env.update(config.environment)
    limits_environ(config, env)
    return child_environ(env, own_code=config.python is None)


def slot_environ(env: Mapping[str, str], config: WorkersConfig, slot: int) -> dict[str, str]:
    """The environment of a worker in slot ``slot``: ``env``, the slot number and, with
    ``[workers] gpus``, the slot's own ``CUDA_VISIBLE_DEVICES`` (the same for every
    worker the slot ever runs, so a restarted worker gets its GPU back).

    ``CUDA_DEVICE_ORDER`` defaults to ``PCI_BUS_ID`` so the indices mean what
    ``nvidia-smi`` shows (CUDA's own default order puts the fastest GPU first).
    """
    out = dict(env)
    out[SLOT_ENV] = str(slot)
    devices = config.devices(slot)
    if devices is not None:
        out["CUDA_VISIBLE_DEVICES"] = devices
        out.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    return out


__all__ = [
    "CHILD_FDS",
    "LIVE",
    "PACKAGE_ROOT",
    "DaemonAMP",
    "Slot",
    "StopCause",
    "Worker",
    "WorkerPool",
    "WorkerState",
    "child_environ",
    "describe_exit",
    "slot_environ",
    "worker_argv",
    "workers_environ",
]
