"""Every write of a dpatia result at the SPS, in one place, one result at a time.

A whole-slide analysis keeps one dpatia result annotation per slide (apps cannot delete
results, so the latest one is reused, IA-API.md §3.1); a region analysis (taggedPolygon,
multiArea) has one per region, as the Sectra examples store one per create (§2.6): the
results that record its job key (:func:`~.results.latest`).  Several parties write a
result: the front door ("queued"), the job runner (progress, the final answer,
"failed", "cancelled"), a retry.  :class:`ResultWriter` serialises all writes for one
job key (one whole slide, or one region of it) in this process through a FIFO lock, so
that:

* two parties never both find "no result yet" and create two annotations;
* writes land in the order they were asked for: a "retrying" frame queued before a job
  is released is written before anything the next attempt writes.

Every write uses the newest callback received for the slide (``tokens``, a
:class:`~dpatia_daemon.sps.tokens.TokenBook`), not necessarily the job's own: a job that
waited long may hold an expired token.

Version conflicts (someone outside this process wrote in between) are resolved by the
SPS client's re-read and retry, through a ``reapply`` that may decline to overwrite
(:class:`Superseded`): a progress frame never replaces a final answer.

A result the SPS no longer has (404: a user deleted the annotation) raises
:class:`ResultGone`; nothing here ever re-creates a deleted result behind the user's
back (IA-API.md §3.3).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, TypeVar

import attrs
from attrs import define, field, frozen
from twisted.internet.defer import Deferred, DeferredLock
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from .._version import __version__
from ..jobs import Callback, Job, JobKind
from ..models import Result, ResultData
from .client import QC_STATUSES, SPSClient, SPSError, SPSNotFound
from .info import QUALITY_CONTROL, SPSVersions
from .results import (
    CONTEXT_KEY,
    Status,
    frame_status,
    image_size_of,
    latest,
    region_polygons,
    replacing,
    status_frame,
)
from .tokens import TokenBook

log = Logger()

K = TypeVar("K")
V = TypeVar("V")


def _bounded_put(table: OrderedDict[K, V], key: K, value: V, limit: int) -> None:
    """``table[key] = value`` as the newest entry, dropping the oldest beyond ``limit``."""
    table[key] = value
    table.move_to_end(key)
    while len(table) > limit:
        table.popitem(last=False)


T = TypeVar("T")

#: Frame statuses that end a job: a late progress frame must not replace them.
FINAL_STATUSES = frozenset({Status.DONE, Status.FAILED, Status.CANCELLED})


class ResultGone(Exception):
    """The SPS no longer has the result (a user deleted it)."""


class Superseded(Exception):
    """A conditional write was declined: the stored result must not be overwritten."""

    def __init__(self, current: Result) -> None:
        super().__init__(f"result {current.id} must not be overwritten")
        self.current = current


def final_result(
    result: Result,
    job_id: str,
    slide_id: str,
    application_version: str = __version__,
    *,
    key: str | None = None,
) -> Result:
    """An analysis's result as it is stored at the SPS for job ``job_id``: slide,
    version and bookkeeping set (also what ``dpatia analyse`` writes).  ``key``, the
    job's key, lets a region app find each region's own result again."""
    context = dict(result.data.context or {})
    context[CONTEXT_KEY] = {"jobId": job_id, "status": Status.DONE.value}
    if key is not None:
        context[CONTEXT_KEY]["key"] = key
    return attrs.evolve(
        result,
        slideId=slide_id,
        applicationVersion=result.applicationVersion or application_version,
        data=ResultData(context=context, result=result.data.result),
        id=None,
        versionId=None,
    )


ImageSize = tuple[int, int] | None


@frozen
class ReadAhead:
    """The reads of a "queued" frame, started before the job is committed
    (:meth:`ResultWriter.read_ahead`): the slide's results and, when the frame needs
    it, its size.  Only reads: nothing is written at the SPS before the job is safe on
    disk, so a crash in between leaves no "queued" annotation without a job."""

    key: tuple[str, str, str]
    #: The writer's write count when the reads started (see ``_written``).
    since: int
    results: Deferred[list[Result]]
    size: Deferred[ImageSize] | ImageSize

    def discard(self) -> None:
        """Not used: their errors (if any) are nobody's to report."""
        for d in (self.results, self.size):
            if isinstance(d, Deferred):
                d.addErrback(lambda _: None)


