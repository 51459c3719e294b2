"""The spool directory's files: the tree, paths, durable writes, reads, listings, lookups.

:class:`SpoolFiles` is everything a store does with the directory short of changing a
job's state: creating (and tightening) the tree, naming the files, writing fsynced temp
files and linking them into place, reading records (quarantining corrupt ones), the
stripe and run locks, the listings and lookups (``queued``, ``find``, ``counts``,
``get``) and the removal of stale temp files.  The transitions, which need a holder,
are :class:`~dpatia_daemon.spool.store.SpoolStore`'s.
"""

from __future__ import annotations

import bisect
import errno
import fcntl
import heapq
import os
import re
import stat
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Container, Iterable, Iterator
from contextlib import contextmanager

import attrs
from attrs import define, field
from twisted.logger import Logger
from twisted.python.filepath import FilePath

from ..durable import fsync_directory, write_new_file
from ..jobs import Job, JobState
from .index import Entry, QueueIndex, job_id_of
from .index import entry_name as index_name
from .interface import ACTIVE, FORWARD, TERMINAL, SpoolError, SpoolRoom, check_id, check_job
from .locks import (
    FILE_MODE,
    LockTable,
    attach_table,
    default_owner,
    detach_table,
    host_tag,
    pid_alive,
)
from .transitions import JobFilter

log = Logger()

ACTIVE_NAME = re.compile(r"([0-9a-f]{2,64})\.json\Z")
_HISTORY_NAME = re.compile(r"([0-9a-f]{2,64})\.([0-9a-f]{2,64})\.json\Z")
_DIR_MODE = 0o700
# A temp file lives for milliseconds; one this old belongs to a crashed writer.
_TMP_MAX_AGE = 3600.0
_NOT_TIGHTENED = "could not tighten {path}: {error}; job files hold callback tokens"
# job_id → key hints; bounded so a daemon running for years does not grow without end.
_HINTS_MAX = 65536
# Index names read beyond a head's length, in case some are stale.
_HEAD_SLACK = 16
# How long a sorted listing of the index serves the heads that continue after a job
# (``queued_head(after=...)``): a walk of a large queue lists it once, not per window.
_LISTING_TTL = 2.0


def gone(e: OSError) -> bool:
    """Return whether ``e`` means the file is not there (ESTALE: deleted on an NFS server)."""
    return e.errno in (errno.ENOENT, errno.ESTALE)


