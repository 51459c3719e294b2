"""The blocking spool store: one holder's add (group commit), claim and commit operations.

:class:`SpoolStore` adds the transitions to :class:`~dpatia_daemon.spool.files.SpoolFiles`:
``add``/``commit_batch``, ``claim``, ``finish``, ``release``, ``cancel``, ``update``,
the cancellation markers, ``recover`` and the ``sweep``.  Each runs under the stripe
locks of the keys it touches (see the package docstring's "Locking protocol").
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable

import attrs
from attrs import define, field
from twisted.logger import Logger
from twisted.python.filepath import FilePath

from ..jobs import Deferral, Job, JobState
from .files import ACTIVE_NAME, SpoolFiles
from .interface import ACTIVE, HEX_ID, JobChanged, JobMoved, NotHeld, check_id, check_job
from .transitions import conflicts, merge_added, merge_released_into, requeued, resumed

log = Logger()

#: How many queued jobs (the best) a sweep reads and announces: a backlog beyond it
#: is read as the dispatcher gets to it, not at every sweep.
SWEEP_HEAD = 512
#: Every how many sweeps the queue's index is fully reconciled (names parsed and
#: compared, key by key); the others only compare the counts (see ``check_index``).
FULL_RECONCILE_EVERY = 10


@define(eq=False)
class SpoolStore(SpoolFiles):
    """The spool directory itself: plain blocking methods, no Twisted, thread-safe.

    :class:`~dpatia_daemon.spool.DirectorySpool` calls it in its thread pool; tests and
    helper processes use it directly.  One store is one *holder*: the jobs it claims are
    its own until it finishes or releases them (or :meth:`close` abandons them).
    """

    _held: dict[str, str] = field(init=False, factory=dict)  # job_id → key
    _sweeps: int = field(init=False, default=0)

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
        SpoolFiles.close(self)

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
                        results.append(self._enqueue(job, tmp, merge_added))
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
        check_job(job)
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
                self._index_quietly(self._index.put, job)
                return job
            existing = self._read(dest, JobState.QUEUED)
            if existing is None:
                continue  # vanished (a stale cache) or quarantined: create it again
            self._unlink(tmp)
            merged = merge(existing, job)
            merged_tmp = self._write_temp(merged)
            os.rename(merged_tmp.path, dest.path)
            self._index_quietly(self._index.move, existing, merged)
            return merged
        if tmp is not None:
            self._unlink(tmp)
        raise OSError(errno.EAGAIN, f"could not place {dest.path}")

    # -- transitions -----------------------------------------------------------------

    def claim(self, job_id: str, now: float | None = None) -> Job | None:
        """Move a QUEUED job to RUNNING, held by this store; None if not possible
        (with ``now``: also while the job is deferred past it)."""
        check_id(job_id)
        key = self._key_of(job_id, JobState.QUEUED)
        if key is None:
            return None
        queued = self._active_path(JobState.QUEUED, key)
        running = self._active_path(JobState.RUNNING, key)
        with self._locked([key]):
            job = self._read(queued, JobState.QUEUED)
            if job is None or job.job_id != job_id:
                return None
            if now is not None and not job.ready(now):
                return None  # deferred: not before its not_before
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
            self._index_quietly(self._index.drop, job)
        log.info("job {job_id} claimed by {owner}", job_id=job_id, key=key, owner=self.owner)
        return attrs.evolve(job, state=JobState.RUNNING)

    def _held_key(self, job_id: str) -> str:
        check_id(job_id)
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

    def release(
        self,
        job_id: str,
        *,
        count_attempt: bool,
        error: str | None = None,
        deferral: Deferral | None = None,
    ) -> Job:
        """Put a held RUNNING job back to QUEUED (or CANCELLED if that was requested)."""
        key = self._held_key(job_id)
        with self._locked([key]):
            job = self._held_record(job_id, key)
            try:
                result = self._requeue_locked(
                    job, count_attempt=count_attempt, error=error, deferral=deferral
                )
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

    def _requeue_locked(
        self, job: Job, *, count_attempt: bool, error: str | None, deferral: Deferral | None = None
    ) -> Job:
        """Move the running ``job`` (run and key lock held) back to the queue."""
        if os.path.lexists(self._marker_path(job.job_id).path):
            return self._end_running(
                job, JobState.CANCELLED, error or "cancelled while it was running"
            )
        stored = self._enqueue(
            requeued(job, count_attempt=count_attempt, error=error, deferral=deferral),
            None,
            merge_released_into,
        )
        self._fsync_dir(self._sub("queued"))
        # A crash here leaves both records; recover() then sees the queued copy and
        # only deletes the running one.
        self._unlink(self._active_path(JobState.RUNNING, job.key))
        self._fsync_dir(self._sub("running"))
        return stored

    def cancel(self, job_id: str, reason: str = "cancelled") -> Job | None:
        """Cancel a QUEUED job; None if it is not queued."""
        check_id(job_id)
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
        self._index_quietly(self._index.drop, job)
        return final

    def retry(self, job_id: str) -> tuple[Job, bool] | None:
        """An operator's retry: a FAILED job back to QUEUED (attempts from 0), or a
        deferred QUEUED job ready at once; None if the job is neither.

        Returns ``(job, changed)``: the queued job, and False when nothing was done (a
        job for the same key is already queued, or a queued job was not deferred; the
        failed record is then kept).  The history record has no token: the daemon that
        claims it uses the newest callback it received for the slide, or its client
        credentials.
        """
        check_id(job_id)
        key = self._hint(job_id) or self._failed_key(job_id)
        if key is None:
            key = self._key_of(job_id, JobState.QUEUED)
        if key is None:
            return None
        with self._locked([key]):
            queued_path = self._active_path(JobState.QUEUED, key)
            failed = self._history_path(JobState.FAILED, key, job_id)
            job = self._read(failed, JobState.FAILED)
            if job is None:
                queued = self._read(queued_path, JobState.QUEUED)
                if queued is None or queued.job_id != job_id:
                    return None
                if queued.not_before is None:
                    return queued, False
                ready = resumed(queued)
                tmp = self._write_temp(ready)
                os.rename(tmp.path, queued_path.path)
                self._fsync_dir(self._sub("queued"))
                log.info("job {job_id}: deferral lifted by an operator", job_id=job_id, key=key)
                return ready, True
            fresh = attrs.evolve(
                requeued(job, count_attempt=False, error=job.last_error),
                attempts=0,
                deferred_since=None,
            )
            tmp = self._write_temp(fresh)
            if not self._link_new(tmp, queued_path):
                self._unlink(tmp)
                existing = self._read(queued_path, JobState.QUEUED)
                if existing is None:
                    raise JobMoved(f"the queued record of key {key} vanished; try again")
                return existing, False
            self._fsync_dir(self._sub("queued"))
            # A crash here leaves the failed record too: history, harmless.
            self._unlink(failed)
            self._fsync_dir(self._sub("failed"))
        log.info("failed job {job_id} queued again by an operator", job_id=job_id, key=key)
        return fresh, True

    def _failed_key(self, job_id: str) -> str | None:
        """The key of ``job_id``'s FAILED record, by its file name (no reads)."""
        suffix = f".{job_id}.json"
        for name in self._names(JobState.FAILED):
            if name.endswith(suffix) and HEX_ID.match(name[: -len(suffix)]):
                return name[: -len(suffix)]
        return None

    def update(self, job: Job) -> Job:
        """Rewrite a QUEUED or RUNNING job's record durably (see :meth:`ISpool.update`)."""
        check_job(job)
        if job.state not in ACTIVE:
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
            if job.state is JobState.QUEUED and conflicts(stored, job):
                raise JobChanged(f"job {job.job_id} was changed meanwhile")
            tmp = self._write_temp(job)
            os.rename(tmp.path, path.path)
            self._fsync_dir(self._sub(job.state.value))
        return job

    # -- cancellation markers ------------------------------------------------------

    def request_cancel(self, job_id: str) -> None:
        """Mark a RUNNING job for cancellation; cancel a QUEUED one at once."""
        check_id(job_id)
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
        check_id(job_id)
        return os.path.lexists(self._marker_path(job_id).path)

    def _clean_markers(self) -> None:
        """Delete cancel markers whose job is not running (left by a crash)."""
        for name in os.listdir(self._sub("cancel").path):
            if not HEX_ID.match(name):
                continue
            marker = self._marker_path(name)
            try:
                key = marker.getContent().decode("ascii").strip()
            except (OSError, UnicodeDecodeError):
                continue
            if not HEX_ID.match(key):
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
            m = ACTIVE_NAME.match(name)
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

    def sweep(
        self, now: float | None = None, head: int = SWEEP_HEAD
    ) -> tuple[list[Job], list[Job]]:
        """Housekeeping for the periodic sweep; returns (recovered, queued) jobs.

        ``now``: the wall-clock time stale temp files are judged by (see ``open``).
        The queued jobs are the best ``head`` of the queue (:meth:`queued_head`), after
        the queue's index is reconciled with its records: a sweep lists names, and
        reads only the records at the head and those whose entry needed repair.
        """
        self._clean_tmp(now)
        self._clean_markers()
        recovered = self.recover()
        with self._lock:
            self._sweeps += 1
            full = self._sweeps % FULL_RECONCILE_EVERY == 0
        if full:
            self.reconcile_index()
        else:
            self.check_index()
        return recovered, self.queued_head(head)

    def held(self) -> dict[str, str]:
        """Return the jobs this store holds (job_id → key)."""
        with self._lock:
            return dict(self._held)
