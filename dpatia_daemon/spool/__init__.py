"""The durable job spool: every accepted request, on disk before it is acknowledged.

The spool owns the life of a :class:`~dpatia_daemon.jobs.Job` from acceptance to its end:
``add`` (QUEUED) → ``claim`` (RUNNING, held by one daemon) → ``finish`` (DONE, FAILED,
CANCELLED) or ``release``/``recover`` (back to QUEUED).  :class:`ISpool` is the interface;
:class:`DirectorySpool` is the real one, :class:`MemorySpool` the in-memory stand-in for
unit tests of other modules.  Both pass one shared contract test suite.

Semantics worth knowing
-----------------------
* **One queued job per key.**  A second request for a key that is already queued is merged
  into the queued job (:meth:`Job.merged_with`: newest token wins, queue position kept).
* **A re-request while running is honoured, not dropped.**  If the key is RUNNING, a new
  request becomes a new QUEUED job that runs after the running one (the slide may have
  been re-imported, or the user wants a fresh answer); ``claim`` refuses it while the
  first still runs, so one key never has two analyses at once.
* **Release merges.**  When a running job R is released while a newer job Q for the same
  key is queued, one queued job remains: Q's record (its ``job_id`` and file) survives,
  carrying R's queue position (``created``), the newest callback/token (Q's), and the
  larger attempt count.  Q survives because its id is the one the outside world may still
  use (the HTTP layer got it from ``add``; another daemon may be about to ``claim`` it),
  while R's id was only known to its holder, which is letting go of it; and replacing
  Q's file in place is one atomic rename.
* **Cancellation.**  ``cancel`` stops a QUEUED job at once.  ``request_cancel`` leaves a
  durable marker for a RUNNING job's holder; if the job turns out to be QUEUED (it was
  released meanwhile) it is cancelled at once instead, so the request is never lost in
  the race.  A held job whose cancellation was requested is CANCELLED, not requeued, by
  ``release`` and by ``recover``.
* **Crashes.**  ``recover`` (at start and in every sweep) puts each RUNNING job whose
  holder process died back to QUEUED with ``attempts + 1``: the crash may have been
  caused by the job, and the attempt count is what lets the supervisor give up on it.
* **Stopping.**  ``stopService`` waits for in-flight commits and operations, then drops
  (does not finish) the run locks of jobs still held.  The supervisor is expected to
  release its jobs before the spool stops; jobs it did not release stay RUNNING and the
  next ``recover`` (here after a restart, or by another daemon's sweep at once) requeues
  them with an attempt counted.

On-disk layout (``DirectorySpool``)
-----------------------------------
::

    queued/<key>.json               at most one queued job per key
    running/<key>.json              at most one running job per key
    done|failed|cancelled/<key>.<job_id>.json   history, several per key
    locks/<kk>.lock                 stripe lock for every key starting with hex <kk>
    locks/<key>.run                 held (flock LOCK_EX) by the claimer for the whole run
    cancel/<job_id>                 "please stop this running job"; contains its key
    tmp/<host>.<pid>.<rand>.tmp     temp files (same filesystem, so rename is atomic)
    corrupt/                        unparsable records moved aside (never deleted)

Why this shape:

* Files are named by key, so de-duplication, claim and every transition open a known
  path; only listings (``queued``, ``find``, the sweep) read directories.  The directory
  a record is in *is* its state (the ``state`` inside the JSON is informational), which
  makes ``claim`` one atomic rename and ``finish``/``cancel`` an atomic rename followed by
  an in-place rewrite of the error text.
* New queued records are created with ``link(tmp, dest)``, which fails atomically on the
  server if ``dest`` exists, so a stale client cache (NFS negative lookups) can never make
  an add or release silently overwrite another daemon's queued job; filesystems without
  hard links fall back to check-then-rename under the key lock.
* Key locks are striped over 256 files (``locks/00.lock`` … ``ff.lock``) instead of one
  per key: they are held for milliseconds, so sharing a stripe costs nothing, while a
  per-key lock file would be a new file for every slide ever seen and could never be
  deleted safely (a deleted-and-recreated lock file lets two processes "hold" it).  Run
  lock files are per key and are deleted when the run ends: every open and unlink of
  them happens under the key's stripe lock, so nobody can lock an orphaned inode.

Locking protocol
----------------
* Every transition of a key's files (and ``recover``'s test of a run lock) happens under
  the key's stripe lock: an in-process mutex plus ``flock(LOCK_EX)`` on the stripe file.
  A batch takes its stripes in sorted order, so processes never deadlock.
* ``claim`` takes ``locks/<key>.run`` with ``LOCK_EX | LOCK_NB`` *before* renaming the
  job into ``running/``, so a sweeper never sees a running job that is not held.  The
  lock lives as long as the holder's open file: when the process dies, the kernel (or
  the NFS server, after the client's lease expires) drops it, and ``recover`` notices by
  getting ``LOCK_EX | LOCK_NB`` itself.
* NFS emulates flock with POSIX record locks, which belong to the *process*: a second
  lock by the same process always succeeds, and closing *any* descriptor of the file
  drops them all.  So every lock a process holds on one spool directory lives in one
  process-wide table shared by all its stores (:class:`_LockTable`): stripe mutexes keep
  its own threads apart, and a run lock the process holds is never tested or re-opened.
* Mount NFS shares with ``lookupcache=positive`` (or ``none``): a cached negative lookup
  could hide another daemon's fresh file for up to the attribute-cache timeout.  Each
  daemon needs a unique host name (it names temp files, see ``_clean_tmp``).

Durability
----------
Every record is written to ``tmp/``, fsynced, and renamed (or linked) into place, and
the target directory is fsynced before the operation reports success.  ``add`` uses
group commit: adds that arrive while a commit is in flight form the next batch, whose
temp files are written and fsynced in parallel, linked into ``queued/`` together, and
made durable by ONE fsync of ``queued/``.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import socket
import stat
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import attrs
from attrs import define, field
from twisted.application.service import IService, Service
from twisted.internet import threads
from twisted.internet.defer import Deferred, DeferredLock, fail, gatherResults, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.python.threadpool import ThreadPool
from zope.interface import Interface, implementer

from ..jobs import Job, JobState

log = Logger()

__all__ = [
    "ISpool",
    "DirectorySpool",
    "MemorySpool",
    "SpoolStore",
    "SpoolError",
    "JobMoved",
    "JobChanged",
    "NotHeld",
    "SpoolNotRunning",
]

_ACTIVE: frozenset[JobState] = frozenset({JobState.QUEUED, JobState.RUNNING})
# Lookups read states in the order jobs move through them, so a job moving forward
# while we look is found in the later state.
_FORWARD: tuple[JobState, ...] = (JobState.QUEUED, JobState.RUNNING)
_TERMINAL: tuple[JobState, ...] = (JobState.DONE, JobState.FAILED, JobState.CANCELLED)
_HEX = re.compile(r"[0-9a-f]{2,64}\Z")
_ACTIVE_NAME = re.compile(r"([0-9a-f]{2,64})\.json\Z")
_HISTORY_NAME = re.compile(r"([0-9a-f]{2,64})\.([0-9a-f]{2,64})\.json\Z")
_DIR_MODE = 0o700
_FILE_MODE = 0o600
# A temp file lives for milliseconds; one this old belongs to a crashed writer.
_TMP_MAX_AGE = 3600.0
# job_id → key hints; bounded so a daemon running for years does not grow without end.
_HINTS_MAX = 65536


# --- errors ---------------------------------------------------------------------------


class SpoolError(Exception):
    """Base class of the spool's own errors."""