@define
class ResultWriter:
    """Writes a job's result at the SPS: finds or creates it, frames, final answers.

    Collaborators: the ``sps`` client, the ``clock`` (for the wait in :meth:`resolve`),
    and ``display_name`` (the app's name, the first words of every frame); ``tokens``
    (optional) knows the newest callback of each slide.
    ``fresh_grace``: how long :meth:`resolve` waits for the front door to store the
    frame of a brand-new ``create`` request before creating one itself.
    """

    sps: SPSClient
    clock: IReactorTime
    display_name: str
    application_version: str = __version__
    fresh_grace: float = 5.0
    poll_interval: float = 0.5
    tokens: TokenBook | None = None
    #: The SPS versions (``GET /info``, cached): quality control only where it exists.
    versions: SPSVersions | None = None
    _locks: dict[str, DeferredLock] = field(factory=dict, init=False)
    #: The id and versionId of the result last written or read for each job key (and
    #: callback base), newest last: a "queued" frame for a key whose result this
    #: process knows is one PUT, not a listing then a PUT.  Bounded (LRU).
    _known: OrderedDict[tuple[str, str, str], tuple[int, str | None]] = field(
        factory=OrderedDict, init=False, repr=False
    )
    #: Each slide's image size, as its info gave it (for the full-slide frame).
    _sizes: OrderedDict[tuple[str, str], tuple[int, int]] = field(
        factory=OrderedDict, init=False, repr=False
    )
    known_limit: int = 10_000
    #: How many writes (lock-holding steps) have ended, and at which count each key's
    #: last one did (LRU; ``_forgotten`` is the newest count dropped from it): a
    #: :class:`ReadAhead` is only used when no write of its key ended after it began.
    _writes: int = field(default=0, init=False)
    _written: OrderedDict[tuple[str, str, str], int] = field(
        factory=OrderedDict, init=False, repr=False
    )
    _forgotten: int = field(default=0, init=False)

    def callback(self, job: Job) -> Callback:
        """The callback to write ``job``'s result with: the newest for its slide."""
        return job.callback if self.tokens is None else self.tokens.newest(job)

    # --- building ---------------------------------------------------------------------

    def frame(
        self,
        job: Job,
        status: Status,
        text: str,
        *,
        progress: int | None = None,
        error: str | None = None,
        image_size: tuple[int, int] | None = None,
    ) -> Result:
        """A status frame for ``job``: ``"<display name>: <text>"`` on the slide."""
        return status_frame(
            slide_id=job.slide_id,
            status=status,
            text=f"{self.display_name}: {text}",
            job_id=job.job_id,
            application_version=self.application_version,
            image_size=image_size or image_size_of(job.image_info),
            progress=progress,
            error=error,
            key=job.recorded_key,
            region=region_polygons(job.input) if job.is_region else None,
        )

    def final(self, job: Job, result: Result) -> Result:
        """An analysis's result made ready to store: slide, version and bookkeeping set."""
        return final_result(
            result, job.job_id, job.slide_id, self.application_version, key=job.recorded_key
        )

    # --- serialisation ----------------------------------------------------------------

    async def _serialised(self, job: Job, step: Callable[[], Awaitable[T]]) -> T:
        """Run ``step`` holding the lock of ``job``'s key (FIFO, taken at call time): the
        whole slide's for a whole-slide job, its region's for a region job."""
        key = job.key
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = DeferredLock()
        await lock.acquire()
        try:
            outcome = await step()
            if isinstance(outcome, Result) and outcome.id is not None:
                self._remember(job, outcome)
            return outcome
        finally:
            self._note_write(self._known_key(job))
            lock.release()
            # release() hands the lock to the next waiter at once; only an unused lock
            # is dropped, so the table stays as small as the slides being written.
            if not lock.locked and not lock.waiting:
                self._locks.pop(key, None)

    # --- reading ----------------------------------------------------------------------

    async def find(self, job: Job) -> Result | None:
        """The job's stored result, or None: its ``result_id``, else the latest result
        its key may reuse (the slide's for a whole-slide job, the region's own for a
        region job).

        Raises :class:`ResultGone` when the job's own result id is gone.
        """
        if job.result_id is not None:
            try:
                return await self.sps.get_result(
                    self.callback(job), job.application_id, job.result_id
                )
            except SPSNotFound:
                raise ResultGone(f"result {job.result_id} is gone") from None
        results = await self.sps.list_results(self.callback(job), job.application_id, job.slide_id)
        return latest(results, job.key, region=job.is_region)

    async def resolve(self, job: Job) -> Result:
        """The result ``job`` writes to, creating a "queued" frame if the slide has none.

        The same reuse rule as the front door: the job's ``result_id``, else the latest
        result its key may reuse (:meth:`find`), else a new one.  For a fresh ``create``
        request the front door is storing a frame right now (the pathologist's answer),
        so the slide is re-listed for up to ``fresh_grace`` seconds before creating one.
        """
        waited = 0.0
        while True:
            stored = await self._serialised(job, partial(self._find_or_create, job, waited))
            if stored is not None:
                return stored
            # Not under the lock: the front door needs it to store its frame.
            await deferLater(self.clock, self.poll_interval, lambda: None)
            waited += self.poll_interval

    async def _find_or_create(self, job: Job, waited: float) -> Result | None:
        existing = await self.find(job)
        if existing is not None:
            return existing
        fresh = job.kind is JobKind.CREATE and job.attempts == 0
        if fresh and waited < self.fresh_grace:
            return None
        stored = await self.sps.create_result(
            self.callback(job), job.application_id, self.frame(job, Status.QUEUED, "queued")
        )
        log.info(
            "job {job_id}: created result {result_id} on slide {slide_id}",
            job_id=job.job_id,
            result_id=stored.id,
            slide_id=job.slide_id,
        )
        return stored

    # --- writing ----------------------------------------------------------------------

    async def update(
        self,
        job: Job,
        stored: Result,
        new: Result,
        *,
        keep: Callable[[Result], bool] | None = None,
    ) -> Result:
        """Replace ``stored`` (id + versionId) with ``new``; return what the SPS stored.

        On a version conflict the current result is re-read; if ``keep(current)`` is
        true it is left alone and :class:`Superseded` raised.  A 404 raises
        :class:`ResultGone`.
        """

        def reapply(current: Result) -> Result:
            if keep is not None and keep(current):
                raise Superseded(current)
            return replacing(current, new)

        async def put() -> Result:
            try:
                return await self.sps.update_result(
                    self.callback(job), job.application_id, replacing(stored, new), reapply=reapply
                )
            except SPSNotFound:
                raise ResultGone(f"result {stored.id} is gone") from None

        return await self._serialised(job, put)

    async def update_current(
        self, job: Job, result_id: int, new: Result, *, keep: Callable[[Result], bool] | None
    ) -> Result:
        """Read result ``result_id`` and replace it with ``new`` unless ``keep(current)``."""

        async def read_and_put() -> Result:
            try:
                current = await self.sps.get_result(
                    self.callback(job), job.application_id, result_id
                )
            except SPSNotFound:
                raise ResultGone(f"result {result_id} is gone") from None
            if keep is not None and keep(current):
                raise Superseded(current)

            def reapply(latest_: Result) -> Result:
                if keep is not None and keep(latest_):
                    raise Superseded(latest_)
                return replacing(latest_, new)

            try:
                return await self.sps.update_result(
                    self.callback(job), job.application_id, replacing(current, new), reapply=reapply
                )
            except SPSNotFound:
                raise ResultGone(f"result {result_id} is gone") from None

        return await self._serialised(job, read_and_put)

    def _note_write(self, key: tuple[str, str, str]) -> None:
        self._writes += 1
        self._written.pop(key, None)
        self._written[key] = self._writes
        if len(self._written) > self.known_limit:
            _, count = self._written.popitem(last=False)
            self._forgotten = max(self._forgotten, count)

    def read_ahead(
        self,
        job: Job,
        image_size: ImageSize | Callable[[], Deferred[ImageSize]],
    ) -> ReadAhead | None:
        """Start the reads :meth:`store_queued_frame` will make for a job about to be
        committed (the slide's results, and its size when ``image_size`` is a function
        reading it), so that they overlap the commit; None when it would make none
        (this process knows the key's result: the frame is one PUT)."""
        key = self._known_key(job)
        known_size = (
            self._sizes.get((job.callback.url, job.slide_id)) if callable(image_size) else image_size
        )
        if job.result_id is not None or (
            key in self._known and (known_size is not None or job.is_region)
        ):
            return None
        size: Deferred[ImageSize] | ImageSize = known_size
        if known_size is None and callable(image_size):
            size = image_size()
        results = Deferred.fromCoroutine(
            self.sps.list_results(self.callback(job), job.application_id, job.slide_id)
        )
        return ReadAhead(key=key, since=self._writes, results=results, size=size)

    def _usable(self, ahead: ReadAhead | None, job: Job) -> ReadAhead | None:
        """``ahead`` if it read what :meth:`find` would read now, for ``job`` as
        committed (a merge may have given it a result id) and with no write of its key
        ended since it began; else None (and it is discarded)."""
        if ahead is None:
            return None
        fresh = self._written.get(ahead.key, self._forgotten) <= ahead.since
        if fresh and job.result_id is None and ahead.key == self._known_key(job):
            return ahead
        ahead.discard()
        return None

    async def store_queued_frame(
        self,
        job: Job,
        image_size: tuple[int, int] | None | Callable[[], Deferred[tuple[int, int] | None]],
        still_queued: Callable[[], Awaitable[bool]],
        ahead: ReadAhead | None = None,
    ) -> Result:
        """The front door's "queued" frame: create or update the job's result (:meth:`find`).

        Under the job key's lock, so the job runner never creates a second one.  An
        existing result is only overwritten while ``still_queued()``: once a worker
        has the job, its frames (and its answer) win and the result is returned
        unchanged.  With no result at all, the frame is created either way (a
        ``create`` must answer with a stored result; the runner then finds it).
        ``image_size`` may be a function starting the read of the slide's info: it is
        then read while the slide's results are, one round trip instead of two.  When
        this process knows the key's result (its id and version) and the slide's size,
        the frame is one PUT, and neither is read.  ``ahead`` (:meth:`read_ahead`) holds
        those reads already under way, used when they are still what would be read.
        """

        async def write() -> Result:
            key = self._known_key(job)
            known = self._known.get(key)
            started = self._usable(ahead, job)
            size: Any = image_size
            if callable(image_size):
                size = self._sizes.get((job.callback.url, job.slide_id))
            if (
                started is None
                and known is not None
                and job.result_id in (None, known[0])
                and (size is not None or job.is_region)
            ):
                stored = await self._update_known(job, known, size, still_queued)
                if stored is not None:
                    return stored
            if started is not None:
                size = started.size
            elif callable(image_size):
                size = image_size()  # read while the results are
            try:
                if started is not None:
                    existing = latest(await started.results, job.key, region=job.is_region)
                else:
                    existing = await self.find(job)
                if isinstance(size, Deferred):
                    size = await size
            except BaseException:
                if isinstance(size, Deferred):
                    size.addErrback(lambda _: None)  # the results' error is the one said
                raise
            if size is not None:
                _bounded_put(self._sizes, (job.callback.url, job.slide_id), size, self.known_limit)
            frame = self.frame(job, Status.QUEUED, "queued", image_size=size)
            if existing is not None and not await still_queued():
                return existing
            if existing is not None:
                return await self.sps.update_result(
                    self.callback(job),
                    job.application_id,
                    replacing(existing, frame),
                    reapply=lambda current: replacing(current, frame),
                )
            return await self.sps.create_result(self.callback(job), job.application_id, frame)

        return await self._serialised(job, write)

    async def _update_known(
        self,
        job: Job,
        known: tuple[int, str | None],
        image_size: tuple[int, int] | None,
        still_queued: Callable[[], Awaitable[bool]],
    ) -> Result | None:
        """The "queued" frame PUT straight onto the result this process knows for the
        job's key (a version conflict re-reads it, as any update does); None when the
        job is no longer queued or the result is gone: then the slide is read as usual."""
        if not await still_queued():
            return None
        frame = self.frame(job, Status.QUEUED, "queued", image_size=image_size)
        stub = Result(slideId=job.slide_id, id=known[0], versionId=known[1])
        try:
            return await self.sps.update_result(
                self.callback(job),
                job.application_id,
                replacing(stub, frame),
                reapply=lambda current: replacing(current, frame),
            )
        except SPSNotFound:
            self._known.pop(self._known_key(job), None)  # deleted at the SPS meanwhile
            return None

    def _known_key(self, job: Job) -> tuple[str, str, str]:
        return (job.callback.url, job.application_id, job.key)

    def _remember(self, job: Job, result: Result) -> None:
        assert result.id is not None
        _bounded_put(
            self._known, self._known_key(job), (result.id, result.versionId), self.known_limit
        )

    # --- the slide's quality control --------------------------------------------------

    async def quality_control(self, job: Job, status: str, version_id: str | None) -> str:
        """Set the QC status of ``job``'s slide (IA-API.md §2.7), with the newest callback
        and under the job key's lock, like every other write of the job; what was done.

        Only where the SPS has it (IA-API 1.10, from ``versions`` when known) and never
        with ``versionId: null``: the slide's QC ``versionId`` is read again just before
        the write (a long analysis can make the one in the job's metadata stale);
        ``version_id``, from that metadata, is used only when the re-read fails.
        Without any, the verdict is skipped (``"skipped: ..."``, logged by the caller).
        ValueError for a status the IA-API does not know.
        """
        if status not in QC_STATUSES:
            raise ValueError(f"unknown QC status {status!r}; expected one of {sorted(QC_STATUSES)}")

        async def put() -> str:
            callback = self.callback(job)
            if self.versions is not None:
                has_qc = await self.versions.supports(callback, QUALITY_CONTROL)
                if has_qc is False:
                    known = self.versions.known(callback)
                    return (
                        f"skipped: the SPS has IA-API {known.apiVersion if known else '?'}, "
                        f"quality control needs {QUALITY_CONTROL}"
                    )
            current = version_id
            try:
                info = await self.sps.slide_info(callback, job.slide_id, extended=True)
            except SPSError as e:
                if current is None:
                    return f"skipped: the slide's QC versionId could not be read ({e})"
            else:
                current = qc_version_of(info)
                if current is None:
                    return (
                        "skipped: the slide info has no qualityControl versionId "
                        "(an SPS before IA-API 1.10?)"
                    )
            await self.sps.set_quality_control(
                callback,
                job.slide_id,
                status=status,
                version_id=current,
                application_version=self.application_version,
            )
            return "stored"

        return await self._serialised(job, put)


def qc_version_of(slide_info: object) -> str | None:
    """The ``versionId`` of the slide's QC state in its metadata (IA-API 1.10), if any."""
    qc = slide_info.get("qualityControl") if isinstance(slide_info, dict) else None
    version = qc.get("versionId") if isinstance(qc, dict) else None
    return version if isinstance(version, str) and version else None


def is_final(result: Result) -> bool:
    """Whether ``result`` is one of dpatia's final states (done, failed, cancelled)."""
    return frame_status(result) in FINAL_STATUSES


__all__ = [
    "FINAL_STATUSES",
    "ResultGone",
    "ResultWriter",
    "Superseded",
    "is_final",
    "qc_version_of",
]
