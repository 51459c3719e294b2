"""The daemon's Prometheus metrics: what they are, how they are counted, how they are read.

Every metric name is in :data:`COUNTERS`, :data:`GAUGES` or :data:`HISTOGRAMS` (the
Grafana dashboard ``etc/grafana/dpatia.json`` uses only these; a test checks it).

Counting is cheap on purpose: the front door's ack path adds one to a plain dict
(:meth:`Metrics.count`), never a lock, a listing or a file read.  What needs the spool
(jobs by state, the oldest queued job, free bytes) is read once per scrape by the
collector from a :class:`SpoolView`, refreshed in the spool's thread pool just before
the scrape is rendered (:mod:`.admin`), and at most once a second however often it is
scraped.

Where the numbers come from:

* the front door (``IAAPI.tally``): requests accepted, notifications filtered, queued
  jobs cancelled;
* the workers' events (:meth:`Metrics.event`, a :class:`~..workers.events.SupervisorEvent`
  observer): jobs ended and deferred, worker exits by cause, and each step's duration.
  The steps before the analysis and the analysis itself are timed in the worker
  process and sent to the daemon with the ``StepDone`` AMP command (with the worker's
  SPS calls since its previous report, and the bytes a download fetched); ``store``
  is timed here, from the analysis's ``StepDone`` to the job's end as done (the
  result and QC writes at the SPS, then the spool);
* every SPS client of the daemon (``SPSClient.on_answer``): each attempt by endpoint
  template and status class.

With ``[server] processes`` > 1 each extra front door counts in its own process and
writes its totals (``counts <json>``, at most once a second while they change) on the
pipe it already uses for job notices; the main process keeps the latest totals of each
copy, adds those of copies that ended, and exports the sum (:meth:`Metrics.counted`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from attrs import define, field
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from ..jobs import Job, JobState
from ..spool import ISpool, SpoolRoom
from ..workers.events import SupervisorEvent
from ..workers.run import observe
from ..workers.timers import every

log = Logger()

#: Counters: name (without ``_total``, which the exposition adds) → (help, labels).
COUNTERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "dpatia_jobs_accepted": (
        "Requests accepted into the spool (a request merged into a queued job counts), by kind",
        ("kind",),
    ),
    "dpatia_notifications_filtered": (
        "Image notifications not taken ([notifications] rules): nothing stored",
        (),
    ),
    "dpatia_jobs_ended": ("Jobs ended, by final state (done, failed, cancelled)", ("state",)),
    "dpatia_jobs_deferred": (
        "Attempts put back in the queue to wait: sps, host (transient, no attempt spent), "
        "error (the retry of a failed attempt)",
        ("kind",),
    ),
    "dpatia_download_bytes": ("Bytes of WSI files fetched by completed download steps", ()),
    "dpatia_worker_restarts": (
        "Worker processes that exited (each is replaced while the daemon runs), by cause",
        ("cause",),
    ),
    "dpatia_sps_requests": (
        "Calls to the SPS callback API (each attempt), by endpoint template and status class",
        ("endpoint", "status"),
    ),
}

#: Gauges read at scrape time: name → help (their labels are in :meth:`_Collector.collect`).
GAUGES: dict[str, str] = {
    "dpatia_jobs": "Jobs in the spool by state (every daemon on the spool)",
    "dpatia_deferred_jobs": "Queued jobs waiting for their next try",
    "dpatia_oldest_queued_job_age_seconds": "Age of the oldest queued job (0: none)",
    "dpatia_spool_free_bytes": "Bytes free to the daemon on the spool's filesystem",
    "dpatia_workers": "Worker processes of this daemon by state",
    "dpatia_sps_failing": "SPSes this daemon currently holds jobs back for",
    "dpatia_front_doors_reporting": "Extra front-door processes whose counts are included",
}

#: Histograms: name → (help, labels, buckets).
HISTOGRAMS: dict[str, tuple[str, tuple[str, ...], tuple[float, ...]]] = {
    "dpatia_step_duration_seconds": (
        "Duration of each step of a job's attempt: metadata, thumbnail, label, download, "
        "analysis (timed in the worker), store (the result's write)",
        ("step",),
        (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
    ),
}

#: The steps the histogram knows (anything else a worker sends is ignored).
STEPS = frozenset({"metadata", "thumbnail", "label", "download", "analysis", "store"})

#: What the front door's ``tally(what, *labels)`` counts.
_TALLY = {
    "accepted": "dpatia_jobs_accepted",
    "filtered": "dpatia_notifications_filtered",
}

Key = tuple[str, tuple[str, ...]]


def metric_names() -> frozenset[str]:
    """Every series name dpatia exports (counters with ``_total``, histograms with their
    ``_bucket``/``_sum``/``_count``)."""
    names = {f"{name}_total" for name in COUNTERS} | set(GAUGES)
    for name in HISTOGRAMS:
        names |= {name, f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    return frozenset(names)


def _known(key: Any) -> bool:
    """Whether ``key`` (from a copy's JSON) names a counter with the right labels."""
    return (
        isinstance(key, tuple)
        and len(key) == 2
        and key[0] in COUNTERS
        and isinstance(key[1], tuple)
        and len(key[1]) == len(COUNTERS[key[0]][1])
        and all(isinstance(v, str) for v in key[1])
    )


#: A queued record's name (``queued/<key>.json``, see :mod:`dpatia_daemon.spool`).
_QUEUED_NAME = re.compile(r"[0-9a-f]{2,64}\.json\Z")
#: The two fields the gauges need, as ``Job.to_json`` writes them (sorted keys).
_CREATED = re.compile(rb'"created": (-?[0-9][0-9.eE+-]*)')
_NOT_BEFORE = re.compile(rb'"not_before": (null|-?[0-9][0-9.eE+-]*)')


@define(eq=False)
class QueueTimes:
    """When each queued job was accepted and when it may run: read from the files of a
    spool directory's ``queued/``, two numbers per record, each file read once (a
    cache by name and inode), never parsed into a :class:`Job`.

    A scrape must cost little however long the queue: this reads only the records new
    since the last scrape, a few microseconds each.  Blocking: run it in a thread.
    """

    directory: str
    _cache: dict[str, tuple[int, float, float | None]] = field(factory=dict)

    def read(self) -> list[tuple[float, float | None]]:
        """(created, not_before) of every queued record."""
        fresh: dict[str, tuple[int, float, float | None]] = {}
        try:
            entries = list(os.scandir(self.directory))
        except FileNotFoundError:
            entries = []
        for entry in entries:
            if not _QUEUED_NAME.match(entry.name):
                continue
            # The spool replaces a queued record by a rename (a merge, a release), never
            # in place: the inode, which the listing gives without a stat, tells a
            # record already read.
            inode = entry.inode()
            known = self._cache.get(entry.name)
            if known is not None and known[0] == inode:
                fresh[entry.name] = known
                continue
            try:
                with open(entry.path, "rb") as f:
                    data = f.read()
            except OSError:
                continue  # claimed or merged while we looked
            times = _times(data)
            if times is not None:
                fresh[entry.name] = (inode, *times)
        self._cache = fresh
        return [(created, not_before) for _, created, not_before in fresh.values()]


def _times(data: bytes) -> tuple[float, float | None] | None:
    """(created, not_before) of a job record, or None if it has none (a torn record:
    the spool's own listing reports those)."""
    created, not_before = _CREATED.search(data), _NOT_BEFORE.search(data)
    try:
        if created is not None:
            later = not_before.group(1) if not_before is not None else b"null"
            return float(created.group(1)), None if later == b"null" else float(later)
        job = json.loads(data)
        return float(job["created"]), job.get("not_before")
    except (ValueError, KeyError, TypeError):
        return None


@define(eq=False)
class SpoolView:
    """What the metrics and the status page read of the spool, fetched together.

    ``refresh()`` reads the counts, the free space and the queued jobs' times (of a
    directory spool through :class:`QueueTimes`, in ``run_blocking``; of any other by
    ``queued()``); ``refresh(jobs=True)`` (the status page) the queued jobs themselves.
    Nothing is read again within ``max_age`` seconds of ``clock`` (a scraper in a loop
    cannot make the daemon list its spool more often), and a job that ended here makes
    the next read fresh (:meth:`Metrics.event`).  One read at a time.
    """

    spool: ISpool
    clock: IReactorTime
    run_blocking: Callable[..., Deferred[Any]] = maybeDeferred
    max_age: float = 1.0
    counts: dict[JobState, int] = field(factory=dict)
    #: (created, not_before) of every queued job.
    times: list[tuple[float, float | None]] = field(factory=list)
    queued: list[Job] = field(factory=list)
    room: SpoolRoom | None = None
    read_at: float | None = None
    _jobs_at: float | None = None
    _reading: Deferred[None] | None = None
    _queue_times: QueueTimes | None = None

    def __attrs_post_init__(self) -> None:
        directory = getattr(self.spool, "directory", None)
        if directory is not None:
            self._queue_times = QueueTimes(os.path.join(directory.path, JobState.QUEUED.value))

    async def refresh(self, jobs: bool = False) -> SpoolView:
        """Read the spool again if the last read is too old; return self."""
        while self._reading is not None:
            await observe(self._reading)
        now = self.clock.seconds()
        fresh = self.read_at is not None and now - self.read_at < self.max_age
        if fresh and (
            not jobs or (self._jobs_at is not None and now - self._jobs_at < self.max_age)
        ):
            return self
        reading = self._reading = Deferred.fromCoroutine(self._read(jobs))
        try:
            await reading  # its error is this scrape's (a 503); the others read again
        finally:
            self._reading = None
        return self

    async def _read(self, jobs: bool) -> None:
        self.counts = await self.spool.counts()
        self.room = await self.spool.room()
        if jobs or self._queue_times is None:
            self.queued = await self.spool.queued()
            self.times = [(job.created, job.not_before) for job in self.queued]
            self._jobs_at = self.clock.seconds()
        else:
            self.times = await self.run_blocking(self._queue_times.read)
        self.read_at = self.clock.seconds()

    def oldest_age(self) -> float:
        """Seconds since the oldest queued job was accepted (0 with none queued)."""
        if not self.times or self.read_at is None:
            return 0.0
        return max(0.0, self.read_at - min(created for created, _ in self.times))

    def deferred_count(self) -> int:
        """How many queued jobs wait for a later try."""
        at = self.read_at or 0.0
        return sum(1 for _, not_before in self.times if not_before is not None and not_before > at)

    def deferred(self) -> list[Job]:
        """The queued jobs (as of the last ``refresh(jobs=True)``) that wait for a later try."""
        at = self.read_at or 0.0
        return [job for job in self.queued if not job.ready(at)]


@define(eq=False)
class Metrics:
    """This process's counts and step timings, and the collector that exports them.

    Collaborators: the ``clock`` (the store step's timing), and at scrape time the
    ``view`` of the spool, ``workers`` (a ``snapshot()`` of worker slots, None without
    workers) and ``failing`` (the SPSes held back for).  ``registry`` is this
    daemon's own: nothing is registered in prometheus_client's global one.
    """

    clock: IReactorTime
    view: SpoolView | None = None
    workers: Any = None
    failing: Any = None
    registry: CollectorRegistry = field(factory=lambda: CollectorRegistry(auto_describe=True))
    #: Changed on every count (a copy sends its totals only when it moved).
    version: int = 0
    _counts: dict[Key, float] = field(factory=dict)
    _copies: dict[int, dict[Key, float]] = field(factory=dict)
    _retired: dict[Key, float] = field(factory=dict)
    _answered: dict[str, float] = field(factory=dict)
    _histograms: dict[str, Histogram] = field(factory=dict)

    def __attrs_post_init__(self) -> None:
        for name, (text, labels, buckets) in HISTOGRAMS.items():
            self._histograms[name] = Histogram(
                name, text, labels, registry=self.registry, buckets=buckets
            )
        self.registry.register(_Collector(self))

    # --- counting (cheap: these run on the ack path) ----------------------------------

    def add(self, name: str, labels: tuple[str, ...] = (), amount: float = 1) -> None:
        """Add ``amount`` to counter ``name`` with ``labels``."""
        key = (name, labels)
        self._counts[key] = self._counts.get(key, 0) + amount
        self.version += 1

    def count(self, what: str, *labels: str) -> None:
        """The front door's tally: ``accepted`` (kind), ``filtered``, ``cancelled``."""
        if what == "cancelled":
            self.add("dpatia_jobs_ended", ("cancelled",))
        else:
            self.add(_TALLY[what], labels)

    def sps_answered(self, endpoint: str, status: str) -> None:
        """One attempt of an SPS call ended with ``status`` (``2xx`` … or ``error``)."""
        self.add("dpatia_sps_requests", (endpoint, status))

    def step(self, step: str, seconds: float) -> None:
        """Step ``step`` of an attempt took ``seconds``."""
        if step in STEPS:
            self._histograms["dpatia_step_duration_seconds"].labels(step).observe(seconds)

    # --- the workers' events ----------------------------------------------------------

    def event(self, event: SupervisorEvent) -> None:
        """A :class:`SupervisorEvent` of the workers: count what it says."""
        detail = event.detail
        if event.kind == "job-step":
            self._job_step(event.job_id, detail)
        elif event.kind == "job-ended":
            if self.view is not None:
                self.view.read_at = None  # the next scrape shows the job where it went
            answered = self._answered.pop(event.job_id or "", None)
            state = detail.get("state")
            if state in ("done", "failed", "cancelled"):
                self.add("dpatia_jobs_ended", (state,))
                if state == "done" and answered is not None:
                    self.step("store", max(0.0, self.clock.seconds() - answered))
            elif state == "queued" and detail.get("deferral") is not None:
                self.add("dpatia_jobs_deferred", (str(detail["deferral"]),))
        elif event.kind == "worker-exited":
            self.add("dpatia_worker_restarts", (str(detail.get("cause") or "crash"),))

    def _job_step(self, job_id: str | None, detail: Mapping[str, Any]) -> None:
        step = str(detail.get("step"))
        self.step(step, float(detail.get("seconds") or 0.0))
        if step == "download" and detail.get("size"):
            self.add("dpatia_download_bytes", (), int(detail["size"]))
        if step == "analysis" and job_id is not None:
            self._answered[job_id] = self.clock.seconds()
        try:
            requests = json.loads(detail.get("requests") or "{}")
        except ValueError:
            requests = {}
        if not isinstance(requests, dict):
            return
        for name, n in requests.items():
            endpoint, _, status = str(name).rpartition(" ")
            if endpoint and isinstance(n, int) and n > 0:
                self.add("dpatia_sps_requests", (endpoint, status), n)

    # --- the extra front doors --------------------------------------------------------

    def totals_line(self) -> bytes:
        """This process's totals as the line a front-door copy sends (:data:`COUNTS_PREFIX`
        is added by the caller)."""
        rows = [[name, list(labels), value] for (name, labels), value in self._counts.items()]
        return json.dumps(rows, separators=(",", ":")).encode("utf-8")

    def counted(self, number: int, payload: bytes | None) -> None:
        """Front door ``number`` sent its totals (``payload``), or ended (None)."""
        if payload is None:
            for key, value in self._copies.pop(number, {}).items():
                self._retired[key] = self._retired.get(key, 0) + value
            return
        try:
            rows = json.loads(payload)
            totals = {(str(name), tuple(labels)): float(value) for name, labels, value in rows}
        except (ValueError, TypeError):
            log.warn("front door {number} sent counts that do not parse", number=number)
            return
        self._copies[number] = {key: value for key, value in totals.items() if _known(key)}

    def totals(self) -> dict[Key, float]:
        """Every counter's value: this process, its front doors, and those that ended."""
        out = dict(self._retired)
        for source in (self._counts, *self._copies.values()):
            for key, value in list(source.items()):
                out[key] = out.get(key, 0) + value
        return out


class _Collector(Collector):
    """Yields the counters' totals and the gauges read at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        metrics = self.metrics
        families = {
            name: CounterMetricFamily(name, text, labels=labels)
            for name, (text, labels) in COUNTERS.items()
        }
        for (name, labels), value in sorted(metrics.totals().items()):
            families[name].add_metric(labels, value)
        yield from families.values()
        yield from self._gauges()

    def _gauges(self) -> Iterator[Metric]:
        metrics = self.metrics
        view = metrics.view
        if view is not None and view.read_at is not None:
            jobs = GaugeMetricFamily("dpatia_jobs", GAUGES["dpatia_jobs"], labels=["state"])
            for state in JobState:
                jobs.add_metric([state.value], view.counts.get(state, 0))
            yield jobs
            yield GaugeMetricFamily(
                "dpatia_deferred_jobs", GAUGES["dpatia_deferred_jobs"], view.deferred_count()
            )
            name = "dpatia_oldest_queued_job_age_seconds"
            yield GaugeMetricFamily(name, GAUGES[name], view.oldest_age())
            if view.room is not None:
                name = "dpatia_spool_free_bytes"
                yield GaugeMetricFamily(name, GAUGES[name], view.room.free_bytes)
        if metrics.workers is not None:
            states: dict[str, int] = {}
            for slot in metrics.workers.snapshot():
                states[slot["state"]] = states.get(slot["state"], 0) + 1
            workers = GaugeMetricFamily(
                "dpatia_workers", GAUGES["dpatia_workers"], labels=["state"]
            )
            for name in ("starting", "idle", "busy", "stopping", "dead"):
                workers.add_metric([name], states.get(name, 0))
            yield workers
        if metrics.failing is not None:
            name = "dpatia_sps_failing"
            yield GaugeMetricFamily(name, GAUGES[name], len(metrics.failing()))
        name = "dpatia_front_doors_reporting"
        yield GaugeMetricFamily(name, GAUGES[name], len(metrics._copies))


@define(eq=False)
class CountsReporter(Service):
    """In an extra front door: send this process's totals to the main process every
    ``interval`` seconds while they change, and once more at stop.

    ``send(line)`` writes one line on the copy's pipe (``ParentLink.send``); ``prefix``
    starts it (``COUNTS_PREFIX``).
    """

    clock: IReactorTime
    metrics: Metrics
    send: Any
    prefix: bytes
    interval: float = 1.0
    _sent: int = field(default=0, init=False)
    _loop: LoopingCall | None = field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        Service.__init__(self)

    def startService(self) -> None:
        super().startService()
        self._loop = every(self.clock, self.interval, self._report, now=False)

    def _report(self) -> None:
        if self.metrics.version != self._sent:
            self._sent = self.metrics.version
            self.send(self.prefix + self.metrics.totals_line())

    def stopService(self) -> None:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        self._report()


__all__ = [
    "COUNTERS",
    "GAUGES",
    "HISTOGRAMS",
    "STEPS",
    "CountsReporter",
    "Metrics",
    "SpoolView",
    "metric_names",
]
