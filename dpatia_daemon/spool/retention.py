"""History retention: done, failed and cancelled records pruned after ``[spool] retention_days``.

A record's age is its file's modification time: the history record is written when
the job ends (``finish``, ``cancel``) and never rewritten, so the mtime says when it
ended (a wall-clock time, as ``[spool] retention_days`` means it).

:class:`HistoryPrune` is one pass over the three history directories, in bounded
steps: each :meth:`~HistoryPrune.step` looks at no more than ``max_scan`` directory
entries and removes no more than ``batch`` records, each under its key's stripe lock
(the lock every transition of the key takes), and it is safe beside other daemons
doing the same: a record someone else removed meanwhile counts as ``gone``, never as
an error.  Deleting needs no directory fsync: a removal a crash forgets is done again
by the next pass.  One pass at a time per spool directory and host: the pass holds
``locks/prune.lock`` (``flock``, non-blocking), and a daemon that finds it taken leaves
the work to the one that has it.

:class:`Retention` is the daemon's service: every ``interval`` seconds of its clock it
runs a pass with each step in ``run_blocking`` (the reactor's thread pool: the reactor
thread never lists or unlinks) and a short pause between steps, so a prune of a
hundred thousand records does not starve acknowledgements.  Files in ``corrupt/`` are
never deleted (an operator must look at them); each pass counts them and logs a warning
when there are any.  :func:`prune_history` is the same pass run to its end at once, for
``dpatia purge``.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable, Generator, Iterator
from typing import Any

from attrs import define, field, frozen
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..jobs import JobState
from .files import gone
from .interface import TERMINAL
from .locks import FILE_MODE
from .store import SpoolStore

log = Logger()

#: The file whose ``flock`` one pruning pass holds (in the spool's ``locks/``).
PRUNE_LOCK = "prune.lock"
_DAY = 86400.0


@frozen
class PruneCounts:
    """What a pass (or a step) did: records removed, found gone (someone else was
    quicker), and whether the pass has looked at every record."""

    removed: int = 0
    gone: int = 0
    finished: bool = False

    def __add__(self, other: PruneCounts) -> PruneCounts:
        return PruneCounts(self.removed + other.removed, self.gone + other.gone, other.finished)


def corrupt_count(store: SpoolStore) -> int:
    """The number of files quarantined in the spool's ``corrupt/`` (kept, never pruned)."""
    try:
        return len(os.listdir(store.directory.child("corrupt").path))
    except FileNotFoundError:
        return 0


def _history_key(name: str) -> str | None:
    """The key of a history file name ``<key>.<job_id>.json``, or None for other files."""
    parts = name.split(".")
    if len(parts) != 3 or parts[2] != "json":
        return None
    key, job_id = parts[0], parts[1]
    if not (2 <= len(key) <= 64 and 2 <= len(job_id) <= 64):
        return None
    if not all(c in "0123456789abcdef" for c in key + job_id):
        return None
    return key


@define(eq=False)
class HistoryPrune:
    """One pass removing history records last modified before ``cutoff`` (wall clock).

    Plain blocking methods, one caller at a time (a pass may move between threads from
    step to step).  :meth:`begin` takes the pass lock; :meth:`step` does a bounded part
    of the work; :meth:`end` releases the lock (also after an error).
    """

    store: SpoolStore
    cutoff: float
    batch: int = 500
    max_scan: int = 5000
    states: tuple[JobState, ...] = TERMINAL
    _entries: Iterator[os.DirEntry[str]] | None = field(init=False, default=None)
    _lock_fd: int | None = field(init=False, default=None)

    def begin(self) -> bool:
        """Take the pass lock; False if another pass (another daemon) holds it."""
        path = self.store.directory.child("locks").child(PRUNE_LOCK).path
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        self._lock_fd = fd
        self._entries = self._scan()
        return True

    def end(self) -> None:
        """Release the pass lock (idempotent)."""
        fd, self._lock_fd = self._lock_fd, None
        entries, self._entries = self._entries, None
        if isinstance(entries, Generator):
            entries.close()  # closes the directory it was listing
        if fd is not None:
            os.close(fd)  # closing drops the flock

    def _scan(self) -> Iterator[os.DirEntry[str]]:
        for state in self.states:
            try:
                with os.scandir(self.store.directory.child(state.value).path) as entries:
                    yield from entries
            except FileNotFoundError:
                continue

    def step(self) -> PruneCounts:
        """Look at up to ``max_scan`` entries, removing up to ``batch`` old records."""
        if self._entries is None:
            raise RuntimeError("HistoryPrune.step before begin")
        removed = lost = scanned = 0
        for entry in self._entries:
            scanned += 1
            key = _history_key(entry.name)
            if key is not None:
                outcome = self._remove_if_old(key, entry)
                if outcome is True:
                    removed += 1
                elif outcome is None:
                    lost += 1
            if removed >= self.batch or scanned >= self.max_scan:
                return PruneCounts(removed, lost, False)
        return PruneCounts(removed, lost, True)

    def _remove_if_old(self, key: str, entry: os.DirEntry[str]) -> bool | None:
        """Remove the record if it is old: True; False if young; None if gone."""
        try:
            if entry.stat(follow_symlinks=False).st_mtime >= self.cutoff:
                return False
        except OSError as e:
            if gone(e):
                return None
            raise
        # Under the key's stripe lock, as every transition of the key: look again (a
        # retry may have removed it), then unlink.
        with self.store._locked([key]):
            try:
                if os.lstat(entry.path).st_mtime >= self.cutoff:
                    return False
                os.unlink(entry.path)
            except OSError as e:
                if gone(e):
                    return None
                raise
        return True


