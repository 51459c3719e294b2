"""The queue's index: one empty file per queued job, named by its place in the queue.

Reading the best queued jobs, or a slide's, from ``queued/`` alone means reading and
decoding every record (about 0.1 ms each): a 100 000-job backlog costs seconds per
listing.  The index answers both from file *names*::

    index/<bb>/<rank>.<prio>.<created>.<job_id>.<key>.<slide>

* ``rank`` ``0`` for a manual request, ``1`` for a notification; ``prio`` the priority
  as 8 hex digits, inverted so that a higher priority sorts first; ``created`` the
  queue position in microseconds (14 hex digits).  Names therefore sort in dispatch
  order (:meth:`~dpatia_daemon.jobs.Job.sort_key`), and the best ``n`` queued jobs are
  the ``n`` smallest names: a listing of names, then ``n`` record reads.
* ``slide`` is 8 hex digits of a hash of the slide id (no PHI in a name) and ``bb``,
  its first two, the bucket: the queued jobs of one slide are in one of 256 small
  directories, so ``find`` for a slide lists one bucket and reads only its records.

The index is *advisory*: records stay the truth and every transition still takes the
key's stripe lock and reads the record.  The store keeps an entry per queued record
under that lock (created on enqueue, renamed when a merge moves the job in the queue,
removed on claim and cancel), without fsync: a crash can leave an entry missing or
stale, and :meth:`~dpatia_daemon.spool.store.SpoolStore.reconcile_index` (at the first
lookup after opening, and in every sweep) repairs both from the names in ``queued/``,
so daemons sharing a spool, or one that has just been upgraded, converge on it.
A reader that meets a stale entry (its record gone or another job's) skips it.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator

from attrs import frozen

from ..jobs import Job, JobKind

#: An index entry's name (see the module docstring).
ENTRY_NAME = re.compile(
    r"[01]\.[0-9a-f]{8}\.[0-9a-f]{14}\.([0-9a-f]{2,64})\.([0-9a-f]{2,64})\.([0-9a-f]{8})\Z"
)
_BUCKET = re.compile(r"[0-9a-f]{2}\Z")
_PRIO_BIAS = 2**31
_DIR_MODE = 0o700
_FILE_MODE = 0o600


def slide_tag(slide_id: str) -> str:
    """The 8 hex digits of ``slide_id`` an index entry carries (a hash: no PHI)."""
    return hashlib.sha256(slide_id.encode("utf-8")).hexdigest()[:8]


def entry_name(job: Job) -> str:
    """The name of ``job``'s index entry: its names sort as the jobs' ``sort_key``."""
    rank = 0 if job.kind is JobKind.CREATE else 1
    prio = min(max(_PRIO_BIAS - job.priority, 0), 2**32 - 1)
    created = min(max(int(job.created * 1_000_000), 0), 16**14 - 1)
    return f"{rank}.{prio:08x}.{created:014x}.{job.job_id}.{job.key}.{slide_tag(job.slide_id)}"


def job_id_of(name: str) -> str | None:
    """The job id an entry's name carries (its 4th field), without a full parse."""
    parts = name.split(".", 5)
    return parts[3] if len(parts) == 6 else None


@frozen
class Entry:
    """A parsed index entry name."""

    name: str
    job_id: str
    key: str
    slide: str

    @classmethod
    def parse(cls, name: str) -> Entry | None:
        """The entry named ``name``; None if it is not an entry's name."""
        m = ENTRY_NAME.match(name)
        if m is None:
            return None
        return cls(name, m.group(1), m.group(2), m.group(3))


@frozen
class QueueIndex:
    """The index directory (``root``): plain blocking file operations, no locks.

    Callers hold the key's stripe lock while they change a key's entries.
    """

    root: str

    def _bucket(self, slide: str) -> str:
        return os.path.join(self.root, slide[:2])

    def _path(self, name: str) -> str:
        return os.path.join(self._bucket(name[-8:]), name)

    def put(self, job: Job) -> None:
        """Make sure ``job`` has its entry (an existing one is fine)."""
        self._create(entry_name(job))

    def _create(self, name: str) -> None:
        path = self._path(name)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        for _ in range(2):
            try:
                os.close(os.open(path, flags, _FILE_MODE))
                return
            except FileExistsError:
                return
            except FileNotFoundError:
                try:
                    os.mkdir(os.path.dirname(path), _DIR_MODE)
                except FileExistsError:
                    pass
        os.close(os.open(path, flags, _FILE_MODE))

    def drop(self, job: Job) -> None:
        """Remove ``job``'s entry, if there is one."""
        self.unlink(entry_name(job))

    def unlink(self, name: str) -> None:
        """Remove the entry ``name``, if it is there."""
        try:
            os.unlink(self._path(name))
        except FileNotFoundError:
            pass

    def move(self, old: Job, new: Job) -> None:
        """``old``'s record became ``new`` (a merge): move its entry if its place changed."""
        before, after = entry_name(old), entry_name(new)
        if before == after:
            self._create(after)
            return
        try:
            os.rename(self._path(before), self._path(after))
        except FileNotFoundError:
            self._create(after)  # never indexed (a crash, an older daemon), or its bucket

    def names(self) -> Iterator[str]:
        """Every entry's name, in no order (a listing of each bucket; no file read)."""
        try:
            buckets = os.listdir(self.root)
        except FileNotFoundError:
            return
        for bucket in buckets:
            if not _BUCKET.match(bucket):
                continue
            try:
                yield from os.listdir(os.path.join(self.root, bucket))
            except FileNotFoundError:
                continue

    def for_slide(self, slide_id: str) -> list[Entry]:
        """The entries of ``slide_id``'s queued jobs (a listing of one bucket)."""
        tag = slide_tag(slide_id)
        try:
            names = os.listdir(self._bucket(tag))
        except FileNotFoundError:
            return []
        out = []
        for name in names:
            if name.endswith(tag):
                entry = Entry.parse(name)
                if entry is not None and entry.slide == tag:
                    out.append(entry)
        return out


__all__ = ["ENTRY_NAME", "Entry", "QueueIndex", "entry_name", "job_id_of", "slide_tag"]
