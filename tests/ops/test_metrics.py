"""The Prometheus metrics (``ops/metrics.py``) and the admin listener (``ops/admin.py``):
counting in memory, the front doors' totals, the scrape in memory, and a real daemon
whose ``/metrics`` moves as a job runs."""

from __future__ import annotations

import json
import re
import signal
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from attrs import evolve as attrs_evolve
from conftest import Loopback, success_result_of, write_config
from prometheus_client.parser import text_string_to_metric_families
from treq.testing import StubTreq
from twisted.internet.task import Clock, deferLater

from dpatia_daemon.config import ConfigError, load_config
from dpatia_daemon.frontdoor.processes import COUNTS_PREFIX, FrontDoors, _Copy
from dpatia_daemon.jobs import Callback, Job, JobKind
from dpatia_daemon.ops.admin import admin_listener, admin_resource
from dpatia_daemon.ops.metrics import CountsReporter, Metrics, SpoolView, metric_names
from dpatia_daemon.ops.status import StatusBoard
from dpatia_daemon.simulator.daemon_process import DaemonProcess
from dpatia_daemon.spool import MemorySpool
from dpatia_daemon.workers.events import SupervisorEvent
from dpatia_daemon.workers.pool import Slot, Worker, exit_cause

ROOT = Path(__file__).resolve().parent.parent.parent
ADMIN_LINE = rb"admin listener on http://127\.0\.0\.1:(\d+)/status"


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, parsed by prometheus_client's own parser."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name, tuple(sorted(s.labels.items()))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float:
    return samples(text).get((name, tuple(sorted(labels.items()))), 0.0)


def scrape(metrics: Metrics, board: StatusBoard | None = None) -> str:
    """GET /metrics of the admin resource, in memory."""
    stub = StubTreq(admin_resource(metrics, board or StatusBoard(Clock(), metrics.view)))  # type: ignore[arg-type]
    response = success_result_of(stub.get("http://admin/metrics"))
    assert response.code == 200
    assert response.headers.getRawHeaders(b"content-type")[0].startswith(b"text/plain")
    return success_result_of(stub.content(response)).decode()


def test_counts_from_the_front_door_and_the_workers_events() -> None:
    """The front door's tally, the SPS client's answers and the workers' events become
    the counters and the step histogram; store is timed from the analysis step to done."""
    clock = Clock()
    metrics = Metrics(clock)
    metrics.count("accepted", "create")
    metrics.count("accepted", "notification")
    metrics.count("filtered")
    metrics.count("cancelled")
    metrics.sps_answered("GET slides/{id}/info", "2xx")
    requests = json.dumps({"GET images/{id}_files/{level}/{col}_{row}.{ext} 2xx": 7})
    for step, seconds in (("metadata", 0.2), ("thumbnail", 1.5), ("download", 3.0)):
        metrics.event(
            SupervisorEvent(
                "job-step",
                "1.1",
                "a" * 32,
                {"step": step, "seconds": seconds, "size": 1000, "requests": requests},
            )
        )
    metrics.event(
        SupervisorEvent("job-step", "1.1", "a" * 32, {"step": "analysis", "seconds": 4.0})
    )
    clock.advance(0.75)
    metrics.event(SupervisorEvent("job-ended", None, "a" * 32, {"state": "done"}))
    metrics.event(
        SupervisorEvent("job-ended", None, "b" * 32, {"state": "queued", "deferral": "sps"})
    )
    metrics.event(SupervisorEvent("job-ended", None, "c" * 32, {"state": "failed"}))
    metrics.event(SupervisorEvent("worker-exited", "1.1", None, {"cause": "unresponsive"}))
    text = scrape(metrics)
    assert value(text, "dpatia_jobs_accepted_total", kind="create") == 1
    assert value(text, "dpatia_jobs_accepted_total", kind="notification") == 1
    assert value(text, "dpatia_notifications_filtered_total") == 1
    assert value(text, "dpatia_jobs_ended_total", state="cancelled") == 1
    assert value(text, "dpatia_jobs_ended_total", state="done") == 1
    assert value(text, "dpatia_jobs_ended_total", state="failed") == 1
    assert value(text, "dpatia_jobs_deferred_total", kind="sps") == 1
    assert value(text, "dpatia_worker_restarts_total", cause="unresponsive") == 1
    assert value(text, "dpatia_download_bytes_total") == 1000
    tiles = "GET images/{id}_files/{level}/{col}_{row}.{ext}"
    assert value(text, "dpatia_sps_requests_total", endpoint=tiles, status="2xx") == 21
    info = "GET slides/{id}/info"
    assert value(text, "dpatia_sps_requests_total", endpoint=info, status="2xx") == 1
    for step in ("metadata", "thumbnail", "download", "analysis", "store"):
        assert value(text, "dpatia_step_duration_seconds_count", step=step) == 1
    assert value(text, "dpatia_step_duration_seconds_sum", step="store") == 0.75
    assert value(text, "dpatia_step_duration_seconds_bucket", step="thumbnail", le="1.0") == 0


