"""What the daemon does around one job's analysis: candidates, work folders, SPS writes.

* :class:`Candidates` — the in-memory list of job ids to try next, best first, fed by
  the spool's watch (so dispatch never lists the spool directory per event) and
  refilled from ``spool.queued()`` only when it runs dry.
* :class:`WorkFolders` — one private folder per job key under ``[workers]
  work_directory``: ``job.json`` for the worker, ``result.json`` from it, later the
  pipeline's downloads.  Removed when the job ends; kept when it is retried, so a job
  whose analysis finished but whose result could not be stored only re-writes it.
* :class:`JobRun` — one claimed job until the spool records its end.  It owns every
  SPS write of the job (the daemon writes results, never the worker): it finds or
  creates the job's result, throttles progress frames to one per
  ``progress_interval`` (plus the final write), guarantees that no progress frame is
  written after the final one, and ends the job in the spool: done, failed (after
  ``max_attempts``, with a failure frame), retried, cancelled or put back unharmed at
  shutdown.  It knows nothing about processes: the supervisor tells it how the
  analysis ended.
"""

from __future__ import annotations

import heapq
import json
import os
import re
import shutil
from collections.abc import Callable, Coroutine, Iterable
from enum import StrEnum
from typing import Any, TypeVar

import attrs
from attrs import define, field
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath

from ..durable import write_atomically
from ..jobs import Callback, Job, JobKind, JobState
from ..models import InvalidInput, Result, result_from_json
from ..spool import ISpool, SpoolError
from ..sps.client import SPSError
from ..sps.results import CONTEXT_KEY, Status
from ..sps.writer import ResultGone, ResultWriter, Superseded, is_final
from .workfolder import JOB_FILE, LABEL_STEM, RESULT_FILE, SLIDE_INFO_FILE, WSI_DIR

log = Logger()

T = TypeVar("T")

_KEY = re.compile(r"[0-9a-f]{2,64}\Z")
_DIR_MODE = 0o700
#: Longest error text put in a frame's label (the full text goes in a property).
_LABEL_ERROR = 160


# --- candidates -----------------------------------------------------------------------


SortKey = tuple[int, int, float, str]


@define
class Candidates:
    """Jobs to try, best first by :meth:`Job.sort_key` (manual before notification,
    then priority, then oldest).

    A job offered again with a new sort key (a merge raised its priority) moves; stale
    heap entries are skipped on pop.  At most ``limit`` notifications are held (a
    manual request is always taken): past that, :attr:`truncated` says the spool
    holds more than this list, so it is listed again once the list runs dry.
    """

    limit: int = 10000
    truncated: bool = field(default=False, init=False)
    _heap: list[tuple[SortKey, str]] = field(factory=list, init=False)
    _jobs: dict[str, tuple[SortKey, Job]] = field(factory=dict, init=False)

    def __len__(self) -> int:
        return len(self._jobs)

    def offer(self, job: Job) -> bool:
        """Add (or re-rank) a queued job; False if it was left out (list full)."""
        key = job.sort_key()
        known = self._jobs.get(job.job_id)
        if known is None and len(self._jobs) >= self.limit and job.kind is not JobKind.CREATE:
            self.truncated = True
            return False
        self._jobs[job.job_id] = (key, job)
        if known is not None and known[0] == key:
            return True
        heapq.heappush(self._heap, (key, job.job_id))
        if len(self._heap) > 2 * len(self._jobs) + 64:
            # Re-ranked jobs leave stale entries behind; compact now and then.
            self._heap = [(k, i) for i, (k, _) in self._jobs.items()]
            heapq.heapify(self._heap)
        return True

    def offer_all(self, jobs: Iterable[Job]) -> None:
        """Add a ``queued()`` listing (best first), up to the limit."""
        self.truncated = False
        for job in jobs:
            if not self.offer(job):
                break

    def pop(self) -> Job | None:
        """Remove and return the best job, or None when there is none."""
        while self._heap:
            key, job_id = heapq.heappop(self._heap)
            known = self._jobs.get(job_id)
            if known is not None and known[0] == key:
                del self._jobs[job_id]
                return known[1]
        return None


# --- work folders ---------------------------------------------------------------------


class UnusableResult(Exception):
    """A ``result.json`` that cannot be stored; the message says why."""


#: Files of an ended job removed at once: the label image may show PHI.
RETIRED_PREFIXES = (LABEL_STEM + ".",)