class JobMoved(SpoolError):
    """The job is no longer in the state the caller thought (e.g. claimed meanwhile)."""


class JobChanged(JobMoved):
    """A queued job was changed by someone else (a merge) since the caller read it.

    Re-read it with ``get`` and apply the change again; writing the stale copy would
    throw away the newer request's callback token.
    """


class NotHeld(SpoolError):
    """The job is RUNNING but not held by this spool instance (or not running at all)."""


class SpoolNotRunning(SpoolError):
    """The spool service is not running (not started yet, or stopped)."""


def _check_id(value: object, what: str = "job id") -> str:
    """Return ``value`` if it is a lowercase hex id safe as a path segment; else ValueError."""
    if not isinstance(value, str) or not _HEX.match(value):
        raise ValueError(f"invalid {what}: {value!r}")
    return value


def _check_job(job: Job) -> None:
    """Validate the parts of ``job`` that become path segments."""
    _check_id(job.job_id)
    _check_id(job.key, "job key")


# --- the interface --------------------------------------------------------------------


class ISpool(Interface):
    """A durable job spool.  Every method returns a Deferred firing in the reactor thread."""

    def add(job: Job) -> Deferred[Job]:
        """Persist a new QUEUED job durably, merging into a queued job with the same key.

        Fires with the stored job (the merged one, keeping the existing job id, if a job
        with ``job.key`` was already queued).
        """

    def get(job_id: str) -> Deferred[Job | None]:
        """Return the job with ``job_id`` in any state, or None."""

    def find(
        *,
        slide_id: str | None = None,
        result_id: int | None = None,
        cancellation_token: str | None = None,
        states: frozenset[JobState] = _ACTIVE,
    ) -> Deferred[list[Job]]:
        """Return the jobs in ``states`` matching every given criterion."""

    def queued() -> Deferred[list[Job]]:
        """Return all QUEUED jobs in dispatch order (:meth:`Job.sort_key`)."""

    def update(job: Job) -> Deferred[Job]:
        """Rewrite a QUEUED or RUNNING job's record durably.

        Fails with :class:`JobMoved` if the job is no longer in ``job.state``, with
        :class:`JobChanged` if a queued job was merged meanwhile, and with
        :class:`NotHeld` for a RUNNING job this spool does not hold.
        """

    def claim(job_id: str) -> Deferred[Job | None]:
        """Move a QUEUED job to RUNNING, held by this spool; None if not possible.

        None if the job is gone, claimed by someone else, or another job with the same
        key is running.
        """

    def finish(job_id: str, state: JobState, error: str | None = None) -> Deferred[Job]:
        """End a held RUNNING job as DONE, FAILED or CANCELLED with ``last_error``."""

    def release(job_id: str, *, count_attempt: bool, error: str | None = None) -> Deferred[Job]:
        """Put a held RUNNING job back to QUEUED (merging with a newer queued job).

        A job whose cancellation was requested is CANCELLED instead.
        """

    def cancel(job_id: str, reason: str = "cancelled") -> Deferred[Job | None]:
        """Cancel a QUEUED job; None if it is not queued any more."""

    def request_cancel(job_id: str) -> Deferred[None]:
        """Ask the holder of a RUNNING job to stop it (a QUEUED job is cancelled at once)."""

    def cancel_requested(job_id: str) -> Deferred[bool]:
        """Return whether a cancellation of ``job_id`` was requested."""

    def recover() -> Deferred[list[Job]]:
        """Requeue (attempts + 1) every RUNNING job whose holder process is dead."""

    def watch(callback: Callable[[Job], None]) -> Callable[[], None]:
        """Call ``callback(job)`` whenever a job becomes QUEUED; return an unsubscribe."""

    def counts() -> Deferred[dict[JobState, int]]:
        """Return the number of jobs in each state."""


# --- pure transitions shared by both implementations ----------------------------------


def _requeued(job: Job, *, count_attempt: bool, error: str | None) -> Job:
    """Return ``job`` back in the queue, one attempt more if ``count_attempt``."""
    return attrs.evolve(
        job,
        state=JobState.QUEUED,
        attempts=job.attempts + (1 if count_attempt else 0),
        last_error=error if error is not None else job.last_error,
    )


def _merge_added(existing: Job, incoming: Job) -> Job:
    """Fold a newly added request into the queued job for its key (existing id kept)."""
    return attrs.evolve(existing.merged_with(incoming), state=JobState.QUEUED)


def _merge_released(released: Job, newer: Job) -> Job:
    """Fold a released running job into the newer queued job for its key.

    The newer job's record (its id) survives; see the module docstring for why.  The
    released job's queue position and error are kept, the newer request's callback and
    token win (``merged_with``), and the larger attempt count is kept.
    """
    return attrs.evolve(
        released.merged_with(newer),
        job_id=newer.job_id,
        attempts=max(released.attempts, newer.attempts),
        created=min(released.created, newer.created),
        state=JobState.QUEUED,
    )


def _merge_released_into(queued: Job, released: Job) -> Job:
    """:func:`_merge_released` with ``_enqueue``'s argument order (existing, incoming)."""
    return _merge_released(released, queued)


def _conflicts(stored: Job, proposed: Job) -> bool:
    """Return whether ``stored`` was changed by a merge since ``proposed`` was read.

    ``update`` may change a job's result id, image info, context and error; the fields
    compared here are the ones only merges, releases and recovery change.
    """
    return (
        stored.callback != proposed.callback
        or stored.cancellation_token != proposed.cancellation_token
        or stored.updated != proposed.updated
        or stored.created != proposed.created
        or stored.priority != proposed.priority
        or stored.kind != proposed.kind
        or stored.attempts != proposed.attempts
    )


def _matches(
    job: Job,
    slide_id: str | None,
    result_id: int | None,
    cancellation_token: str | None,
) -> bool:
    """Return whether ``job`` matches every given ``find`` criterion."""
    return (
        (slide_id is None or job.slide_id == slide_id)
        and (result_id is None or job.result_id == result_id)
        and (cancellation_token is None or job.cancellation_token == cancellation_token)
    )


# --- process-wide locks ---------------------------------------------------------------


@define(eq=False)
class _LockTable:
    """Every lock this process holds on one spool directory, shared by all its stores.

    NFS turns flock into POSIX locks, which are per process: two stores (or threads) of
    one process would not exclude each other through the file lock, and closing any
    descriptor of a lock file drops the process's lock on it.  So stripe locks are an
    in-process mutex around one long-lived descriptor per stripe, and held run locks are
    recorded here so that no store of this process ever tests or re-opens them.
    """

    locks_dir: FilePath[str]
    guard: threading.Lock = field(factory=threading.Lock)
    mutexes: dict[str, threading.Lock] = field(factory=dict)
    stripe_fds: dict[str, int] = field(factory=dict)
    runs: dict[str, int] = field(factory=dict)
    users: int = 0

    def acquire(self, stripe: str) -> None:
        """Take the stripe lock (mutex, then flock); blocks."""
        with self.guard:
            mutex = self.mutexes.setdefault(stripe, threading.Lock())
        mutex.acquire()
        try:
            fd = self.stripe_fds.get(stripe)
            if fd is None:
                path = self.locks_dir.child(f"{stripe}.lock").path
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, _FILE_MODE)
                self.stripe_fds[stripe] = fd
            fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            mutex.release()
            raise

    def release(self, stripe: str) -> None:
        """Drop the stripe lock taken by :meth:`acquire`."""
        try:
            fcntl.flock(self.stripe_fds[stripe], fcntl.LOCK_UN)
        finally:
            self.mutexes[stripe].release()

    def close(self) -> None:
        """Close the stripe descriptors (the last store of this directory is closing)."""
        for fd in self.stripe_fds.values():
            os.close(fd)
        self.stripe_fds.clear()