def test_the_extra_front_doors_totals_are_added_and_kept_when_one_ends() -> None:
    """A copy's totals line (as the pipe carries it) adds to the main process's; a new
    line replaces the copy's old totals; when the copy ends they are kept (retired),
    and a restarted copy counts from zero on top."""
    main, copy = Metrics(Clock()), Metrics(Clock())
    main.count("accepted", "create")
    copy.count("accepted", "create")
    copy.count("accepted", "create")
    doors = FrontDoors(
        reactor=Clock(),
        count=1,
        port=None,  # type: ignore[arg-type]
        listen="tcp:0",
        argv=[],
        notice=None,  # type: ignore[arg-type]
        on_counts=main.counted,
    )
    pipe = _Copy(doors, Worker(slot=Slot(number=1, backoff=None), name="1", started=0))  # type: ignore[arg-type]
    line = COUNTS_PREFIX + copy.totals_line() + b"\n"
    pipe.childDataReceived(3, line[:10])
    pipe.childDataReceived(3, line[10:])
    key = ("dpatia_jobs_accepted", ("create",))
    assert main.totals()[key] == 3
    pipe.childDataReceived(3, line)  # the same totals again: not added twice
    assert main.totals()[key] == 3
    doors.counted(1, None)  # the copy ended
    assert main.totals()[key] == 3
    restarted = Metrics(Clock())
    restarted.count("accepted", "create")
    pipe.childDataReceived(3, COUNTS_PREFIX + restarted.totals_line() + b"\n")
    assert main.totals()[key] == 4
    pipe.childDataReceived(3, COUNTS_PREFIX + b'[["no_such_metric", [], 5]]\n')
    assert main.totals() == {key: 3}


def test_a_front_door_copy_reports_only_when_its_counts_moved() -> None:
    """CountsReporter sends the totals every interval while they change, and once
    more at stop; nothing while they stand still."""
    clock, metrics, lines = Clock(), Metrics(Clock()), []
    reporter = CountsReporter(clock, metrics, lines.append, COUNTS_PREFIX, interval=1.0)
    reporter.startService()
    clock.advance(1)
    assert lines == []
    metrics.count("filtered")
    clock.advance(1)
    clock.advance(1)
    assert len(lines) == 1 and lines[0].startswith(COUNTS_PREFIX)
    metrics.count("filtered")
    reporter.stopService()
    assert len(lines) == 2
    assert json.loads(lines[1][len(COUNTS_PREFIX) :]) == [["dpatia_notifications_filtered", [], 2]]


def _job(n: int, created: float, **kw: Any) -> Job:
    return Job(
        slide_id=f"slide-{n}",
        application_id="dpatia",
        kind=JobKind.CREATE,
        callback=Callback("http://sps/", "secret-token"),
        created=created,
        **kw,
    )


