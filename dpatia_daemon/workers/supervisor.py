"""The ``workers`` service: a worker pool and a dispatcher, started and drained together.

:class:`Supervisor` is the ``workers`` service of the daemon's tree.  It owns nothing
but the composition of two parts that know nothing of each other's insides:

* a :class:`~.pool.WorkerPool` keeps ``[workers] count`` worker processes (``python -m
  dpatia_daemon.workers.child``) alive: spawn, hello, heartbeats, TERM then KILL,
  restarts with backoff;
* a :class:`~.dispatcher.Dispatcher` runs the queued jobs on the pool's idle workers
  and decides each job's fate (deadlines, cancellation, retries).

The pool tells the dispatcher when a worker is ready and what it reported; their
events reach observers as one stream (:meth:`Supervisor.observe`), and the workers'
output is logged here, tagged with the worker and its current job.

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

import sys
from collections.abc import Callable, Mapping
from typing import Any

from attrs import define, field
from twisted.application.service import IService, Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from ..config import WorkersConfig
from ..pipeline.prepare import PipelineSettings
from ..spool import ISpool
from ..sps.tokens import Credentials, TokenBook, without_credentials
from ..sps.writer import ResultWriter
from .dispatcher import Dispatcher
from .events import Observers, SupervisorEvent
from .folders import WorkFolders
from .health import SPSHealth
from .pool import Worker, WorkerPool, worker_argv, workers_environ
from .spooltokens import SpoolTokenWatch

log = Logger()

#: The reason every worker is given when the daemon stops.
_STOPPING = "the daemon is stopping"


@implementer(IService)
@define(eq=False)
class Supervisor(Service):
    """Runs analyses in supervised worker processes (the ``workers`` service).

    Collaborators: the ``reactor`` (``IReactorProcess`` + ``IReactorTime``: all time
    is its time), the ``spool`` jobs are claimed from, the ``writer`` for SPS
    results, the frozen ``[workers]`` ``config``, the ``analysis`` spec and its
    ``settings`` (passed to workers), the job ``folders``, and the workers' ``env``
    (default: this process's environment, with ``[workers] environment`` added).
    ``[workers] python`` runs the workers, or else ``python`` (ours).  ``tokens``
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
    #: The shared view of each SPS's health (the front door's writes feed it too; the
    #: status page reads it); one of its own if None.
    health: SPSHealth | None = None
    credentials: Credentials | None = field(default=None, repr=False)
    python: str = sys.executable
    sweep_interval: float = 30.0
    cancel_poll_interval: float = 1.0
    start_timeout: float = 120.0
    restart_initial: float = 1.0
    healthy_after: float = 5.0
    missed_heartbeats: int = 3
    _events: Observers = field(factory=Observers, init=False)
    _pool: WorkerPool | None = field(default=None, init=False)
    _dispatcher: Dispatcher | None = field(default=None, init=False)
    _token_watch: SpoolTokenWatch | None = field(default=None, init=False)

    @folders.default
    def _default_folders(self) -> WorkFolders:
        return WorkFolders(self.config.work_directory)

    # --- the parts --------------------------------------------------------------------

    @property
    def pool(self) -> WorkerPool:
        """The worker pool (built at start)."""
        assert self._pool is not None, "the supervisor has not started"
        return self._pool

    @property
    def dispatcher(self) -> Dispatcher:
        """The dispatcher (built at start)."""
        assert self._dispatcher is not None, "the supervisor has not started"
        return self._dispatcher

    def _environ(self) -> dict[str, str]:
        env = workers_environ(self.config, self.env)
        without_credentials(env)
        if self.credentials is not None:
            env.update(self.credentials.to_environ())
        return env

    def _build(self) -> None:
        pool = WorkerPool(
            reactor=self.reactor,
            config=self.config,
            argv=worker_argv(
                self.config.python or self.python,
                self.analysis,
                self.settings,
                self.pipeline.to_json() if self.pipeline is not None else None,
            ),
            env=self._environ(),
            events=self._events,
            on_output=self._output,
            analysis=self.analysis,
            start_timeout=self.start_timeout,
            restart_initial=self.restart_initial,
            healthy_after=self.healthy_after,
            missed_heartbeats=self.missed_heartbeats,
        )
        dispatcher = Dispatcher(
            reactor=self.reactor,
            spool=self.spool,
            writer=self.writer,
            config=self.config,
            folders=self.folders,
            pool=pool,
            events=self._events,
            tokens=self.tokens,
            health=self.health,
            sweep_interval=self.sweep_interval,
            cancel_poll_interval=self.cancel_poll_interval,
        )
        pool.on_ready = dispatcher.worker_ready
        pool.on_progress = dispatcher.progress
        self._pool, self._dispatcher = pool, dispatcher
        if self.tokens is not None:
            # Tokens other daemons on the spool received, for the jobs running here.
            self._token_watch = SpoolTokenWatch(
                self.spool,
                self.reactor,
                dispatcher.running_jobs,
                self.tokens,
                interval=self.config.heartbeat_interval,
            )

    # --- lifecycle --------------------------------------------------------------------

    def startService(self) -> None:
        """Spawn the workers, subscribe to the spool, start the periodic checks."""
        Service.startService(self)
        self._build()
        log.info(
            "starting {count} workers for analysis {analysis!r}",
            count=self.config.count,
            analysis=self.analysis,
        )
        self.dispatcher.start()
        self.pool.start()
        if self._token_watch is not None:
            self._token_watch.start()

    def stopService(self) -> Deferred[None]:
        """Drain: fires once every job is back in the spool and every worker exited."""
        Service.stopService(self)
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        dispatcher, pool = self.dispatcher, self.pool
        if self._token_watch is not None:
            self._token_watch.stop()
        dispatcher.close()
        pool.close(_STOPPING)
        if dispatcher.running:
            log.info(
                "stopping: {count} running jobs get up to {grace} s to finish",
                count=dispatcher.running,
                grace=self.config.shutdown_grace,
            )
            await dispatcher.wait_runs(self.config.shutdown_grace)
        dispatcher.interrupt()
        exited = pool.stop(_STOPPING)
        if dispatcher.running:
            # Jobs being written get a little longer; then their SPS calls are given
            # up and they go back to the queue (a stored result.json is kept).
            await dispatcher.wait_runs(self.config.kill_grace + 1.0)
            dispatcher.abort()
            await dispatcher.wait_runs(self.config.kill_grace + 1.0)
        await exited
        if dispatcher.running:
            log.warn(
                "stopped with {count} jobs not back in the spool; the next start recovers them",
                count=dispatcher.running,
            )
        log.info("all workers stopped")

    # --- observers and introspection ------------------------------------------------

    def observe(self, callback: Callable[[SupervisorEvent], None]) -> Callable[[], None]:
        """Call ``callback(event)`` for every :class:`SupervisorEvent`; return an unsubscribe."""
        return self._events.observe(callback)

    def snapshot(self) -> list[dict[str, Any]]:
        """One dict per worker slot: name, state, pid, job id, jobs done."""
        if self._pool is None:
            return []
        return self._pool.snapshot(job_of=self.dispatcher.job_on)

    def cancel(self, job_id: str, reason: str = "cancelled") -> bool:
        """Stop the running analysis of ``job_id`` now; False if it is not running here."""
        return self._dispatcher is not None and self._dispatcher.cancel(job_id, reason)

    def _output(self, worker: Worker, stream: str, text: str) -> None:
        log.info(
            "worker {worker} job {job_id} {stream}: {line}",
            worker=worker.name,
            job_id=self.dispatcher.job_on(worker) or "-",
            stream=stream,
            line=text,
        )


__all__ = ["Supervisor", "SupervisorEvent"]