_TABLES: dict[str, _LockTable] = {}
_TABLES_GUARD = threading.Lock()


def _attach_table(directory: FilePath[str]) -> tuple[str, _LockTable]:
    """Return the process's lock table for ``directory`` (by real path), counting a user."""
    real = os.path.realpath(directory.path)
    with _TABLES_GUARD:
        table = _TABLES.get(real)
        if table is None:
            table = _TABLES[real] = _LockTable(FilePath(real).child("locks"))
        table.users += 1
    return real, table


def _detach_table(real: str) -> None:
    """Forget one user of the lock table of ``real``; close it after the last one."""
    with _TABLES_GUARD:
        table = _TABLES[real]
        table.users -= 1
        if table.users == 0:
            del _TABLES[real]
            table.close()


def _host_tag() -> str:
    """Return this host's name reduced to characters safe in a temp file name."""
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"


def _pid_alive(pid: int) -> bool:
    """Return whether a process with ``pid`` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _default_owner() -> str:
    """Return ``host:pid``, naming this process in logs."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _gone(e: OSError) -> bool:
    """Return whether ``e`` means the file is not there (ESTALE: deleted on an NFS server)."""
    return e.errno in (errno.ENOENT, errno.ESTALE)


# --- the synchronous core -------------------------------------------------------------