def test_spool_gauges_are_read_once_per_scrape_at_most_once_a_second() -> None:
    """Jobs by state, the oldest queued job's age, deferred jobs and free bytes come
    from the spool at scrape time; a second scrape within a second reads it no more."""
    clock = Clock()
    clock.advance(1000)
    spool = MemorySpool()
    spool.startService()
    success_result_of(spool.add(_job(1, 900.0)))
    success_result_of(spool.add(_job(2, 990.0)))
    view = SpoolView(spool, clock)
    reads = []
    counts = spool.counts
    spool.counts = lambda: reads.append(1) or counts()  # type: ignore[method-assign]
    metrics = Metrics(clock, view)
    text = scrape(metrics)
    assert value(text, "dpatia_jobs", state="queued") == 2
    assert value(text, "dpatia_jobs", state="done") == 0
    assert value(text, "dpatia_oldest_queued_job_age_seconds") == 100
    assert value(text, "dpatia_spool_free_bytes") > 0
    assert value(text, "dpatia_deferred_jobs") == 0
    scrape(metrics)
    assert len(reads) == 1
    clock.advance(1.5)
    scrape(metrics)
    assert len(reads) == 2


def test_every_exported_name_is_declared() -> None:
    """What a scrape shows is exactly what metric_names() declares (the dashboard test
    relies on it)."""
    clock = Clock()
    spool = MemorySpool()
    spool.startService()

    class Workers:
        def snapshot(self) -> list[dict[str, Any]]:
            return [{"state": "idle"}, {"state": "busy"}]

        def observe(self, callback: Any) -> Any:
            return lambda: None

    metrics = Metrics(clock, SpoolView(spool, clock), Workers(), lambda: {})
    metrics.step("analysis", 1.0)
    text = scrape(metrics)
    exported = {name for name, _ in samples(text)}
    assert exported - {"dpatia_step_duration_seconds_created"} <= metric_names()
    assert value(text, "dpatia_workers", state="busy") == 1
    assert value(text, "dpatia_workers", state="idle") == 1


def test_the_grafana_dashboard_names_only_metrics_dpatia_exports() -> None:
    """Every expr in etc/grafana/dpatia.json names at least one dpatia metric, and
    every dpatia_* name it uses is one dpatia exports."""
    dashboard = json.loads((ROOT / "etc" / "grafana" / "dpatia.json").read_text())
    exprs = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "expr" and isinstance(v, str):
                    exprs.append(v)
                else:
                    walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(dashboard)
    assert len(exprs) >= 10
    names = metric_names()
    for expr in exprs:
        used = set(re.findall(r"\bdpatia_[a-z_]+", expr))
        assert used, f"{expr!r} names no dpatia metric"
        assert used <= names, f"{expr!r} names {used - names}"


def test_admin_listen_is_loopback_unless_told_and_a_bad_one_is_a_config_error(
    tmp_path: Path,
) -> None:
    """``tcp:PORT`` gets interface=127.0.0.1; an explicit interface is kept; an
    unparsable description fails the build naming [admin] listen; empty is off."""
    config = load_config(write_config(tmp_path, {"admin": {"listen": "tcp:9480"}}))
    assert config.admin.listen == "tcp:9480:interface=127.0.0.1"
    config = load_config(write_config(tmp_path, {"admin": {"listen": "tcp:1:interface=::1"}}))
    assert config.admin.listen == "tcp:1:interface=::1"
    assert load_config(write_config(tmp_path)).admin.listen == ""
    bad = load_config(write_config(tmp_path, {"admin": {"listen": "nonsense:1"}}))
    clock = Clock()
    with pytest.raises(ConfigError, match=r"\[admin\] listen"):
        admin_listener(clock, bad, Metrics(clock, SpoolView(MemorySpool(), clock)))


def test_unknown_admin_paths_are_a_json_404() -> None:
    """A path the admin listener does not have answers 404 with a JSON body listing
    the ones it has."""
    clock = Clock()
    metrics = Metrics(clock, SpoolView(MemorySpool(), clock))
    stub = StubTreq(admin_resource(metrics, StatusBoard(clock, metrics.view)))  # type: ignore[arg-type]
    response = success_result_of(stub.get("http://admin/nothing"))
    assert response.code == 404
    body = json.loads(success_result_of(stub.content(response)))
    assert "/metrics" in body["paths"]


def test_worker_exit_causes_are_bounded_labels() -> None:
    """A worker's exit is labelled by why: load-error, a pool's stop cause, planned, crash."""
    from dpatia_daemon.workers.pool import StopCause

    worker = Worker(slot=None, name="1.1", started=0)  # type: ignore[arg-type]
    assert exit_cause(worker) == "crash"
    worker.planned = True
    assert exit_cause(worker) == "planned"
    worker.cause = StopCause.UNRESPONSIVE
    assert exit_cause(worker) == "unresponsive"
    worker.load_error = "no module"
    assert exit_cause(worker) == "load-error"