def _remove_path(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _private_dir(path: FilePath[str]) -> None:
    if not path.isdir():
        os.makedirs(path.path, _DIR_MODE, exist_ok=True)
        os.chmod(path.path, _DIR_MODE)


@define
class WorkFolders:
    """The per-job folders under ``root`` (``[workers] work_directory``).

    A folder is named by the job's key: a hash, so it carries no PHI and is safe as a
    file name.  ``job.json`` holds the callback token, hence 0700 folders and 0600
    files.  Small reads and writes happen in the caller's thread; removals (a folder
    may hold a whole-slide image) go through ``run_blocking`` (the reactor's thread
    pool in the daemon, a plain call in tests).
    """

    root: FilePath[str]
    run_blocking: Callable[..., Deferred[Any]] | None = None
    #: Keep the downloaded WSI files when a job ends ([spool] keep_wsi).
    keep_wsi: bool = False
    #: Days an ended job's metadata, thumbnail and result are kept ([spool] retention_days).
    retention_days: float = 30.0

    def folder(self, job: Job) -> FilePath[str]:
        """The folder of ``job`` (not created)."""
        if not _KEY.match(job.key):
            raise ValueError(f"invalid job key {job.key!r}")
        return self.root.child(job.key)

    def prepare(self, job: Job) -> FilePath[str]:
        """Create the job's folder and write ``job.json``; drop another job's result."""
        folder = self.folder(job)
        _private_dir(self.root)
        _private_dir(folder)
        write_atomically(folder.child(JOB_FILE).path, job.to_json(), fsync=False)
        result = folder.child(RESULT_FILE)
        if result.exists() and self._result_job_id(result) != job.job_id:
            result.remove()
        return folder

    def update_job(self, job: Job) -> bool:
        """Rewrite ``job.json`` of a prepared job (a newer callback token arrived), so
        that its worker sees it; False if the job has no ``job.json`` (not prepared
        yet, or retired)."""
        path = self.folder(job).child(JOB_FILE)
        if not path.exists():
            return False
        write_atomically(path.path, job.to_json(), fsync=False)
        return True

    @staticmethod
    def _result_job_id(path: FilePath[str]) -> str | None:
        try:
            data = json.loads(path.getContent())
        except (OSError, ValueError):
            return None
        job_id = data.get("jobId") if isinstance(data, dict) else None
        return job_id if isinstance(job_id, str) else None

    def completed(self, job: Job) -> Result | None:
        """The result a previous attempt of this very job computed, if it is there."""
        path = self.folder(job).child(RESULT_FILE)
        if not path.exists():
            return None
        try:
            return self.read_result(job, path.path)
        except UnusableResult as e:
            log.warn(
                "job {job_id}: ignoring {path}: {error}",
                job_id=job.job_id,
                path=path.path,
                error=str(e),
            )
            return None

    def read_result(self, job: Job, path: str) -> Result:
        """Parse the ``result.json`` a worker reported for ``job``."""
        expected = self.folder(job).child(RESULT_FILE)
        if os.path.abspath(path) != os.path.abspath(expected.path):
            raise UnusableResult(f"the worker reported {path!r}, not {expected.path!r}")
        try:
            data = json.loads(expected.getContent())
        except (OSError, ValueError) as e:
            raise UnusableResult(f"cannot read {RESULT_FILE}: {e}") from None
        if not isinstance(data, dict) or data.get("jobId") != job.job_id:
            raise UnusableResult(f"{RESULT_FILE} is not the result of job {job.job_id}")
        try:
            return result_from_json(data.get("result"))
        except InvalidInput as e:
            raise UnusableResult(
                f"the analysis returned an invalid result: {e} at {e.field}"
            ) from None

    def quality_control(self, job: Job) -> tuple[str, str | None] | None:
        """The QC verdict the analysis returned with its result, and the ``versionId`` of
        the slide's current QC state (from its metadata) to send with it; or None."""
        folder = self.folder(job)
        try:
            record = json.loads(folder.child(RESULT_FILE).getContent())
        except (OSError, ValueError):
            return None
        verdict = record.get("qualityControl") if isinstance(record, dict) else None
        if not isinstance(verdict, str):
            return None
        version: str | None = None
        try:
            info = json.loads(folder.child(SLIDE_INFO_FILE).getContent())
            version = info["qualityControl"]["versionId"]
        except (OSError, ValueError, KeyError, TypeError):
            pass  # no QC state known yet (SPS before 4.2, or no metadata): send none
        return verdict, version if isinstance(version, str) else None

    def remove(self, job: Job) -> Deferred[Any]:
        """Retire the job's folder (in the background) now that the job has ended.

        The token (``job.json``) and the label image (it may show PHI) go at once, the
        WSI files too unless ``keep_wsi``; metadata, thumbnail and ``result.json`` stay
        for ``retention_days`` (then :meth:`prune` removes them).
        """
        return self._blocking(self._retire, self.folder(job).path)

    def _retire(self, path: str) -> None:
        if self.retention_days <= 0 and not self.keep_wsi:
            shutil.rmtree(path, True)
            return
        try:
            names = os.listdir(path)
        except FileNotFoundError:
            return
        for name in names:
            target = os.path.join(path, name)
            if name == JOB_FILE or name.startswith(RETIRED_PREFIXES):
                _remove_path(target)
            elif name == WSI_DIR and not self.keep_wsi:
                shutil.rmtree(target, True)
        # The folder's mtime now says when the job ended: prune counts from it.
        os.utime(path)

    def prune(self, keep: set[str], now: float, min_age: float = 600.0) -> Deferred[Any]:
        """Delete job folders whose key is not in ``keep`` (the queued and running jobs).

        A folder still holding ``job.json`` was left by a crash or a stop and goes once
        it is ``min_age`` seconds old (``keep`` was read a moment ago, and a job may
        have started since); a retired one (an ended job's records) is kept for
        ``retention_days``.
        """
        stale_before = now - min_age
        retired_before = min(stale_before, now - self.retention_days * 86400)
        return self._blocking(self._prune, keep, stale_before, retired_before)

    def _prune(self, keep: set[str], stale_before: float, retired_before: float) -> list[str]:
        removed: list[str] = []
        try:
            names = os.listdir(self.root.path)
        except FileNotFoundError:
            return removed
        for name in names:
            if not _KEY.match(name) or name in keep:
                continue
            path = self.root.child(name).path
            try:
                mtime = os.stat(path).st_mtime
                active = os.path.exists(os.path.join(path, JOB_FILE))
            except OSError:
                continue
            if mtime > (stale_before if active else retired_before):
                continue
            shutil.rmtree(path, True)
            removed.append(name)
        if removed:
            log.info("removed {count} old job work folders", count=len(removed))
        return removed

    def _blocking(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        if self.run_blocking is not None:
            return self.run_blocking(f, *args)
        d: Deferred[Any] = Deferred()
        try:
            d.callback(f(*args))
        except Exception:
            d.errback(Failure())
        return d


# --- one job --------------------------------------------------------------------------


class StopReason(StrEnum):
    """Why the daemon stopped a running analysis (decides how the job ends)."""

    CANCEL = "cancel"
    TIMEOUT = "timeout"
    UNRESPONSIVE = "unresponsive"
    SHUTDOWN = "shutdown"


def _observe(d: Deferred[Any]) -> Deferred[None]:
    """A Deferred firing (with None) when ``d`` fires, leaving ``d``'s result alone."""
    waiter: Deferred[None] = Deferred()

    def relay(result: Any) -> Any:
        if not waiter.called:
            waiter.callback(None)
        return result

    d.addBoth(relay)
    return waiter


def _short(text: str, limit: int = _LABEL_ERROR) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _noop(run: JobRun) -> None:
    return None


@define(eq=False)
class JobRun:
    """One claimed job, from dispatch until the spool records its end.

    Collaborators: the ``spool`` holding the job, the ``writer`` for SPS writes, the
    job's ``folders``, the ``clock`` (progress throttling).  ``on_result_gone`` is
    called when the SPS says the job's result was deleted (the supervisor then stops
    the analysis).  Exactly one of the ending coroutines (:meth:`complete`,
    :meth:`fail`, :meth:`cancel`, :meth:`requeue`, :meth:`give_up`) runs; ``ended``
    fires with the job's last record once the spool has it (None if the spool
    refused).
    """

    job: Job
    spool: ISpool
    writer: ResultWriter
    folders: WorkFolders
    clock: IReactorTime
    max_attempts: int = 3
    progress_interval: float = 2.0
    on_result_gone: Callable[[JobRun], None] = _noop
    worker: str = ""
    stored: Result | None = field(default=None, init=False)
    result_gone: bool = field(default=False, init=False)
    cancel_reason: str | None = field(default=None, init=False)
    stop_reason: StopReason | None = field(default=None, init=False)
    last_cancel_check: float = field(default=float("-inf"), init=False)
    ended: Deferred[Job | None] = field(factory=Deferred, init=False)
    _resolving: Deferred[None] | None = field(default=None, init=False)
    _final: bool = field(default=False, init=False)
    _ending: bool = field(default=False, init=False)
    _progress_off: bool = field(default=False, init=False)
    _latest: tuple[int, str] | None = field(default=None, init=False)
    _timer: IDelayedCall | None = field(default=None, init=False)
    _inflight: Deferred[None] | None = field(default=None, init=False)
    _last_write: float = field(default=float("-inf"), init=False)
    _calls: set[Deferred[Any]] = field(factory=set, init=False)
    _aborted: bool = field(default=False, init=False)

    @property
    def job_id(self) -> str:
        return self.job.job_id

    # --- start ------------------------------------------------------------------------

    def prepare(self) -> str:
        """Create the work folder with ``job.json``; return its path (OSError if not)."""
        return self.folders.prepare(self.job).path

    def completed_result(self) -> Result | None:
        """A result an earlier attempt of this job computed but could not store."""
        return self.folders.completed(self.job)

    def read_result(self, path: str) -> Result:
        """The result the worker wrote (:class:`UnusableResult` if it cannot be used)."""
        return self.folders.read_result(self.job, path)

    def use_callback(self, callback: Callback) -> None:
        """A newer request for the job's slide brought ``callback``: the job (and its
        worker, through ``job.json``) use it from now on."""
        if callback == self.job.callback:
            return
        self.job = attrs.evolve(self.job, callback=callback)
        if self._ending:
            return  # the worker is done with the job; its folder is being retired
        try:
            if self.folders.update_job(self.job):
                log.info(
                    "job {job_id}: a newer callback token arrived; handed to its worker",
                    job_id=self.job_id,
                )
        except OSError as e:
            log.warn(
                "job {job_id}: could not hand a newer callback token to its worker ({error})",
                job_id=self.job_id,
                error=str(e),
            )

    def begin(self) -> None:
        """Find (or create) the job's result at the SPS, while the analysis starts."""
        if self._resolving is None:
            self._resolving = ensureDeferred(self._resolve())
            self._resolving.addErrback(
                lambda f: log.failure(
                    "job {job_id}: finding its result failed", f, job_id=self.job_id
                )
            )

    async def _resolve(self) -> None:
        try:
            self.stored = await self._call(self.writer.resolve(self.job))
        except ResultGone:
            self._gone()
            return
        except CancelledError:
            return
        except SPSError as e:
            log.warn(
                "job {job_id}: cannot find or create its result at the SPS ({error}); "
                "no progress will be shown, the final write will try again",
                job_id=self.job_id,
                error=str(e),
            )
            return
        await self._remember_result_id()

    async def _remember_result_id(self) -> None:
        """Record the result id in the spool, so that a delete of it finds this job."""
        stored = self.stored
        if stored is None or stored.id is None or stored.id == self.job.result_id:
            return
        try:
            self.job = await self.spool.update(attrs.evolve(self.job, result_id=stored.id))
        except SpoolError as e:
            log.warn(
                "job {job_id}: could not record result id {result_id} ({error})",
                job_id=self.job_id,
                result_id=stored.id,
                error=str(e),
            )

    def _gone(self) -> None:
        if not self.result_gone:
            self.result_gone = True
            log.info("job {job_id}: its result was deleted at the SPS", job_id=self.job_id)
            self.on_result_gone(self)

    async def _result(self, *, retry: bool) -> Result | None:
        """The stored result to write to; with ``retry``, resolve again if needed."""
        if self.stored is None and self._resolving is not None:
            await _observe(self._resolving)
        if self.stored is not None or not retry:
            return self.stored
        if self.result_gone:
            raise ResultGone(f"the result of job {self.job_id} is gone")
        self.stored = await self._call(self.writer.resolve(self.job))
        await self._remember_result_id()
        return self.stored

    async def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Await an SPS call that :meth:`abort` can cancel."""
        if self._aborted:
            coro.close()
            raise CancelledError()
        d: Deferred[T] = ensureDeferred(coro)
        self._calls.add(d)
        try:
            return await d
        finally:
            self._calls.discard(d)

    def abort(self) -> None:
        """Give up every SPS call in flight (and future ones): the daemon is stopping."""
        self._aborted = True
        self._final = True
        self._cancel_timer()
        for d in list(self._calls):
            d.cancel()

    # --- progress ---------------------------------------------------------------------

    def on_progress(self, percent: int, text: str) -> None:
        """The analysis reported progress: show it, at most once per interval."""
        if self._final or self._progress_off:
            return
        self._latest = (percent, text)
        self._schedule_progress()

    def _schedule_progress(self) -> None:
        if self._inflight is not None or self._timer is not None or self._latest is None:
            return
        due = self._last_write + self.progress_interval
        now = self.clock.seconds()
        if now >= due:
            self._write_progress()
        else:
            self._timer = self.clock.callLater(due - now, self._timer_fired)

    def _timer_fired(self) -> None:
        self._timer = None
        self._write_progress()

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _write_progress(self) -> None:
        latest, self._latest = self._latest, None
        if latest is None or self._final:
            return
        self._last_write = self.clock.seconds()
        d = self._inflight = ensureDeferred(self._put_progress(*latest))

        def done(result: object) -> None:
            self._inflight = None
            if isinstance(result, Failure):
                log.failure("job {job_id}: progress write failed", result, job_id=self.job_id)
            if not self._final:
                self._schedule_progress()

        d.addBoth(done)

    async def _put_progress(self, percent: int, text: str) -> None:
        try:
            stored = await self._result(retry=False)
            if stored is None or self._final:
                return
            frame = self.writer.frame(self.job, Status.RUNNING, text, progress=percent)
            self.stored = await self._call(
                self.writer.update(self.job, stored, frame, keep=is_final)
            )
        except Superseded:
            self._progress_off = True
            log.info(
                "job {job_id}: its result was finished elsewhere; no more progress frames",
                job_id=self.job_id,
            )
        except ResultGone:
            self._gone()
        except CancelledError:
            pass
        except SPSError as e:
            log.warn(
                "job {job_id}: progress update failed ({error})", job_id=self.job_id, error=str(e)
            )

    async def _quiesce(self) -> None:
        """Stop progress frames; wait for the one in flight (the final write is last)."""
        if self._ending:
            raise RuntimeError(f"job {self.job_id} is already ending")
        self._ending = True
        self._final = True
        self._cancel_timer()
        if self._inflight is not None:
            await _observe(self._inflight)

    # --- endings ----------------------------------------------------------------------

    async def complete(self, result: Result) -> None:
        """The analysis produced ``result``: store it in place of the frame; done."""
        await self._quiesce()
        final = self.writer.final(self.job, result)
        try:
            stored = await self._result(retry=True)
            assert stored is not None
            self.stored = await self._call(self.writer.update(self.job, stored, final))
        except ResultGone:
            await self._end(JobState.CANCELLED, "the result was deleted at the SPS")
            return
        except CancelledError:
            # Stopping: result.json stays in the work folder; the next start writes it.
            await self._release(
                count_attempt=False, error="the daemon stopped before the result was stored"
            )
            return
        except SPSError as e:
            await self._failed_attempt(f"could not store the result at the SPS: {e}")
            return
        log.info(
            "job {job_id}: result {result_id} stored", job_id=self.job_id, result_id=self.stored.id
        )
        await self._store_quality_control()
        await self._end(JobState.DONE, None)

    async def _store_quality_control(self) -> None:
        """Send the analysis's QC verdict, if it gave one (IA-API.md §2.7).

        After the result: a verdict the SPS refuses (an older SPS, a QC state changed
        by a user meanwhile) is logged, and the job still counts as done.
        """
        verdict = self.folders.quality_control(self.job)
        if verdict is None:
            return
        status, version_id = verdict
        try:
            await self._call(
                self.writer.sps.set_quality_control(
                    self.writer.callback(self.job),
                    self.job.slide_id,
                    status=status,
                    version_id=version_id,
                    application_version=self.writer.application_version,
                )
            )
        except (SPSError, ValueError) as e:
            log.warn(
                "job {job_id}: the slide's quality-control verdict {status} was not stored: {error}",
                job_id=self.job_id,
                status=status,
                error=str(e),
            )
            return
        log.info("job {job_id}: quality control set to {status}", job_id=self.job_id, status=status)

    async def fail(self, error: str) -> None:
        """The attempt failed (analysis error, crash, timeout): retry or give up."""
        await self._quiesce()
        await self._failed_attempt(error)

    async def cancel(self) -> None:
        """The job was cancelled (or its result deleted): mark the result, end it."""
        await self._quiesce()
        await self._frame(Status.CANCELLED, "cancelled", create=False)
        if self.result_gone:
            reason = "the result was deleted at the SPS"
        else:
            reason = self.cancel_reason or "cancelled"
        await self._end(JobState.CANCELLED, reason)

    async def requeue(self, reason: str) -> None:
        """Put the job back unharmed (no attempt counted): the daemon is stopping."""
        await self._quiesce()
        await self._frame(Status.QUEUED, "queued (the analysis service is restarting)")
        await self._release(count_attempt=False, error=reason)

    async def give_up(self) -> None:
        """Fail a job that already used all its attempts (e.g. it kept killing daemons)."""
        await self._quiesce()
        error = f"gave up after {self.job.attempts} attempts"
        if self.job.last_error:
            error += f"; last error: {self.job.last_error}"
        await self._frame(Status.FAILED, f"failed ({_short(error)})", error=error)
        await self._end(JobState.FAILED, error)

    async def _failed_attempt(self, error: str) -> None:
        attempts = self.job.attempts + 1
        log.warn(
            "job {job_id}: attempt {attempt} of {max_attempts} failed: {error}",
            job_id=self.job_id,
            attempt=attempts,
            max_attempts=self.max_attempts,
            error=error,
        )
        if attempts >= self.max_attempts:
            await self._frame(Status.FAILED, f"failed ({_short(error)})", error=error)
            await self._end(JobState.FAILED, error)
        else:
            await self._frame(
                Status.QUEUED,
                f"retrying after an error (attempt {attempts + 1} of {self.max_attempts})",
                error=error,
            )
            await self._release(count_attempt=True, error=error)

    async def _frame(
        self, status: Status, text: str, *, error: str | None = None, create: bool = True
    ) -> None:
        """Best effort: show ``status`` on the job's result (never re-creating a deleted
        one; with ``create=False`` never creating one at all)."""
        if self.result_gone or self._aborted:
            return
        frame = self.writer.frame(self.job, status, text, error=error)
        try:
            if create:
                stored = await self._result(retry=True)
            else:
                if self._resolving is not None and not self._resolving.called:
                    self._resolving.cancel()  # do not create a result just to cancel it
                stored = self.stored
                if stored is None:
                    found = await self._call(self.writer.find(self.job))
                    if found is not None and _job_of(found) == self.job_id:
                        stored = found
            if stored is None:
                return
            self.stored = await self._call(self.writer.update(self.job, stored, frame))
        except ResultGone:
            self.result_gone = True
        except CancelledError:
            pass
        except SPSError as e:
            log.warn(
                "job {job_id}: could not mark its result {status} ({error})",
                job_id=self.job_id,
                status=status.value.lower(),
                error=str(e),
            )

    async def _end(self, state: JobState, error: str | None) -> None:
        try:
            job = await self.spool.finish(self.job_id, state, error)
        except Exception:
            log.failure(
                "job {job_id}: the spool refused to end it as {state}",
                job_id=self.job_id,
                state=state.value,
            )
            self._ended(None)
            return
        self._remove_folder()
        self._ended(job)

    async def _release(self, *, count_attempt: bool, error: str) -> None:
        try:
            job = await self.spool.release(self.job_id, count_attempt=count_attempt, error=error)
        except Exception:
            log.failure("job {job_id}: the spool refused to release it", job_id=self.job_id)
            self._ended(None)
            return
        if job.state is JobState.CANCELLED:
            # Its cancellation was requested meanwhile: the spool cancelled it instead.
            await self._frame(Status.CANCELLED, "cancelled", create=False)
            self._remove_folder()
        self._ended(job)

    def _remove_folder(self) -> None:
        self.folders.remove(self.job).addErrback(
            lambda f: log.failure(
                "job {job_id}: removing its work folder failed", f, job_id=self.job_id
            )
        )

    def _ended(self, job: Job | None) -> None:
        if not self.ended.called:
            self.ended.callback(job)


def _job_of(result: Result) -> str | None:
    """The job id recorded in one of dpatia's results, if any."""
    mine = (result.data.context or {}).get(CONTEXT_KEY)
    job_id = mine.get("jobId") if isinstance(mine, dict) else None
    return job_id if isinstance(job_id, str) else None


__all__ = [
    "Candidates",
    "JobRun",
    "StopReason",
    "UnusableResult",
    "WorkFolders",
]