@define(eq=False)
class SpoolFiles:
    """The files of one spool directory: plain blocking methods, no Twisted, thread-safe.

    The base of :class:`~dpatia_daemon.spool.store.SpoolStore` (which adds the
    transitions); see the module docstring for what it owns.  ``fsync`` is injectable
    and ``dir_fsyncs``/``file_fsyncs`` count calls, so tests can see group commit work.
    """

    directory: FilePath[str]
    owner: str = field(factory=default_owner)
    fsync: Callable[[int], None] = os.fsync
    dir_fsyncs: int = field(init=False, default=0)
    file_fsyncs: int = field(init=False, default=0)
    _hints: OrderedDict[str, str] = field(init=False, factory=OrderedDict)
    _cache: dict[str, dict[str, tuple[tuple[int, int, int], Job]]] = field(init=False, factory=dict)
    _reported: set[tuple[str, int]] = field(init=False, factory=set)
    _lock: threading.Lock = field(init=False, factory=threading.Lock)
    _table: LockTable | None = field(init=False, default=None)
    _real: str | None = field(init=False, default=None)
    _tmp_prefix: str = field(init=False, factory=lambda: f"{host_tag()}.{os.getpid()}")
    #: The queue's advisory index (:mod:`.index`), and whether it was reconciled with
    #: ``queued/`` since this store opened.
    _index: QueueIndex = field(init=False)
    _indexed: bool = field(init=False, default=False)
    _reconciling: threading.Lock = field(init=False, factory=threading.Lock)
    #: The index's names, sorted, and when they were listed (``time.monotonic``).
    _sorted: tuple[float, list[str]] | None = field(init=False, default=None)

    @_index.default
    def _make_index(self) -> QueueIndex:
        return QueueIndex(self._sub("index").path)

    # -- setup ---------------------------------------------------------------------

    def open(self, now: float | None = None) -> None:
        """Create (or tighten) the directory tree, attach the locks, clean stale temp files.

        ``now`` is the wall-clock time (``time.time()``, as file mtimes are) that temp
        files' ages are measured against; None skips the age test (see
        :meth:`_clean_tmp`).
        """
        if self._table is not None:
            return
        # Parents a fresh install lacks (var/ under the working directory) are created
        # private too; an existing parent is left as it is.
        os.makedirs(self.directory.parent().path, _DIR_MODE, exist_ok=True)
        for d in [self.directory, *(self._sub(n) for n in self._subdirs())]:
            self._make_private_dir(d)
        self._real, self._table = attach_table(self.directory)
        self._clean_tmp(now)

    def close(self) -> None:
        """Detach from the directory's lock table (closing it after its last user)."""
        if self._real is None:
            return
        detach_table(self._real)
        self._table = None
        self._real = None
        self._indexed = False

    @staticmethod
    def _subdirs() -> list[str]:
        return [s.value for s in JobState] + ["locks", "cancel", "tmp", "corrupt", "index"]

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
        if not mode & 0o077:
            return
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
            log.error(_NOT_TIGHTENED, path=d.path, error=str(e))

    def _tables(self) -> LockTable:
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
        """Make renames/links/unlinks in ``d`` durable (see :func:`fsync_directory`)."""
        with self._lock:
            self.dir_fsyncs += 1
        fsync_directory(d.path, self.fsync)

    def _write_bytes(self, data: bytes) -> FilePath[str]:
        """Write ``data`` to a new fsynced 0600 temp file and return its path."""
        path = self._sub("tmp").child(f"{self._tmp_prefix}.{uuid.uuid4().hex}.tmp")
        write_new_file(path.path, data, fsync=self._fsync_file, mode=FILE_MODE)
        return path

    def _write_temp(self, job: Job) -> FilePath[str]:
        return self._write_bytes(job.to_json())

    @staticmethod
    def _unlink(path: FilePath[str]) -> None:
        try:
            os.unlink(path.path)
        except OSError as e:
            if not gone(e):
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
        check_job(job)
        if not name.startswith(f"{job.key}."):
            raise ValueError(f"record of key {job.key} found in {name}")
        self._remember(job)
        return job if job.state is state else attrs.evolve(job, state=state)

    def _read(self, path: FilePath[str], state: JobState) -> Job | None:
        """Read the record at ``path`` (under its key lock); quarantine it if corrupt."""
        try:
            data = path.getContent()
        except OSError as e:
            if gone(e):
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
        fd = os.open(self._run_path(key).path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
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
        pattern = ACTIVE_NAME if state in ACTIVE else _HISTORY_NAME
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
                if gone(e):
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
        return sorted(self._uncached_listing(JobState.QUEUED), key=Job.sort_key)

    def queued_head(
        self, limit: int, skip: Container[str] = (), after: Job | None = None
    ) -> list[Job]:
        """Return the best ``limit`` QUEUED jobs in dispatch order, but those whose ids
        are in ``skip`` and, with ``after``, those before or at ``after`` (the index's
        names, then one record read each: never a read of the whole queue, nor of a
        skipped job).

        A head from the start lists the index afresh.  One that continues ``after`` a
        job (the next window of a walk through the queue) uses a sorted listing up to
        ``_LISTING_TTL`` seconds old, so that walking a large queue costs a listing
        per ``_LISTING_TTL``, not one per window: a job another daemon queued since is
        seen by the next head from the start (this daemon's own come by its watch).
        """
        self._ensure_indexed()
        if limit <= 0:
            return []
        # A few names more than asked for, so that a stale entry or two (a crash, a
        # record moved by hand) do not shorten the head; reads stop at ``limit``.
        wanted = limit + _HEAD_SLACK
        names: list[str]
        if after is None:
            listed: Iterable[str] = self._index.names()
            if skip:
                # By the job id in the name (its 4th field), before any record is read.
                listed = (name for name in listed if job_id_of(name) not in skip)
            names = heapq.nsmallest(wanted, listed)
        else:
            ordered = self._sorted_names()
            names = []
            for i in range(bisect.bisect_right(ordered, index_name(after)), len(ordered)):
                if len(names) >= wanted:
                    break
                if not skip or job_id_of(ordered[i]) not in skip:
                    names.append(ordered[i])
        out: list[Job] = []
        for name in names:
            if len(out) >= limit:
                break
            entry = Entry.parse(name)
            if entry is None:
                continue
            job = self._read_plain(self._active_path(JobState.QUEUED, entry.key), JobState.QUEUED)
            if job is not None and job.job_id == entry.job_id:
                out.append(job)  # else stale: the next reconciliation removes it
        return sorted(out, key=Job.sort_key)

    def _sorted_names(self) -> list[str]:
        """The index's names, sorted: a listing at most ``_LISTING_TTL`` seconds old."""
        now = time.monotonic()
        cached = self._sorted
        if cached is not None and now - cached[0] < _LISTING_TTL:
            return cached[1]
        ordered = sorted(self._index.names())
        self._sorted = (now, ordered)
        return ordered

    def find(self, criteria: JobFilter) -> list[Job]:
        """Return the jobs matching ``criteria``.

        Running jobs are few (one per worker) and listed; queued ones of a slide come
        from the slide's index bucket; only a search of queued jobs by something other
        than the slide, or of history, lists (and reads) a whole directory.
        """
        out: list[Job] = []
        for state in JobState:
            if state not in criteria.states:
                continue
            if state is JobState.QUEUED and criteria.slide_id is not None:
                jobs = self._queued_of_slide(criteria.slide_id)
            elif state is JobState.QUEUED:
                jobs = self._uncached_listing(state)
            else:
                jobs = self._listing(state)
            out.extend(job for job in jobs if criteria.matches(job))
        return out

    def _queued_of_slide(self, slide_id: str) -> list[Job]:
        self._ensure_indexed()
        out = []
        for entry in self._index.for_slide(slide_id):
            job = self._read_plain(self._active_path(JobState.QUEUED, entry.key), JobState.QUEUED)
            if job is not None and job.job_id == entry.job_id:
                out.append(job)
        return out

    def _uncached_listing(self, state: JobState) -> list[Job]:
        """:meth:`_listing` without keeping the records: a queue can be large."""
        jobs = self._listing(state)
        self._cache.pop(state.value, None)
        return jobs

    def active_keys(self) -> set[str]:
        """The keys of every QUEUED or RUNNING record (names only, no file read)."""
        return {
            m.group(1)
            for state in FORWARD
            for name in self._names(state)
            if (m := ACTIVE_NAME.match(name)) is not None
        }

    # -- the index -----------------------------------------------------------------

    def _ensure_indexed(self) -> None:
        if not self._indexed:
            self.check_index()

    def check_index(self) -> bool:
        """The quick check: as many index entries as queued records (two listings of
        names, nothing parsed), else a full :meth:`reconcile_index`.  True if it
        reconciled.  Counts that agree while the sets differ take two faults that
        cancel out; the sweep's periodic full reconciliation repairs those too."""
        queued = sum(1 for name in self._names(JobState.QUEUED) if name.endswith(".json"))
        if queued == sum(1 for _ in self._index.names()):
            self._indexed = True
            return False
        self.reconcile_index()
        return True

    def reconcile_index(self) -> int:
        """Make the index agree with ``queued/``; return how many keys needed repair.

        A listing of names on both sides; only keys whose entry is missing, stale or
        doubled are then looked at, each under its stripe lock (its record read once).
        """
        with self._reconciling:
            return self._reconcile_locked()

    def _reconcile_locked(self) -> int:
        queued = {
            m.group(1)
            for name in self._names(JobState.QUEUED)
            if (m := ACTIVE_NAME.match(name)) is not None
        }
        entries: dict[str, str] = {}
        repair: dict[str, list[str]] = {}
        for name in self._index.names():
            entry = Entry.parse(name)
            if entry is None:
                continue
            if entry.key not in queued:
                repair.setdefault(entry.key, []).append(name)
            elif entry.key in entries:
                # Doubled: which one is right is decided under the key's lock.
                repair.setdefault(entry.key, [entries[entry.key]]).append(name)
            else:
                entries[entry.key] = name
        for key in queued:
            if key not in entries:
                repair.setdefault(key, [])
        del entries, queued
        for key, names in repair.items():
            with self._locked([key]):
                self._reindex_locked(key, names)
        self._indexed = True
        return len(repair)

    def _reindex_locked(self, key: str, names: list[str]) -> None:
        """Give ``key``'s queued record (read under its lock) exactly its own entry."""
        job = self._read(self._active_path(JobState.QUEUED, key), JobState.QUEUED)
        keep = None
        if job is not None:
            self._index.put(job)
            keep = Entry.parse(index_name(job))
        for name in names:
            if keep is None or name != keep.name:
                self._index.unlink(name)

    def _index_quietly(self, change: Callable[..., None], *jobs: Job) -> None:
        """Apply an index change; a failure only leaves it for the next reconciliation."""
        try:
            change(*jobs)
        except OSError as e:
            log.warn(
                "queue index of {path} not updated ({error}); the next sweep repairs it",
                path=self.directory.path,
                error=e.strerror or str(e),
            )

    def _queued_key_from_index(self, job_id: str) -> str | None:
        """The key of queued ``job_id`` from the index's names (no record read)."""
        self._ensure_indexed()
        marker = f".{job_id}."
        for name in self._index.names():
            if marker in name:
                entry = Entry.parse(name)
                if entry is not None and entry.job_id == job_id:
                    return entry.key
        return None

    def counts(self) -> dict[JobState, int]:
        """Return the number of records in each state (a directory listing each)."""
        out: dict[JobState, int] = {}
        for state in JobState:
            pattern = ACTIVE_NAME if state in ACTIVE else _HISTORY_NAME
            out[state] = sum(1 for n in self._names(state) if pattern.match(n))
        return out

    def room(self, count_queued: bool = False) -> SpoolRoom:
        """The free space of the spool's filesystem (one ``statvfs``) and, with
        ``count_queued``, the QUEUED records (one listing of ``queued/``, no reads)."""
        st = os.statvfs(self.directory.path)
        queued = None
        if count_queued:
            queued = sum(1 for n in self._names(JobState.QUEUED) if ACTIVE_NAME.match(n))
        return SpoolRoom(st.f_bavail * st.f_frsize, queued)

    def queued_of(self, key: str, seen: object = None) -> tuple[object, Job | None]:
        """The QUEUED record of ``key`` if it changed since tag ``seen``: one ``stat``
        of ``queued/<key>.json`` (its inode, mtime and size are the tag), a read only
        when the tag changed."""
        check_id(key, "job key")
        path = self._active_path(JobState.QUEUED, key)
        try:
            st = os.stat(path.path)
        except OSError as e:
            if gone(e):
                return None, None
            raise
        tag = (st.st_ino, st.st_mtime_ns, st.st_size)
        if tag == seen:
            return tag, None
        job = self._read_plain(path, JobState.QUEUED)
        return (tag, job) if job is not None else (None, None)

    def get(self, job_id: str) -> Job | None:
        """Return the job with ``job_id`` in any state, or None."""
        check_id(job_id)
        key = self._hint(job_id)
        if key is not None:
            for state in FORWARD:
                job = self._read_plain(self._active_path(state, key), state)
                if job is not None and job.job_id == job_id:
                    return job
            for state in TERMINAL:
                job = self._read_plain(self._history_path(state, key, job_id), state)
                if job is not None:
                    return job
            return None
        # No hint (another daemon's job, or a restart): the index's names for a queued
        # job, the (few) running records, then the history file by name.
        key = self._queued_key_from_index(job_id)
        if key is not None:
            job = self._read_plain(self._active_path(JobState.QUEUED, key), JobState.QUEUED)
            if job is not None and job.job_id == job_id:
                return job
        for job in self._listing(JobState.RUNNING):
            if job.job_id == job_id:
                return job
        suffix = f".{job_id}.json"
        for state in TERMINAL:
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
            if gone(e):
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
        if state is JobState.QUEUED:
            return self._queued_key_from_index(job_id)
        for job in self._listing(state):
            if job.job_id == job_id:
                return job.key
        return None

    # -- housekeeping --------------------------------------------------------------

    def _clean_tmp(self, now: float | None) -> None:
        """Delete temp files left by crashed writers.

        A file of this host whose writer pid is gone is deleted at once; any file older
        than an hour is deleted too (other hosts' crashes).  Files of live writers —
        another daemon mid-commit on the share — are left alone.  ``now`` is a
        wall-clock time (an mtime's clock); None: no file is old.
        """
        tmp = self._sub("tmp")
        host = host_tag()
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
                stale = not pid_alive(int(parts[1]))
            if not stale and now is not None:
                try:
                    stale = now - os.lstat(path.path).st_mtime > _TMP_MAX_AGE
                except OSError as e:
                    if gone(e):
                        continue
                    raise
            if stale:
                log.info("removing stale temp file {path}", path=path.path)
                self._unlink(path)