# --- a real daemon ------------------------------------------------------------------


def create(
    sps: Loopback, slide_id: str, cancellation: str, test: dict[str, Any] | None = None
) -> bytes:
    """A create invocation's body; ``test`` tells tests.analyses_for_tests:run what to do."""
    return json.dumps(
        {
            "action": "create",
            "applicationId": "dpatia",
            "slideId": slide_id,
            "callbackInfo": {"url": sps.url, "token": sps.token},
            "cancellationToken": cancellation,
            "input": {"type": "wholeSlide"},
            "context": {"test": test or {}},
        }
    ).encode()


async def scrape_until(
    reactor: Any, url: str, ready: Callable[[str], bool], timeout: float = 10.0
) -> str:
    """GET ``url`` until its text is ``ready`` (every 50 ms, at most ``timeout`` s)."""
    deadline = reactor.seconds() + timeout
    while True:
        text = await (await treq.get(url)).text()
        if ready(text) or reactor.seconds() > deadline:
            return text
        await deferLater(reactor, 0.05)


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_a_daemons_metrics_move_as_a_job_runs(
    reactor: Any, sps: Loopback, tmp_path: Path
) -> None:
    """``twistd dpatia`` with ``[admin] listen = tcp:0``: /metrics parses with
    prometheus_client's parser; after a job (metadata, thumbnail, label, download,
    analysis, store) the counters, the step histograms, the SPS request counts, the
    downloaded bytes and the spool's gauges have moved."""
    sps.fake.add_slide("slide-m", files=[("slide.svs", b"W" * 50_000)])
    ini = write_config(
        tmp_path,
        {
            "app": {"analysis": "tests.analyses_for_tests:run"},
            "pipeline": {"download_wsi": "true"},
            "workers": {"count": 1},
            "admin": {"listen": "tcp:0"},
        },
    )
    daemon = DaemonProcess(reactor=reactor, config=ini, cwd=str(tmp_path))
    await daemon.start()
    try:
        match = await daemon.wait_for(ADMIN_LINE, since=0)
        metrics_url = f"http://127.0.0.1:{int(match.group(1))}/metrics"
        before = await (await treq.get(metrics_url)).text()
        assert value(before, "dpatia_jobs_accepted_total", kind="create") == 0
        workers = [v for (name, _), v in samples(before).items() if name == "dpatia_workers"]
        assert sum(workers) == 1
        response = await treq.post(
            daemon.url + "/dpatia",
            create(sps, "slide-m", f"ct-{uuid.uuid4().hex}"),
            headers={"Content-Type": ["application/json"]},
        )
        assert response.code == 200, await response.content()
        await daemon.wait_for(rb"job \w+ done", since=0)
        # The spool logs "done" from its thread; the daemon counts the end right after.
        after = await scrape_until(
            reactor, metrics_url, lambda t: value(t, "dpatia_jobs_ended_total", state="done") > 0
        )
    finally:
        await daemon.kill(signal.SIGTERM)
    assert value(after, "dpatia_jobs_accepted_total", kind="create") == 1
    assert value(after, "dpatia_jobs_ended_total", state="done") == 1
    assert value(after, "dpatia_jobs", state="done") == 1
    assert value(after, "dpatia_jobs", state="queued") == 0
    for step in ("metadata", "thumbnail", "label", "download", "analysis", "store"):
        assert value(after, "dpatia_step_duration_seconds_count", step=step) == 1, step
    assert value(after, "dpatia_download_bytes_total") == 50_000
    info = "GET slides/{id}/info"
    assert value(after, "dpatia_sps_requests_total", endpoint=info, status="2xx") >= 1
    posted = [
        labels
        for (name, labels), v in samples(after).items()
        if name == "dpatia_sps_requests_total" and dict(labels)["endpoint"].startswith("P")
    ]
    assert posted, "the daemon's own result writes are counted"
    assert value(after, "dpatia_spool_free_bytes") > 0