def prune_history(
    store: SpoolStore, cutoff: float, batch: int = 500, max_scan: int = 5000
) -> PruneCounts | None:
    """Run a whole pass at once (blocking); None if another pass holds the lock."""
    prune = HistoryPrune(store, cutoff, batch, max_scan)
    if not prune.begin():
        return None
    total = PruneCounts()
    try:
        while not total.finished:
            total = total + prune.step()
    finally:
        prune.end()
    return total


RunBlocking = Callable[..., Deferred[Any]]


def _at_once(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
    """Run ``f`` now, in this thread (tests with ``task.Clock``)."""
    try:
        return succeed(f(*args))
    except Exception:
        d: Deferred[Any] = Deferred()
        d.errback(Failure())
        return d


@define(eq=False)
class Retention(Service):
    """The daemon's periodic history prune (see the module docstring).

    Collaborators: the open ``store`` (the spool service's), the ``clock`` whose
    ``callLater`` schedules passes and pauses, ``wall_clock`` (record mtimes are
    wall-clock times), and ``run_blocking`` (each step runs there: the reactor's
    thread pool in the daemon; by default at once, for tests).
    """

    store: SpoolStore
    clock: IReactorTime
    retention_days: float
    wall_clock: Callable[[], float]
    run_blocking: RunBlocking = _at_once
    interval: float = 3600.0
    #: Seconds the reactor gets between two steps of a pass.  A step of 100 removals
    #: takes about 3 ms, so a pass keeps a few per cent of a core (100 000 records in
    #: about a minute) and the front door keeps its pace (bench/prune.py).
    pause: float = 0.05
    batch: int = 100
    max_scan: int = 2000
    #: The counts of the last finished pass (None before the first).
    last: PruneCounts | None = field(init=False, default=None)
    #: Files in ``corrupt/`` at the last pass.
    corrupt: int = field(init=False, default=0)
    _loop: LoopingCall | None = field(init=False, default=None)
    _pass: Deferred[Any] | None = field(init=False, default=None)
    _stopping: bool = field(init=False, default=False)

    def startService(self) -> None:
        """Start passes: the first one interval after the start (not in its rush)."""
        Service.startService(self)
        self._stopping = False
        self._loop = LoopingCall(self._run_safely)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=False)

    def stopService(self) -> Deferred[None]:
        """Stop; fires once a pass in progress has finished its current step."""
        Service.stopService(self)
        self._stopping = True
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        if self._pass is None:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._pass.addBoth(lambda _: waiter.callback(None))
        return waiter

    def _run_safely(self) -> Deferred[Any]:
        # A LoopingCall stops on its first error: log everything here.
        d = Deferred.fromCoroutine(self.run_pass())
        self._pass = d

        def done(result: Any) -> None:
            self._pass = None
            if isinstance(result, Failure):
                log.failure(
                    "history prune of {path} failed", result, path=self.store.directory.path
                )

        d.addBoth(done)
        return d

    async def run_pass(self) -> PruneCounts | None:
        """One pass now: prune, count ``corrupt/``; None if another daemon prunes."""
        self.corrupt = await self.run_blocking(corrupt_count, self.store)
        if self.corrupt:
            log.warn(
                "spool {path} has {count} quarantined records in corrupt/ (kept, not "
                "pruned): look at them, then delete them",
                path=self.store.directory.path,
                count=self.corrupt,
            )
        cutoff = self.wall_clock() - self.retention_days * _DAY
        prune = HistoryPrune(self.store, cutoff, self.batch, self.max_scan)
        if not await self.run_blocking(prune.begin):
            log.debug(
                "history prune: another daemon is pruning {path}", path=self.store.directory.path
            )
            return None
        log.info(
            "pruning history records of {path} older than {days} days",
            path=self.store.directory.path,
            days=self.retention_days,
        )
        total = PruneCounts()
        try:
            while not self._stopping:
                total = total + await self.run_blocking(prune.step)
                if total.finished or self._stopping:
                    break
                await deferLater(self.clock, self.pause, lambda: None)
        finally:
            await self.run_blocking(prune.end)
        self.last = total
        if total.removed or total.gone:
            log.info(
                "pruned {removed} history records older than {days} days ({gone} removed "
                "by others meanwhile)",
                removed=total.removed,
                gone=total.gone,
                days=self.retention_days,
            )
        return total


__all__ = [
    "PRUNE_LOCK",
    "HistoryPrune",
    "PruneCounts",
    "Retention",
    "corrupt_count",
    "prune_history",
]
