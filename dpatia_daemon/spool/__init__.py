"""The durable job spool: every accepted request, on disk before it is acknowledged.

The spool owns the life of a :class:`~dpatia_daemon.jobs.Job` from acceptance to its end:
``add`` (QUEUED) → ``claim`` (RUNNING, held by one daemon) → ``finish`` (DONE, FAILED,
CANCELLED) or ``release``/``recover`` (back to QUEUED).  :class:`ISpool` is the interface;
:class:`DirectorySpool` is the real one, :class:`MemorySpool` the in-memory stand-in for
unit tests of other modules.  Both pass one shared contract test suite.

Modules, lowest first: ``interface`` (ISpool, the errors, the id checks),
``transitions`` (what a release or a merge makes of a job, the ``find`` filter),
``locks`` (the process-wide lock table of a directory, the host tag), ``files`` and
``store`` (the blocking :class:`SpoolStore`: the directory's files, listings and
temp-file cleanup, then the transitions), ``base`` (the ISpool surface both services
share, over a synchronous core, and the watchers), ``directory``
(:class:`DirectorySpool`), ``memory`` (:class:`MemorySpool`); beside them
``retention`` (history records pruned after ``[spool] retention_days``).

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
    locks/prune.lock                held by the one history prune running (``retention``)
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
  process-wide table shared by all its stores (``locks.LockTable``): stripe mutexes
  keep its own threads apart, and a run lock the process holds is never tested or
  re-opened.
* Mount NFS shares with ``lookupcache=positive`` (or ``none``): a cached negative lookup
  could hide another daemon's fresh file for up to the attribute-cache timeout.  Each
  daemon needs a unique host name (it names temp files, see
  ``files.SpoolFiles._clean_tmp``).

Durability
----------
Every record is written to ``tmp/``, fsynced, and renamed (or linked) into place, and
the target directory is fsynced before the operation reports success.  ``add`` uses
group commit: adds that arrive while a commit is in flight form the next batch, whose
temp files are written and fsynced in parallel, linked into ``queued/`` together, and
made durable by ONE fsync of ``queued/``.
"""

from __future__ import annotations

from .directory import DirectorySpool, ISpoolReactor
from .interface import (
    ISpool,
    JobChanged,
    JobMoved,
    NotHeld,
    SpoolError,
    SpoolNotRunning,
    SpoolRoom,
)
from .locks import host_tag as _host_tag  # noqa: F401  (imported by name from here)
from .memory import MemorySpool
from .store import SpoolStore

__all__ = [
    "ISpool",
    "ISpoolReactor",
    "DirectorySpool",
    "MemorySpool",
    "SpoolStore",
    "SpoolError",
    "JobMoved",
    "JobChanged",
    "NotHeld",
    "SpoolNotRunning",
    "SpoolRoom",
]