@define(eq=False)
class SpoolStore:
    """The spool directory itself: plain blocking methods, no Twisted, thread-safe.

    :class:`DirectorySpool` calls it in its thread pool; tests and helper processes use
    it directly.  One store is one *holder*: the jobs it claims are its own until it
    finishes or releases them (or :meth:`close` abandons them).  ``fsync`` is injectable
    and ``dir_fsyncs``/``file_fsyncs`` count calls, so tests can see group commit work.
    """

    directory: FilePath[str]
    owner: str = field(factory=_default_owner)
    fsync: Callable[[int], None] = os.fsync
    dir_fsyncs: int = field(init=False, default=0)
    file_fsyncs: int = field(init=False, default=0)
    _held: dict[str, str] = field(init=False, factory=dict)  # job_id → key
    _hints: OrderedDict[str, str] = field(init=False, factory=OrderedDict)
    _cache: dict[str, dict[str, tuple[tuple[int, int, int], Job]]] = field(init=False, factory=dict)
    _reported: set[tuple[str, int]] = field(init=False, factory=set)
    _lock: threading.Lock = field(init=False, factory=threading.Lock)
    _table: _LockTable | None = field(init=False, default=None)
    _real: str | None = field(init=False, default=None)
    _tmp_prefix: str = field(init=False, factory=lambda: f"{_host_tag()}.{os.getpid()}")
    _dir_fsync_ok: bool = field(init=False, default=True)

    # -- setup ---------------------------------------------------------------------

    def open(self, now: float | None = None) -> None:
        """Create (or tighten) the directory tree, attach the locks, clean stale temp files."""
        if self._table is not None:
            return
        # Parents a fresh install lacks (var/ under the working directory) are created
        # private too; an existing parent is left as it is.
        os.makedirs(self.directory.parent().path, _DIR_MODE, exist_ok=True)
        for d in [self.directory, *(self._sub(n) for n in self._subdirs())]:
            self._make_private_dir(d)
        self._real, self._table = _attach_table(self.directory)
        self._clean_tmp(now)

    def close(self) -> None:
        """Detach; jobs still held are abandoned (their run locks dropped, files kept).

        They stay RUNNING with no live holder, so the next ``recover`` (anyone's)
        requeues them with an attempt counted.
        """
        if self._table is None or self._real is None:
            return
        with self._lock:
            held = list(self._held.items())
            self._held.clear()
        for job_id, key in held:
            log.warn(
                "spool closing while job {job_id} (key {key}) is still held; "
                "it will be recovered with an attempt counted",
                job_id=job_id,
                key=key,
                owner=self.owner,
            )
            fd = self._table.runs.pop(key, None)
            if fd is not None:
                os.close(fd)
        _detach_table(self._real)
        self._table = None

    @staticmethod
    def _subdirs() -> list[str]:
        return [s.value for s in JobState] + ["locks", "cancel", "tmp", "corrupt"]

    def _sub(self, name: str) -> FilePath[str]:
        return self.directory.child(name)

    def _make_private_dir(self, d: FilePath[str]) -> None:
        """Create ``d`` as 0700, or tighten it if group or others may access it."""
        try:
            os.mkdir(d.path, _DIR_MODE)
        except FileExistsError:
            pass
        else:
            # mkdir's mode is filtered by the umask; set it exactly.
            os.chmod(d.path, _DIR_MODE)
            return
        mode = stat.S_IMODE(os.stat(d.path).st_mode)
        if mode & 0o077:
            log.warn(
                "spool directory {path} was accessible to group or others (mode {mode}); "
                "tightening it to 0700",
                path=d.path,
                mode=oct(mode),
            )
            try:
                os.chmod(d.path, mode & _DIR_MODE)
            except OSError as e:
                # Some SMB mounts fix permissions in mount options; say so loudly but run.
                log.error(
                    "could not tighten {path}: {error}; job files hold callback tokens",
                    path=d.path,
                    error=str(e),
                )

    def _tables(self) -> _LockTable:
        if self._table is None:
            raise SpoolError(f"spool store {self.directory.path} is not open")
        return self._table

    # -- paths ---------------------------------------------------------------------

    def _active_path(self, state: JobState, key: str) -> FilePath[str]:
        return self._sub(state.value).child(f"{key}.json")

    def _history_path(self, state: JobState, key: str, job_id: str) -> FilePath[str]:
        return self._sub(state.value).child(f"{key}.{job_id}.json")

    def _run_path(self, key: str) -> FilePath[str]:
        return self._sub("locks").child(f"{key}.run")

    def _marker_path(self, job_id: str) -> FilePath[str]:
        return self._sub("cancel").child(job_id)

    # -- low-level I/O -------------------------------------------------------------

    def _fsync_file(self, fd: int) -> None:
        self.fsync(fd)
        with self._lock:
            self.file_fsyncs += 1

    def _fsync_dir(self, d: FilePath[str]) -> None:
        """Make renames/links/unlinks in ``d`` durable."""
        with self._lock:
            self.dir_fsyncs += 1
        fd = os.open(d.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            self.fsync(fd)
        except OSError as e:
            # Some network filesystems refuse fsync on a directory; their metadata
            # operations are synchronous on the server anyway.
            if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
            if self._dir_fsync_ok:
                self._dir_fsync_ok = False
                log.warn(
                    "the filesystem of {path} cannot fsync directories ({error}); "
                    "relying on the server for metadata durability",
                    path=d.path,
                    error=str(e),
                )
        finally:
            os.close(fd)

    def _write_bytes(self, data: bytes) -> FilePath[str]:
        """Write ``data`` to a new fsynced 0600 temp file and return its path."""
        path = self._sub("tmp").child(f"{self._tmp_prefix}.{uuid.uuid4().hex}.tmp")
        fd = os.open(path.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, _FILE_MODE)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            self._fsync_file(fd)
        except BaseException:
            os.close(fd)
            self._unlink(path)
            raise
        os.close(fd)
        return path

    def _write_temp(self, job: Job) -> FilePath[str]:
        return self._write_bytes(job.to_json())

    @staticmethod
    def _unlink(path: FilePath[str]) -> None:
        try:
            os.unlink(path.path)
        except OSError as e:
            if not _gone(e):
                raise

    def _link_new(self, tmp: FilePath[str], dest: FilePath[str]) -> bool:
        """Install ``tmp`` as ``dest`` only if ``dest`` does not exist; consume ``tmp``.

        Returns False (``tmp`` kept) if ``dest`` exists.  ``link`` is checked by the
        server, so a stale client cache cannot make us overwrite someone's record.
        """
        try:
            os.link(tmp.path, dest.path)
        except FileExistsError:
            return False
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            # No hard links here (some SMB servers): check, then rename, under the key
            # lock.  Only a stale negative lookup cache could defeat this.
            if os.path.lexists(dest.path):
                return False
            os.rename(tmp.path, dest.path)
            return True
        self._unlink(tmp)
        return True

    def _decode(self, data: bytes, state: JobState, name: str) -> Job:
        """Parse the record in file ``name``; ValueError if it does not belong there."""
        job = Job.from_json(data)
        # A record's ids become paths in later transitions: never trust a file for them.
        _check_job(job)
        if not name.startswith(f"{job.key}."):
            raise ValueError(f"record of key {job.key} found in {name}")
        self._remember(job)
        return job if job.state is state else attrs.evolve(job, state=state)

    def _read(self, path: FilePath[str], state: JobState) -> Job | None:
        """Read the record at ``path`` (under its key lock); quarantine it if corrupt."""
        try:
            data = path.getContent()
        except OSError as e:
            if _gone(e):
                return None
            raise
        try:
            return self._decode(data, state, path.basename())
        except Exception:
            self._quarantine(path, state)
            return None

    def _quarantine(self, path: FilePath[str], state: JobState) -> None:
        """Move an unparsable record (we hold its key lock) to ``corrupt/``, keeping it."""
        target = self._sub("corrupt").child(f"{state.value}.{path.basename()}.{uuid.uuid4().hex}")
        log.failure(
            "spool record {path} cannot be parsed; moved to {target}",
            path=path.path,
            target=target.path,
        )
        os.rename(path.path, target.path)

    def _remember(self, job: Job) -> None:
        self.remember(job.job_id, job.key)

    def remember(self, job_id: str, key: str) -> None:
        """Remember which key ``job_id`` belongs to (keys never change): lookups by id
        then read its files instead of listing directories."""
        with self._lock:
            self._hints[job_id] = key
            self._hints.move_to_end(job_id)
            while len(self._hints) > _HINTS_MAX:
                self._hints.popitem(last=False)

    def _hint(self, job_id: str) -> str | None:
        with self._lock:
            return self._hints.get(job_id)

    @contextmanager
    def _locked(self, keys: Iterable[str]) -> Iterator[None]:
        """Hold the stripe locks of ``keys``, taken in sorted order (deadlock-free)."""
        table = self._tables()
        taken: list[str] = []
        try:
            for stripe in sorted({k[:2] for k in keys}):
                table.acquire(stripe)
                taken.append(stripe)
            yield
        finally:
            for stripe in reversed(taken):
                table.release(stripe)

    def _take_run_lock(self, key: str) -> bool:
        """Try to take the run lock of ``key`` (under its key lock); False if held."""
        table = self._tables()
        if key in table.runs:
            # Held by this process: never open it again (closing would drop the lock).
            return False
        # Python descriptors are close-on-exec: spawned workers do not inherit the
        # lock and keep it alive after we die.
        fd = os.open(self._run_path(key).path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, _FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        table.runs[key] = fd
        return True

    def _drop_run_lock(self, key: str) -> None:
        """Delete and unlock the run lock of ``key`` (under its key lock)."""
        fd = self._tables().runs.pop(key)
        try:
            self._unlink(self._run_path(key))
        finally:
            os.close(fd)

    # -- listings ------------------------------------------------------------------

    def _names(self, state: JobState) -> list[str]:
        try:
            return os.listdir(self._sub(state.value).path)
        except FileNotFoundError:
            return []

    def _listing(self, state: JobState) -> list[Job]:
        """Read every record in ``state``'s directory (cached by inode/mtime/size)."""
        d = self._sub(state.value)
        pattern = _ACTIVE_NAME if state in _ACTIVE else _HISTORY_NAME
        old = self._cache.get(state.value, {})
        new: dict[str, tuple[tuple[int, int, int], Job]] = {}
        try:
            entries = list(os.scandir(d.path))
        except FileNotFoundError:
            entries = []
        for entry in entries:
            if not pattern.match(entry.name):
                continue  # e.g. NFS ".nfs..." silly-rename files
            try:
                st = entry.stat()
                sig = (st.st_ino, st.st_mtime_ns, st.st_size)
                cached = old.get(entry.name)
                if cached is not None and cached[0] == sig:
                    new[entry.name] = cached
                    continue
                with open(entry.path, "rb") as f:
                    data = f.read()
            except OSError as e:
                if _gone(e):
                    continue  # claimed or finished while we listed
                raise
            try:
                job = self._decode(data, state, entry.name)
            except Exception:
                # Not moved here: we do not hold its lock, and a listing must not touch
                # records.  The next transition of the key quarantines it.
                if (entry.path, sig[0]) not in self._reported:
                    self._reported.add((entry.path, sig[0]))
                    log.failure("spool record {path} cannot be parsed; skipped", path=entry.path)
                continue
            new[entry.name] = (sig, job)
        self._cache[state.value] = new
        return [job for _, job in new.values()]

    def queued(self) -> list[Job]:
        """Return all QUEUED jobs in dispatch order."""
        return sorted(self._listing(JobState.QUEUED), key=Job.sort_key)

    def find(
        self,
        *,
        slide_id: str | None = None,
        result_id: int | None = None,
        cancellation_token: str | None = None,
        states: Iterable[JobState] = _ACTIVE,
    ) -> list[Job]:
        """Return the jobs in ``states`` matching every given criterion."""
        return [
            job
            for state in JobState
            if state in frozenset(states)
            for job in self._listing(state)
            if _matches(job, slide_id, result_id, cancellation_token)
        ]

    def counts(self) -> dict[JobState, int]:
        """Return the number of records in each state (a directory listing each)."""
        out: dict[JobState, int] = {}
        for state in JobState:
            pattern = _ACTIVE_NAME if state in _ACTIVE else _HISTORY_NAME
            out[state] = sum(1 for n in self._names(state) if pattern.match(n))
        return out

    def get(self, job_id: str) -> Job | None:
        """Return the job with ``job_id`` in any state, or None."""
        _check_id(job_id)
        key = self._hint(job_id)
        if key is not None:
            for state in _FORWARD:
                job = self._read_plain(self._active_path(state, key), state)
                if job is not None and job.job_id == job_id:
                    return job
            for state in _TERMINAL:
                job = self._read_plain(self._history_path(state, key, job_id), state)
                if job is not None:
                    return job
            return None
        # No hint (another daemon's job, or a restart): scan the active records, then
        # look for the history file by name.
        for state in _FORWARD:
            for job in self._listing(state):
                if job.job_id == job_id:
                    return job
        suffix = f".{job_id}.json"
        for state in _TERMINAL:
            for name in self._names(state):
                if name.endswith(suffix) and _HISTORY_NAME.match(name):
                    job = self._read_plain(self._sub(state.value).child(name), state)
                    if job is not None:
                        return job
        return None

    def _read_plain(self, path: FilePath[str], state: JobState) -> Job | None:
        """Read a record without holding its lock; None if absent or unparsable."""
        try:
            return self._decode(path.getContent(), state, path.basename())
        except OSError as e:
            if _gone(e):
                return None
            raise
        except Exception:
            log.failure("spool record {path} cannot be parsed; skipped", path=path.path)
            return None

    def _key_of(self, job_id: str, state: JobState) -> str | None:
        """Return the key of ``job_id`` if known or found among ``state``'s records."""
        key = self._hint(job_id)
        if key is not None:
            return key
        for job in self._listing(state):
            if job.job_id == job_id:
                return job.key
        return None

    # -- add (group commit) ----------------------------------------------------------

    def write_temps(self, jobs: list[Job]) -> list[FilePath[str] | BaseException]:
        """Write and fsync one temp file per job; per-job errors are returned, not raised."""
        out: list[FilePath[str] | BaseException] = []
        for job in jobs:
            try:
                out.append(self._write_temp(attrs.evolve(job, state=JobState.QUEUED)))
            except Exception as e:
                out.append(e)
        return out

    def commit_batch(
        self, jobs: list[Job], temps: list[FilePath[str] | BaseException]
    ) -> list[Job | BaseException]:
        """Install a batch of new queued jobs (merging per key) with ONE directory fsync.

        ``temps`` come from :meth:`write_temps`.  Jobs are installed in order, so a later
        request for a key merges into an earlier one of the same batch.  Per-job errors
        are returned; a failed directory fsync raises (nothing is known to be durable).
        """
        results: list[Job | BaseException] = []
        try:
            with self._locked(job.key for job in jobs):
                for job, tmp in zip(jobs, temps, strict=True):
                    if isinstance(tmp, BaseException):
                        results.append(tmp)
                        continue
                    try:
                        results.append(self._enqueue(job, tmp, _merge_added))
                    except Exception as e:
                        self._unlink(tmp)
                        results.append(e)
                if any(isinstance(r, Job) for r in results):
                    self._fsync_dir(self._sub("queued"))
        except BaseException:
            for tmp in temps[len(results) :]:
                if not isinstance(tmp, BaseException):
                    self._unlink(tmp)
            raise
        # No log line per job here: the front door logs each acceptance, and a line
        # per job costs more CPU than the commit itself.
        return results

    def add(self, job: Job) -> Job:
        """Add one job durably (a batch of one); return the stored job."""
        _check_job(job)
        [tmp] = self.write_temps([job])
        [result] = self.commit_batch([job], [tmp])
        if isinstance(result, BaseException):
            raise result
        return result

    def _enqueue(
        self, job: Job, tmp: FilePath[str] | None, merge: Callable[[Job, Job], Job]
    ) -> Job:
        """Make ``job`` the queued job of its key, or merge it into the one there.

        Called under the key lock.  ``tmp`` (consumed) may already hold ``job``'s record.
        Does not fsync ``queued/``: the caller does, once.
        """
        dest = self._active_path(JobState.QUEUED, job.key)
        for _ in range(3):
            if tmp is None:
                tmp = self._write_temp(job)
            if self._link_new(tmp, dest):
                self._remember(job)
                return job
            existing = self._read(dest, JobState.QUEUED)
            if existing is None:
                continue  # vanished (a stale cache) or quarantined: create it again
            self._unlink(tmp)
            merged = merge(existing, job)
            merged_tmp = self._write_temp(merged)
            os.rename(merged_tmp.path, dest.path)
            return merged
        if tmp is not None:
            self._unlink(tmp)
        raise OSError(errno.EAGAIN, f"could not place {dest.path}")

    # -- transitions -----------------------------------------------------------------

    def claim(self, job_id: str) -> Job | None:
        """Move a QUEUED job to RUNNING, held by this store; None if not possible."""
        _check_id(job_id)
        key = self._key_of(job_id, JobState.QUEUED)
        if key is None:
            return None
        queued = self._active_path(JobState.QUEUED, key)
        running = self._active_path(JobState.RUNNING, key)
        with self._locked([key]):
            job = self._read(queued, JobState.QUEUED)
            if job is None or job.job_id != job_id:
                return None
            if os.path.lexists(running.path):
                return None  # one analysis per key at a time
            # The run lock first, so nobody ever sees an unheld running job.  It also
            # refuses the claim if our lookup cache hid a running record.
            if not self._take_run_lock(key):
                return None
            try:
                os.rename(queued.path, running.path)
            except BaseException:
                self._drop_run_lock(key)
                raise
            try:
                self._fsync_dir(self._sub("running"))
                self._fsync_dir(self._sub("queued"))
            except BaseException:
                # Not durable: put it back rather than report a claim that may vanish.
                try:
                    os.rename(running.path, queued.path)
                finally:
                    self._drop_run_lock(key)
                raise
            with self._lock:
                self._held[job_id] = key
        log.info("job {job_id} claimed by {owner}", job_id=job_id, key=key, owner=self.owner)
        return attrs.evolve(job, state=JobState.RUNNING)

    def _held_key(self, job_id: str) -> str:
        _check_id(job_id)
        with self._lock:
            key = self._held.get(job_id)
        if key is None:
            raise NotHeld(f"job {job_id} is not held by this spool")
        return key

    def _held_record(self, job_id: str, key: str) -> Job:
        job = self._read(self._active_path(JobState.RUNNING, key), JobState.RUNNING)
        if job is None or job.job_id != job_id:
            # Someone removed our running record (by hand?).  We no longer hold it.
            self._forget(job_id, key)
            raise NotHeld(f"job {job_id} is held but its running record is gone")
        return job

    def _forget(self, job_id: str, key: str) -> None:
        with self._lock:
            self._held.pop(job_id, None)
        self._drop_run_lock(key)

    def _end_running(self, job: Job, state: JobState, error: str | None) -> Job:
        """Move the running ``job`` (key lock held) into ``state``'s history."""
        final = attrs.evolve(job, state=state, last_error=error)
        running = self._active_path(JobState.RUNNING, job.key)
        target = self._history_path(state, job.key, job.job_id)
        # One atomic rename ends the run; the rewrite adds the error text and drops the
        # token (the caller still gets it back in ``final``).
        os.rename(running.path, target.path)
        tmp = self._write_temp(final.without_secret())
        os.rename(tmp.path, target.path)
        self._fsync_dir(self._sub(state.value))
        self._fsync_dir(self._sub("running"))
        self._unlink(self._marker_path(job.job_id))
        return final

    def finish(self, job_id: str, state: JobState, error: str | None = None) -> Job:
        """End a held RUNNING job as DONE, FAILED or CANCELLED."""
        if not state.terminal:
            raise ValueError(f"finish needs a terminal state, not {state.value}")
        key = self._held_key(job_id)
        with self._locked([key]):
            job = self._held_record(job_id, key)
            try:
                final = self._end_running(job, state, error)
            finally:
                if not os.path.lexists(self._active_path(JobState.RUNNING, key).path):
                    self._forget(job_id, key)
        log.info("job {job_id} {state}", job_id=job_id, key=key, state=state.value, error=error)
        return final

    def release(self, job_id: str, *, count_attempt: bool, error: str | None = None) -> Job:
        """Put a held RUNNING job back to QUEUED (or CANCELLED if that was requested)."""
        key = self._held_key(job_id)
        with self._locked([key]):
            job = self._held_record(job_id, key)
            try:
                result = self._requeue_locked(job, count_attempt=count_attempt, error=error)
            finally:
                if not os.path.lexists(self._active_path(JobState.RUNNING, key).path):
                    self._forget(job_id, key)
        log.info(
            "job {job_id} released ({state}, attempts {attempts})",
            job_id=job_id,
            key=key,
            state=result.state.value,
            attempts=result.attempts,
            error=error,
        )
        return result

    def _requeue_locked(self, job: Job, *, count_attempt: bool, error: str | None) -> Job:
        """Move the running ``job`` (run and key lock held) back to the queue."""
        if os.path.lexists(self._marker_path(job.job_id).path):
            return self._end_running(
                job, JobState.CANCELLED, error or "cancelled while it was running"
            )
        stored = self._enqueue(
            _requeued(job, count_attempt=count_attempt, error=error), None, _merge_released_into
        )
        self._fsync_dir(self._sub("queued"))
        # A crash here leaves both records; recover() then sees the queued copy and
        # only deletes the running one.
        self._unlink(self._active_path(JobState.RUNNING, job.key))
        self._fsync_dir(self._sub("running"))
        return stored

    def cancel(self, job_id: str, reason: str = "cancelled") -> Job | None:
        """Cancel a QUEUED job; None if it is not queued."""
        _check_id(job_id)
        key = self._key_of(job_id, JobState.QUEUED)
        if key is None:
            return None
        with self._locked([key]):
            result = self._cancel_locked(job_id, key, reason)
        if result is not None:
            log.info("job {job_id} cancelled: {reason}", job_id=job_id, key=key, reason=reason)
        return result

    def _cancel_locked(self, job_id: str, key: str, reason: str) -> Job | None:
        queued = self._active_path(JobState.QUEUED, key)
        job = self._read(queued, JobState.QUEUED)
        if job is None or job.job_id != job_id:
            return None
        final = attrs.evolve(job, state=JobState.CANCELLED, last_error=reason)
        target = self._history_path(JobState.CANCELLED, key, job_id)
        os.rename(queued.path, target.path)
        tmp = self._write_temp(final.without_secret())
        os.rename(tmp.path, target.path)
        self._fsync_dir(self._sub("cancelled"))
        self._fsync_dir(self._sub("queued"))
        return final

    def update(self, job: Job) -> Job:
        """Rewrite a QUEUED or RUNNING job's record durably (see :meth:`ISpool.update`)."""
        _check_job(job)
        if job.state not in _ACTIVE:
            raise ValueError(f"only queued or running jobs can be updated, not {job.state.value}")
        path = self._active_path(job.state, job.key)
        with self._locked([job.key]):
            if job.state is JobState.RUNNING:
                with self._lock:
                    held = self._held.get(job.job_id) == job.key
                if not held:
                    if self._read(path, JobState.RUNNING) is None:
                        raise JobMoved(f"job {job.job_id} is not running")
                    raise NotHeld(f"job {job.job_id} is not held by this spool")
            stored = self._read(path, job.state)
            if stored is None or stored.job_id != job.job_id:
                raise JobMoved(f"job {job.job_id} is no longer {job.state.value}")
            if job.state is JobState.QUEUED and _conflicts(stored, job):
                raise JobChanged(f"job {job.job_id} was changed meanwhile")
            tmp = self._write_temp(job)
            os.rename(tmp.path, path.path)
            self._fsync_dir(self._sub(job.state.value))
        return job

    # -- cancellation markers ------------------------------------------------------

    def request_cancel(self, job_id: str) -> None:
        """Mark a RUNNING job for cancellation; cancel a QUEUED one at once."""
        _check_id(job_id)
        key = self._hint(job_id)
        if key is None:
            for state in (JobState.RUNNING, JobState.QUEUED):
                key = self._key_of(job_id, state)
                if key is not None:
                    break
        if key is None:
            return
        with self._locked([key]):
            running = self._read(self._active_path(JobState.RUNNING, key), JobState.RUNNING)
            if running is not None and running.job_id == job_id:
                tmp = self._write_bytes(key.encode("ascii"))
                os.rename(tmp.path, self._marker_path(job_id).path)
                self._fsync_dir(self._sub("cancel"))
                log.info("cancellation of running job {job_id} requested", job_id=job_id, key=key)
                return
            cancelled = self._cancel_locked(job_id, key, "cancellation requested")
        if cancelled is not None:
            log.info("job {job_id} cancelled while queued", job_id=job_id, key=key)

    def cancel_requested(self, job_id: str) -> bool:
        """Return whether a cancellation of ``job_id`` was requested (and not yet acted on)."""
        _check_id(job_id)
        return os.path.lexists(self._marker_path(job_id).path)

    def _clean_markers(self) -> None:
        """Delete cancel markers whose job is not running (left by a crash)."""
        for name in os.listdir(self._sub("cancel").path):
            if not _HEX.match(name):
                continue
            marker = self._marker_path(name)
            try:
                key = marker.getContent().decode("ascii").strip()
            except (OSError, UnicodeDecodeError):
                continue
            if not _HEX.match(key):
                continue
            with self._locked([key]):
                running = self._read(self._active_path(JobState.RUNNING, key), JobState.RUNNING)
                if running is None or running.job_id != name:
                    self._unlink(marker)

    # -- recovery ------------------------------------------------------------------

    def recover(self) -> list[Job]:
        """Requeue (attempts + 1) every RUNNING job whose holder is dead; return them."""
        table = self._tables()
        out: list[Job] = []
        for name in self._names(JobState.RUNNING):
            m = _ACTIVE_NAME.match(name)
            if m is None:
                continue
            key = m.group(1)
            if key in table.runs:
                continue  # held by this process: alive, and we must not touch its lock
            with self._locked([key]):
                recovered = self._recover_locked(key)
            if recovered is not None:
                out.append(recovered)
        return out

    def _recover_locked(self, key: str) -> Job | None:
        running = self._active_path(JobState.RUNNING, key)
        job = self._read(running, JobState.RUNNING)
        if job is None:
            return None
        if not self._take_run_lock(key):
            return None  # its holder is alive
        try:
            queued = self._read(self._active_path(JobState.QUEUED, key), JobState.QUEUED)
            if queued is not None and queued.job_id == job.job_id:
                # A release wrote the queued copy and crashed before deleting this one.
                self._unlink(running)
                self._fsync_dir(self._sub("running"))
                return None
            # A requested cancellation wins over the retry (_requeue_locked sees it).
            stored = self._requeue_locked(
                job, count_attempt=True, error="its holder process died while running it"
            )
        finally:
            self._drop_run_lock(key)
        if stored.state is not JobState.QUEUED:
            log.info("job {job_id} of a dead holder cancelled", job_id=job.job_id, key=key)
            return None
        log.warn(
            "job {job_id} recovered from a dead holder by {owner}; attempts now {attempts}",
            job_id=job.job_id,
            key=key,
            owner=self.owner,
            attempts=stored.attempts,
        )
        return stored

    # -- housekeeping --------------------------------------------------------------

    def _clean_tmp(self, now: float | None) -> None:
        """Delete temp files left by crashed writers.

        A file of this host whose writer pid is gone is deleted at once; any file older
        than an hour is deleted too (other hosts' crashes).  Files of live writers —
        another daemon mid-commit on the share — are left alone.
        """
        tmp = self._sub("tmp")
        host = _host_tag()
        for name in os.listdir(tmp.path):
            path = tmp.child(name)
            parts = name.split(".")
            stale = False
            if (
                len(parts) == 4
                and parts[0] == host
                and parts[1].isdigit()
                and int(parts[1]) != os.getpid()
            ):
                stale = not _pid_alive(int(parts[1]))
            if not stale and now is not None:
                try:
                    stale = now - os.lstat(path.path).st_mtime > _TMP_MAX_AGE
                except OSError as e:
                    if _gone(e):
                        continue
                    raise
            if stale:
                log.info("removing stale temp file {path}", path=path.path)
                self._unlink(path)

    def sweep(self, now: float | None = None) -> tuple[list[Job], list[Job]]:
        """Housekeeping for the periodic sweep; returns (recovered, queued) jobs."""
        self._clean_tmp(now)
        self._clean_markers()
        recovered = self.recover()
        return recovered, self.queued()

    def held(self) -> dict[str, str]:
        """Return the jobs this store holds (job_id → key)."""
        with self._lock:
            return dict(self._held)


# --- the Twisted service --------------------------------------------------------------


@define(eq=False)
class _Watchers:
    """Observers of jobs becoming QUEUED; a raising observer is logged, never propagated."""

    callbacks: list[Callable[[Job], None]] = field(factory=list)

    def add(self, callback: Callable[[Job], None]) -> Callable[[], None]:
        entry = [callback]
        self.callbacks.append(callback)

        def unsubscribe() -> None:
            if entry:
                self.callbacks.remove(entry.pop())

        return unsubscribe

    def notify(self, job: Job) -> None:
        for callback in list(self.callbacks):
            try:
                callback(job)
            except Exception:
                log.failure("spool watcher {callback!r} failed", callback=callback)


@implementer(ISpool, IService)
@define(eq=False)
class DirectorySpool(Service):
    """The spool on a (possibly shared) directory; see the module docstring.

    Collaborators: ``directory``, the ``reactor`` (IReactorThreads + IReactorTime: its
    clock drives the sweep and it delivers thread results), a private thread pool of
    ``threads`` threads in which all file I/O runs (so reads, claims and finishes
    proceed while a commit is in flight), and :attr:`store`, the blocking core.
    ``max_batch`` caps how many adds one group commit takes, bounding how long it holds
    key locks; ``owner`` names this daemon in logs.
    """

    directory: FilePath[str]
    reactor: Any
    sweep_interval: float = 30.0
    owner: str = field(factory=_default_owner)
    threads: int = 4
    max_batch: int = 512
    #: False in an extra front-door process: the main process sweeps (recovers dead
    #: holders' jobs, finds other daemons' jobs) for the machine.
    sweeps: bool = True
    store: SpoolStore = field(init=False)
    _pool: ThreadPool | None = field(init=False, default=None)
    _loop: LoopingCall | None = field(init=False, default=None)
    _shutdown_trigger: Any = field(init=False, default=None)
    _opened: bool = field(init=False, default=False)
    _opening: list[Deferred[None]] | None = field(init=False, default=None)
    _pending: list[tuple[Job, Deferred[Job]]] = field(init=False, factory=list)
    _committing: bool = field(init=False, default=False)
    _busy: int = field(init=False, default=0)
    _idle: list[Deferred[None]] = field(init=False, factory=list)
    _watchers: _Watchers = field(init=False, factory=_Watchers)
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
            self.store.open(self.reactor.seconds())
        except OSError as e:
            Service.stopService(self)
            raise SpoolError(
                f"spool directory {self.directory.path} is not usable: "
                f"{e.strerror or e} ({e.filename or self.directory.path})"
            ) from None
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
            self.reactor, self._pool, self.store.open, self.reactor.seconds()
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

    def watch(self, callback: Callable[[Job], None]) -> Callable[[], None]:
        """Register ``callback`` for jobs becoming QUEUED; return an unsubscribe function."""
        return self._watchers.add(callback)

    def notice(self, job_id: str, key: str) -> Deferred[Job | None]:
        """Another process sharing this spool (an extra front door) queued ``job_id``
        under ``key``: tell the watchers now rather than at the next sweep, and return
        the job as it is now (None if gone).  The key makes it one file read, not a
        listing of the queue."""
        try:
            _check_id(job_id)
            _check_id(key, "key")
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
        d = self._call(self.store.sweep, self.reactor.seconds())

        def announce(result: tuple[list[Job], list[Job]]) -> None:
            recovered, queued = result
            for job in recovered:
                self._announce(job)
            present = {job.job_id for job in queued}
            for job in queued:
                if job.job_id not in self._announced:
                    log.debug("job {job_id} found queued by the sweep", job_id=job.job_id)
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
            _check_job(job)
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

    # -- the rest of ISpool ----------------------------------------------------------

    def _checked(self, job_id: str, f: Callable[..., Any], *args: Any, **kw: Any) -> Deferred[Any]:
        try:
            _check_id(job_id)
        except ValueError:
            return fail()
        return self._call(f, job_id, *args, **kw)

    def get(self, job_id: str) -> Deferred[Job | None]:
        """Return the job with ``job_id`` in any state, or None."""
        return self._checked(job_id, self.store.get)

    def find(
        self,
        *,
        slide_id: str | None = None,
        result_id: int | None = None,
        cancellation_token: str | None = None,
        states: frozenset[JobState] = _ACTIVE,
    ) -> Deferred[list[Job]]:
        """Return the jobs in ``states`` matching every given criterion."""
        return self._call(
            self.store.find,
            slide_id=slide_id,
            result_id=result_id,
            cancellation_token=cancellation_token,
            states=states,
        )

    def queued(self) -> Deferred[list[Job]]:
        """Return all QUEUED jobs in dispatch order."""
        return self._call(self.store.queued)

    def counts(self) -> Deferred[dict[JobState, int]]:
        """Return the number of jobs in each state."""
        return self._call(self.store.counts)

    def update(self, job: Job) -> Deferred[Job]:
        """Rewrite a QUEUED or RUNNING job's record durably."""
        try:
            _check_job(job)
        except ValueError:
            return fail()
        return self._call(self.store.update, job)

    def claim(self, job_id: str) -> Deferred[Job | None]:
        """Move a QUEUED job to RUNNING, held by this spool; None if not possible."""
        return self._checked(job_id, self.store.claim)

    def finish(self, job_id: str, state: JobState, error: str | None = None) -> Deferred[Job]:
        """End a held RUNNING job as DONE, FAILED or CANCELLED."""
        return self._checked(job_id, self.store.finish, state, error)

    def release(
        self, job_id: str, *, count_attempt: bool, error: str | None = None
    ) -> Deferred[Job]:
        """Put a held RUNNING job back to QUEUED (or CANCELLED if that was requested)."""
        d = self._checked(job_id, self.store.release, count_attempt=count_attempt, error=error)
        return d.addCallback(self._announced_result)

    def _announced_result(self, job: Job) -> Job:
        self._announce(job)
        return job

    def cancel(self, job_id: str, reason: str = "cancelled") -> Deferred[Job | None]:
        """Cancel a QUEUED job; None if it is not queued any more."""
        return self._checked(job_id, self.store.cancel, reason)

    def request_cancel(self, job_id: str) -> Deferred[None]:
        """Ask the holder of a RUNNING job to stop it (a QUEUED job is cancelled at once)."""
        return self._checked(job_id, self.store.request_cancel)

    def cancel_requested(self, job_id: str) -> Deferred[bool]:
        """Return whether a cancellation of ``job_id`` was requested."""
        return self._checked(job_id, self.store.cancel_requested)

    def recover(self) -> Deferred[list[Job]]:
        """Requeue (attempts + 1) every RUNNING job whose holder process is dead."""

        def announce(jobs: list[Job]) -> list[Job]:
            for job in jobs:
                self._announce(job)
            return jobs

        return self._call(self.store.recover).addCallback(announce)


# --- in memory ------------------------------------------------------------------------


@implementer(ISpool, IService)
@define(eq=False)
class MemorySpool(Service):
    """The spool in memory, for unit tests of other modules: same semantics, no disk.

    Every Deferred it returns has already fired.  It is one holder: everything it claims
    is held until finished or released; :meth:`abandon_held` simulates its death so that
    :meth:`recover` has something to do.
    """

    _queued: dict[str, Job] = field(init=False, factory=dict)
    _running: dict[str, Job] = field(init=False, factory=dict)
    _history: dict[str, Job] = field(init=False, factory=dict)
    _markers: dict[str, str] = field(init=False, factory=dict)
    _held: set[str] = field(init=False, factory=set)
    _watchers: _Watchers = field(init=False, factory=_Watchers)

    def startService(self) -> None:
        """Start (nothing to do but be running)."""
        Service.startService(self)

    def stopService(self) -> Deferred[None]:
        """Stop; held jobs are abandoned as a directory spool's would be."""
        Service.stopService(self)
        self._held.clear()
        return succeed(None)

    def abandon_held(self) -> None:
        """Forget every held job, as if this holder had died (test helper)."""
        self._held.clear()

    def watch(self, callback: Callable[[Job], None]) -> Callable[[], None]:
        """Register ``callback`` for jobs becoming QUEUED; return an unsubscribe function."""
        return self._watchers.add(callback)

    def _run(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
        try:
            return succeed(f(*args, **kwargs))
        except Exception:
            return fail()

    def _all(self) -> Iterator[Job]:
        yield from self._queued.values()
        yield from self._running.values()
        yield from self._history.values()

    def _enqueue(self, job: Job, merge: Callable[[Job, Job], Job]) -> Job:
        existing = self._queued.get(job.key)
        stored = merge(existing, job) if existing is not None else job
        self._queued[job.key] = stored
        return stored

    def add(self, job: Job) -> Deferred[Job]:
        """Queue ``job``, merging into a queued job with the same key."""

        def add() -> Job:
            _check_job(job)
            if job.state is not JobState.QUEUED:
                raise ValueError(f"only queued jobs can be added, not {job.state.value}")
            stored = self._enqueue(job, _merge_added)
            self._watchers.notify(stored)
            return stored

        return self._run(add)

    def _find_active(self, job_id: str) -> Job | None:
        _check_id(job_id)
        for job in (*self._queued.values(), *self._running.values()):
            if job.job_id == job_id:
                return job
        return None

    def get(self, job_id: str) -> Deferred[Job | None]:
        """Return the job with ``job_id`` in any state, or None."""

        def get() -> Job | None:
            return self._find_active(job_id) or self._history.get(job_id)

        return self._run(get)

    def find(
        self,
        *,
        slide_id: str | None = None,
        result_id: int | None = None,
        cancellation_token: str | None = None,
        states: frozenset[JobState] = _ACTIVE,
    ) -> Deferred[list[Job]]:
        """Return the jobs in ``states`` matching every given criterion."""
        return succeed(
            [
                job
                for job in self._all()
                if job.state in states and _matches(job, slide_id, result_id, cancellation_token)
            ]
        )

    def queued(self) -> Deferred[list[Job]]:
        """Return all QUEUED jobs in dispatch order."""
        return succeed(sorted(self._queued.values(), key=Job.sort_key))

    def counts(self) -> Deferred[dict[JobState, int]]:
        """Return the number of jobs in each state."""
        out = dict.fromkeys(JobState, 0)
        for job in self._all():
            out[job.state] += 1
        return succeed(out)

    def update(self, job: Job) -> Deferred[Job]:
        """Rewrite a QUEUED or RUNNING job's record."""

        def update() -> Job:
            _check_job(job)
            if job.state not in _ACTIVE:
                raise ValueError(f"only queued or running jobs can be updated, not {job.state}")
            table = self._queued if job.state is JobState.QUEUED else self._running
            stored = table.get(job.key)
            if job.state is JobState.RUNNING and stored is not None:
                if stored.job_id == job.job_id and job.job_id not in self._held:
                    raise NotHeld(f"job {job.job_id} is not held by this spool")
            if stored is None or stored.job_id != job.job_id:
                raise JobMoved(f"job {job.job_id} is no longer {job.state.value}")
            if job.state is JobState.QUEUED and _conflicts(stored, job):
                raise JobChanged(f"job {job.job_id} was changed meanwhile")
            table[job.key] = job
            return job

        return self._run(update)

    def claim(self, job_id: str) -> Deferred[Job | None]:
        """Move a QUEUED job to RUNNING, held by this spool; None if not possible."""

        def claim() -> Job | None:
            job = self._find_active(job_id)
            if job is None or job.state is not JobState.QUEUED or job.key in self._running:
                return None
            del self._queued[job.key]
            running = self._running[job.key] = attrs.evolve(job, state=JobState.RUNNING)
            self._held.add(job_id)
            return running

        return self._run(claim)

    def _held_job(self, job_id: str) -> Job:
        job = self._find_active(job_id)
        if job is None or job.state is not JobState.RUNNING or job_id not in self._held:
            raise NotHeld(f"job {job_id} is not held by this spool")
        return job

    def _end(self, job: Job, state: JobState, error: str | None) -> Job:
        del self._running[job.key]
        self._held.discard(job.job_id)
        self._markers.pop(job.job_id, None)
        final = attrs.evolve(job, state=state, last_error=error)
        self._history[job.job_id] = final.without_secret()
        return final

    def finish(self, job_id: str, state: JobState, error: str | None = None) -> Deferred[Job]:
        """End a held RUNNING job as DONE, FAILED or CANCELLED."""

        def finish() -> Job:
            if not state.terminal:
                raise ValueError(f"finish needs a terminal state, not {state.value}")
            return self._end(self._held_job(job_id), state, error)

        return self._run(finish)

    def _requeue(self, job: Job, *, count_attempt: bool, error: str | None) -> Job:
        if job.job_id in self._markers:
            return self._end(job, JobState.CANCELLED, error or "cancelled while it was running")
        del self._running[job.key]
        self._held.discard(job.job_id)
        stored = self._enqueue(
            _requeued(job, count_attempt=count_attempt, error=error), _merge_released_into
        )
        self._watchers.notify(stored)
        return stored

    def release(
        self, job_id: str, *, count_attempt: bool, error: str | None = None
    ) -> Deferred[Job]:
        """Put a held RUNNING job back to QUEUED (or CANCELLED if that was requested)."""
        return self._run(
            lambda: self._requeue(self._held_job(job_id), count_attempt=count_attempt, error=error)
        )

    def _cancel_queued(self, job_id: str, reason: str) -> Job | None:
        job = self._find_active(job_id)
        if job is None or job.state is not JobState.QUEUED:
            return None
        del self._queued[job.key]
        final = attrs.evolve(job, state=JobState.CANCELLED, last_error=reason)
        self._history[job_id] = final.without_secret()
        return final

    def cancel(self, job_id: str, reason: str = "cancelled") -> Deferred[Job | None]:
        """Cancel a QUEUED job; None if it is not queued any more."""
        return self._run(self._cancel_queued, job_id, reason)

    def request_cancel(self, job_id: str) -> Deferred[None]:
        """Mark a RUNNING job for cancellation; cancel a QUEUED one at once."""

        def request() -> None:
            job = self._find_active(job_id)
            if job is None:
                return
            if job.state is JobState.RUNNING:
                self._markers[job_id] = job.key
            else:
                self._cancel_queued(job_id, "cancellation requested")

        return self._run(request)

    def cancel_requested(self, job_id: str) -> Deferred[bool]:
        """Return whether a cancellation of ``job_id`` was requested."""
        return self._run(lambda: _check_id(job_id) in self._markers)

    def recover(self) -> Deferred[list[Job]]:
        """Requeue (attempts + 1) every RUNNING job not held (see :meth:`abandon_held`)."""
        out: list[Job] = []
        for job in list(self._running.values()):
            if job.job_id in self._held:
                continue
            stored = self._requeue(
                job, count_attempt=True, error="its holder process died while running it"
            )
            if stored.state is JobState.QUEUED:
                out.append(stored)
        return succeed(out)