def test_queue_times_read_each_queued_record_once(tmp_path: Path) -> None:
    """QueueTimes reads created and not_before from the records of queued/ as
    Job.to_json writes them, skips other names and torn records, and reads a record
    again once it was replaced."""
    from dpatia_daemon.ops.metrics import QueueTimes

    queued = tmp_path / "queued"
    queued.mkdir()
    first, second = _job(1, 100.0), _job(2, 50.0, not_before=700.5)
    (queued / f"{first.key}.json").write_bytes(first.to_json())
    (queued / f"{second.key}.json").write_bytes(second.to_json())
    (queued / ".nfs0001").write_bytes(b"junk")
    (queued / ("ab" * 16 + ".json")).write_bytes(b'{"torn')
    times = QueueTimes(str(queued))
    assert sorted(times.read()) == [(50.0, 700.5), (100.0, None)]
    assert times.read() == times.read()
    # The spool replaces a record by a rename (a new inode), never in place.
    (tmp_path / "new").write_bytes(attrs_evolve(first, created=10.0).to_json())
    (tmp_path / "new").rename(queued / f"{first.key}.json")
    assert sorted(times.read()) == [(10.0, None), (50.0, 700.5)]


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_with_two_processes_the_counts_cover_both_front_doors(
    reactor: Any, sps: Loopback, tmp_path: Path
) -> None:
    """``[server] processes = 2``: notifications spread over both front doors (a new
    connection each), and the main process's /metrics counts every one of them, with
    the extra front door's totals included."""
    from twisted.web.client import Agent, HTTPConnectionPool

    slides = [f"slide-door-{i}" for i in range(20)]
    for slide in slides:
        sps.fake.add_slide(slide)
    ini = write_config(
        tmp_path,
        {"server": {"processes": 2}, "workers": {"count": 0}, "admin": {"listen": "tcp:0"}},
    )
    daemon = DaemonProcess(reactor=reactor, config=ini, cwd=str(tmp_path))
    await daemon.start()
    try:
        await daemon.wait_for(rb"dpatia front door 1 ready", since=0)
        match = await daemon.wait_for(ADMIN_LINE, since=0)
        metrics_url = f"http://127.0.0.1:{int(match.group(1))}/metrics"
        client = treq.client.HTTPClient(
            Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
        )
        for slide in slides:
            notice = {
                "action": "newImageFiles",
                "applicationId": "dpatia",
                "slideId": slide,
                "callbackInfo": {"url": sps.url, "token": sps.token},
                "imageInfo": {"imageSize": {"width": 1000, "height": 500}},
            }
            response = await client.post(
                daemon.url + "/dpatia/imagenotification",
                json.dumps(notice).encode(),
                headers={"Content-Type": ["application/json"]},
            )
            assert response.code == 200
            await response.content()
        text = await scrape_until(
            reactor,
            metrics_url,
            lambda t: value(t, "dpatia_jobs_accepted_total", kind="notification") >= 20,
        )
    finally:
        await daemon.kill(signal.SIGTERM)
    # The copy acknowledged some of them (it told the main process of its jobs).
    assert b"front door 1 reports the jobs it queues" in daemon.output
    assert value(text, "dpatia_jobs_accepted_total", kind="notification") == 20
    assert value(text, "dpatia_front_doors_reporting") == 1
    assert value(text, "dpatia_jobs", state="queued") == 20


def test_a_spool_that_cannot_be_read_is_a_503_with_a_json_body() -> None:
    """A scrape whose spool read fails answers 503 with a JSON body naming what could
    not be read; the next scrape reads again."""
    clock = Clock()
    spool = MemorySpool()
    spool.startService()
    metrics = Metrics(clock, SpoolView(spool, clock))
    counts = spool.counts
    spool.counts = lambda: (_ for _ in ()).throw(OSError(5, "I/O error"))  # type: ignore[method-assign]
    stub = StubTreq(admin_resource(metrics, StatusBoard(clock, metrics.view)))  # type: ignore[arg-type]
    response = success_result_of(stub.get("http://admin/metrics"))
    assert response.code == 503
    assert json.loads(success_result_of(stub.content(response))) == {
        "error": "cannot read the metrics now"
    }
    spool.counts = counts  # type: ignore[method-assign]
    assert ("dpatia_jobs", (("state", "queued"),)) in samples(scrape(metrics))
