"""The spool as a Twisted service on a (possibly shared) directory: :class:`DirectorySpool`.

It runs :class:`~dpatia_daemon.spool.store.SpoolStore` in a private thread pool, gathers
concurrent adds into group commits, sweeps periodically (on the reactor's clock) and
announces jobs becoming QUEUED to its watchers, once each.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from attrs import define, field
from twisted.application.service import IService, Service
from twisted.internet import threads
from twisted.internet.defer import Deferred, DeferredLock, fail, gatherResults, succeed
from twisted.internet.interfaces import IReactorCore, IReactorFromThreads, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from ..jobs import Job, JobState
from .base import SpoolService
from .interface import ISpool, SpoolError, SpoolNotRunning, check_id, check_job
from .lockprobe import LocksNotWorking, journal_warning, mount_warnings, probe_locks
from .locks import default_owner
from .store import SpoolStore

log = Logger()


class ISpoolReactor(IReactorTime, IReactorFromThreads, IReactorCore):
    """The reactor :class:`DirectorySpool` uses: its clock, its thread results, its
    shutdown trigger.  Named for typing only: every real reactor provides all three."""


@implementer(ISpool, IService)
@define(eq=False)
class DirectorySpool(SpoolService):
    """The spool on a (possibly shared) directory; see the package docstring.

    Collaborators: ``directory``, the ``reactor`` (:class:`ISpoolReactor`: its clock
    drives the sweep and it delivers thread results), ``wall_clock``, the time stale
    temp files' mtimes are compared with (file times are wall-clock times, not the
    reactor's), a private thread pool of ``threads`` threads in which all file I/O runs
    (so reads, claims and finishes proceed while a commit is in flight), and
    :attr:`store`, the blocking core.  ``max_batch`` caps how many adds one group
    commit takes, bounding how long it holds key locks; ``owner`` names this daemon in
    logs.
    """

    directory: FilePath[str]
    reactor: ISpoolReactor
    sweep_interval: float = 30.0
    owner: str = field(factory=default_owner)
    threads: int = 4
    max_batch: int = 512
    #: False in an extra front-door process: the main process sweeps (recovers dead
    #: holders' jobs, finds other daemons' jobs) for the machine.
    sweeps: bool = True
    #: Probe at start that file locks work here (:mod:`.lockprobe`): the daemon's main
    #: process does; tests and extra front doors need not.
    check_locks: bool = False
    wall_clock: Callable[[], float] = time.time
    store: SpoolStore = field(init=False)
    _pool: ThreadPool | None = field(init=False, default=None)
    _loop: LoopingCall | None = field(init=False, default=None)
    _shutdown_trigger: object = field(init=False, default=None)
    _opened: bool = field(init=False, default=False)
    _opening: list[Deferred[None]] | None = field(init=False, default=None)
    _pending: list[tuple[Job, Deferred[Job]]] = field(init=False, factory=list)
    _committing: bool = field(init=False, default=False)
    _busy: int = field(init=False, default=0)
    _idle: list[Deferred[None]] = field(init=False, factory=list)
    _announced: dict[str, int] = field(init=False, factory=dict)
    _generation: int = field(init=False, default=0)
    _sweep_lock: DeferredLock = field(init=False, factory=DeferredLock)

    @store.default
    def _make_store(self) -> SpoolStore:
        return SpoolStore(self.directory, owner=self.owner)

    # -- lifecycle -----------------------------------------------------------------

    def startService(self) -> None:
        """Start the thread pool and the sweep (whose first run recovers and announces)."""
        Service.startService(self)
        # After a restart, everything queued is news to the watchers again.
        self._announced.clear()
        # Open synchronously: this runs at daemon start, before the listener accepts
        # anything, and a spool that cannot be created must stop the start with a clear
        # error rather than leave a daemon that answers but cannot keep jobs.
        try:
            self.store.open(self.wall_clock())
        except OSError as e:
            Service.stopService(self)
            raise SpoolError(
                f"spool directory {self.directory.path} is not usable: "
                f"{e.strerror or e} ({e.filename or self.directory.path})"
            ) from None
        if self.check_locks:
            self._check_locks()
        self._opened = True
        log.info("spool {path} open for {owner}", path=self.directory.path, owner=self.owner)
        pool = ThreadPool(minthreads=0, maxthreads=self.threads, name=f"spool {self.owner}")
        pool.start()
        self._pool = pool
        # If the reactor stops without stopping us, do not leave threads behind.
        self._shutdown_trigger = self.reactor.addSystemEventTrigger("during", "shutdown", pool.stop)
        if self.sweeps:
            self._loop = LoopingCall(self._sweep_safely)
            self._loop.clock = self.reactor
            self._loop.start(self.sweep_interval, now=True)

    def _check_locks(self) -> None:
        """Refuse to run where file locks do not keep another process out; warn where
        they work on this host only, and where the filesystem keeps no journal (see
        :mod:`.lockprobe`)."""
        try:
            probe_locks(self.directory.path)
        except (LocksNotWorking, OSError) as e:
            self.store.close()
            Service.stopService(self)
            raise SpoolError(f"spool directory {self.directory.path} is not usable: {e}") from None
        for why in mount_warnings(self.directory.path):
            log.warn(
                "spool {path}: {why}; safe for daemons on this host only, never for several "
                "hosts sharing the spool (README: The spool)",
                path=self.directory.path,
                why=why,
            )
        journal = journal_warning(self.directory.path)
        if journal is not None:
            log.warn("spool {path}: {why} (README: The spool)", path=self.directory.path, why=journal)

    def stopService(self) -> Deferred[None]:
        """Stop: finish in-flight commits and operations, then the sweep and the pool."""
        Service.stopService(self)
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        while self._busy:
            waiter: Deferred[None] = Deferred()
            self._idle.append(waiter)
            await waiter
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            if self._opened:
                await threads.deferToThreadPool(self.reactor, pool, self.store.close)
        finally:
            self._opened = False
            try:
                self.reactor.removeSystemEventTrigger(self._shutdown_trigger)
            except (KeyError, ValueError):
                pass  # the reactor is already shutting down
            # Every thread is idle now, so this join is immediate.
            pool.stop()

    def _enter(self) -> None:
        self._busy += 1

    def _leave(self, result: Any) -> Any:
        self._busy -= 1
        if not self._busy:
            waiters, self._idle = self._idle, []
            for w in waiters:
                w.callback(None)
        return result

    def _when_open(self) -> Deferred[None]:
        """Fire once the tree exists; a failed open is retried by the next caller."""
        if self._opened:
            return succeed(None)
        d: Deferred[None] = Deferred()
        if self._opening is not None:
            self._opening.append(d)
            return d
        self._opening = [d]
        assert self._pool is not None
        opening = threads.deferToThreadPool(
            self.reactor, self._pool, self.store.open, self.wall_clock()
        )

        def done(result: Any) -> None:
            waiters, self._opening = self._opening or [], None
            if not isinstance(result, Failure):
                self._opened = True
                log.info(
                    "spool {path} open for {owner}", path=self.directory.path, owner=self.owner
                )
            for w in waiters:
                if isinstance(result, Failure):
                    w.errback(result)
                else:
                    w.callback(None)

        opening.addBoth(done)
        return d

    def _core(self) -> SpoolStore:
        return self.store

    def _call(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
        """Run ``f`` in the spool's thread pool once the tree exists."""
        if not self.running or self._pool is None:
            return fail(SpoolNotRunning(f"spool {self.directory.path} is not running"))
        pool = self._pool
        self._enter()
        d = self._when_open()
        d.addCallback(lambda _: threads.deferToThreadPool(self.reactor, pool, f, *args, **kwargs))
        d.addBoth(self._leave)
        return d

    # -- watchers --------------------------------------------------------------------

    def notice(self, job_id: str, key: str) -> Deferred[Job | None]:
        """Another process sharing this spool (an extra front door) queued ``job_id``
        under ``key``: tell the watchers now rather than at the next sweep, and return
        the job as it is now (None if gone).  The key makes it one file read, not a
        listing of the queue."""
        try:
            check_id(job_id)
            check_id(key, "key")
        except ValueError:
            return fail()
        self.store.remember(job_id, key)

        def found(job: Job | None) -> Job | None:
            if job is not None and job.job_id not in self._announced:
                self._announce(job)  # only if still QUEUED
            return job

        return self.get(job_id).addCallback(found)

    def _announce(self, job: Job) -> None:
        if job.state is not JobState.QUEUED:
            return
        self._announced[job.job_id] = self._generation
        self._watchers.notify(job)

    # -- the sweep -------------------------------------------------------------------

    def sweep(self) -> Deferred[None]:
        """Recover dead holders' jobs, clean up, and announce QUEUED jobs not yet announced.

        Sweeps run one at a time: a sweep asked for while one runs starts after it (so
        a caller that awaits it knows every earlier sweep is over, too).
        """
        return self._sweep_lock.run(self._sweep_once)

    def _sweep_once(self) -> Deferred[None]:
        start = self._generation
        self._generation += 1
        d = self._call(self.store.sweep, self.wall_clock())

        def announce(result: tuple[list[Job], list[Job]]) -> None:
            recovered, queued = result
            for job in recovered:
                self._announce(job)
            # ``queued`` is the head of the queue (the best jobs), not all of it: what
            # lies beyond is read by the dispatcher when it gets there.  No line per job.
            present = {job.job_id for job in queued}
            found = [job for job in queued if job.job_id not in self._announced]
            if found:
                log.debug("the sweep found {count} queued jobs not yet announced", count=len(found))
            for job in found:
                self._announce(job)
            # Forget jobs that left the queue, but only those announced before this
            # sweep listed the directory (a newer one may simply not be listed yet).
            for job_id, generation in list(self._announced.items()):
                if job_id not in present and generation <= start:
                    del self._announced[job_id]

        return d.addCallback(announce)

    def _sweep_safely(self) -> Deferred[None]:
        # A LoopingCall stops for good on its first error: log everything here.
        def failed(f: Failure) -> None:
            if not f.check(SpoolNotRunning):  # a sweep queued behind stopService
                log.failure("spool sweep of {path} failed", f, path=self.directory.path)

        return self.sweep().addErrback(failed)

    # -- add (group commit) ----------------------------------------------------------

    def add(self, job: Job) -> Deferred[Job]:
        """Queue ``job`` durably; adds arriving during a commit share the next one."""
        try:
            check_job(job)
            if job.state is not JobState.QUEUED:
                raise ValueError(f"only queued jobs can be added, not {job.state.value}")
        except ValueError:
            return fail()
        if not self.running or self._pool is None:
            return fail(SpoolNotRunning(f"spool {self.directory.path} is not running"))
        d: Deferred[Job] = Deferred()
        self._enter()
        d.addBoth(self._leave)
        self._pending.append((job, d))
        self._commit_next()
        return d

    def _commit_next(self) -> None:
        if self._committing or not self._pending or self._pool is None:
            return
        batch = self._pending[: self.max_batch]
        del self._pending[: self.max_batch]
        self._committing = True
        jobs = [job for job, _ in batch]
        Deferred.fromCoroutine(self._commit(self._pool, jobs)).addBoth(self._committed, batch)

    async def _commit(self, pool: ThreadPool, jobs: list[Job]) -> list[Job | BaseException]:
        await self._when_open()
        temps = await self._write_temps(pool, jobs)
        return await threads.deferToThreadPool(
            self.reactor, pool, self.store.commit_batch, jobs, temps
        )

    def _write_temps(
        self, pool: ThreadPool, jobs: list[Job]
    ) -> Deferred[list[FilePath[str] | BaseException]]:
        """Write a batch's temp files in parallel: concurrent fsyncs share journal commits
        (ext4/jbd2 folds fsyncs that arrive together into one commit), so even a small
        batch is spread over every thread rather than fsynced one file after another."""
        n = max(1, min(self.threads, len(jobs)))
        size = -(-len(jobs) // n)
        chunks = [jobs[i : i + size] for i in range(0, len(jobs), size)]
        parts = [
            threads.deferToThreadPool(self.reactor, pool, self.store.write_temps, chunk)
            for chunk in chunks
        ]
        # write_temps never raises (per-job errors are returned), so neither does this.
        return gatherResults(parts).addCallback(lambda lists: [t for part in lists for t in part])

    def _committed(self, result: Any, batch: list[tuple[Job, Deferred[Job]]]) -> None:
        self._committing = False
        if isinstance(result, Failure):
            log.failure("spool commit of {count} jobs failed", result, count=len(batch))
            for _, d in batch:
                d.errback(result)
        else:
            # Watchers first, so that when an add's Deferred fires the dispatcher has
            # already been told (a claim is asynchronous anyway: it delays no answer).
            for r in result:
                if isinstance(r, Job):
                    self._announce(r)
            for (_, d), r in zip(batch, result, strict=True):
                if isinstance(r, BaseException):
                    d.errback(Failure(r))
                else:
                    d.callback(r)
        self._commit_next()
