"""The supervisor with real worker processes, a real directory spool and a fake SPS on
loopback: crashes, hangs, timeouts, cancellation, backoff, recycling, garbage output.

Workers run ``tests.analyses_for_tests`` (importable in them because the supervisor
puts the checkout first on their PYTHONPATH).  Every wait is on a supervisor event
with a bounded timeout, never a sleep.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import globalLogPublisher
from twisted.python.filepath import FilePath
from twisted.web.server import Site

from dpatia_daemon import __version__
from dpatia_daemon.config import WorkersConfig
from dpatia_daemon.jobs import Callback, Job, JobKind, JobState, job_key
from dpatia_daemon.models import Result
from dpatia_daemon.simulator.fake import BASE_PATH, FakeSPS
from dpatia_daemon.spool import DirectorySpool
from dpatia_daemon.sps.client import SPSClient, make_http_client
from dpatia_daemon.sps.results import Status, frame_status
from dpatia_daemon.sps.writer import ResultWriter
from dpatia_daemon.workers.supervisor import Supervisor, SupervisorEvent

pytestmark = pytest.mark.integration

TEST_ANALYSIS = "tests.analyses_for_tests:run"


@attrs.define
class Rig:
    """A supervisor over a directory spool, with a fake SPS on loopback."""

    reactor: Any
    tmp: Path
    fake: FakeSPS
    url: str
    token: str
    spool: DirectorySpool
    writer: ResultWriter
    http: Any
    supervisor: Supervisor | None = None
    events: list[SupervisorEvent] = attrs.field(factory=list)
    stamps: list[float] = attrs.field(factory=list)
    _waiters: list[tuple[Callable[[SupervisorEvent], bool], Deferred[SupervisorEvent]]] = (
        attrs.field(factory=list)
    )

    def start(
        self, analysis: str = TEST_ANALYSIS, env: dict[str, str] | None = None, **config: Any
    ) -> Supervisor:
        settings = {
            "count": 1,
            "work_directory": FilePath(str(self.tmp / "work")),
            "kill_grace": 2.0,
            "heartbeat_interval": 1.0,
            "progress_interval": 0.1,
            "shutdown_grace": 5.0,
            # Retries after a failed attempt wait a backoff: short here (real time).
            "min_backoff": 0.05,
            "max_backoff": 0.2,
            **config,
        }
        supervisor = self.supervisor = Supervisor(
            reactor=self.reactor,
            spool=self.spool,
            writer=self.writer,
            config=WorkersConfig(**settings),
            analysis=analysis,
            env=None if env is None else {**os.environ, **env},
            restart_initial=0.1,
            healthy_after=5.0,
            cancel_poll_interval=0.2,
        )
        supervisor.observe(self._event)
        supervisor.startService()
        return supervisor

    def _event(self, event: SupervisorEvent) -> None:
        self.events.append(event)
        self.stamps.append(self.reactor.seconds())
        for entry in list(self._waiters):
            if entry[0](event):
                self._waiters.remove(entry)
                entry[1].callback(event)

    def wait(
        self,
        kind: str,
        job_id: str | None = None,
        timeout: float = 20.0,
        where: Callable[[SupervisorEvent], bool] = lambda e: True,
        **detail: Any,
    ) -> Deferred[SupervisorEvent]:
        """The first event (already seen or to come) of ``kind`` matching the rest."""

        def matches(event: SupervisorEvent) -> bool:
            return (
                event.kind == kind
                and (job_id is None or event.job_id == job_id)
                and all(event.detail.get(k) == v for k, v in detail.items())
                and where(event)
            )

        d: Deferred[SupervisorEvent] = Deferred()
        for event in self.events:
            if matches(event):
                d.callback(event)
                return d
        entry = (matches, d)
        self._waiters.append(entry)

        def expire() -> None:
            if entry in self._waiters:
                self._waiters.remove(entry)
                d.errback(AssertionError(f"no {kind} {job_id} {detail} within {timeout} s"))

        timer = self.reactor.callLater(timeout, expire)
        d.addBoth(lambda r: (timer.cancel() if timer.active() else None, r)[1])
        return d

    async def until(self, kind: str, count: int, timeout: float = 20.0) -> None:
        """Wait until ``count`` events of ``kind`` have happened."""
        deadline = self.reactor.seconds() + timeout
        while len(self.of(kind)) < count:
            left = deadline - self.reactor.seconds()
            assert left > 0, f"fewer than {count} {kind} events within {timeout} s"
            d: Deferred[SupervisorEvent] = Deferred()
            entry = (lambda e, k=kind: e.kind == k, d)
            self._waiters.append(entry)
            try:
                await d.addTimeout(left, self.reactor)
            except defer.TimeoutError:
                pass  # the loop's assert says what is missing
            finally:
                if entry in self._waiters:
                    self._waiters.remove(entry)

    def times(self, kind: str) -> list[float]:
        return [t for t, e in zip(self.stamps, self.events, strict=True) if e.kind == kind]

    def of(self, kind: str, job_id: str | None = None) -> list[SupervisorEvent]:
        return [e for e in self.events if e.kind == kind and (job_id is None or e.job_id == job_id)]

    async def add(
        self,
        slide: str,
        test: dict[str, Any] | None = None,
        kind: JobKind = JobKind.NOTIFICATION,
        priority: int = 0,
    ) -> Job:
        if slide not in self.fake.slides:
            self.fake.add_slide(slide, width=2000, height=1000)
        return await self.spool.add(
            Job(
                slide_id=slide,
                application_id="dpatia",
                kind=kind,
                callback=Callback(self.url, self.token),
                created=self.reactor.seconds(),
                context={"test": test or {}},
                image_info={"imageSize": {"width": 2000, "height": 1000}},
                priority=priority,
            )
        )

    async def ended(self, job: Job, timeout: float = 20.0) -> Job:
        """Wait for the job's last end (done, failed or cancelled); its final record."""
        terminal = {"done", "failed", "cancelled"}
        await self.wait(
            "job-ended", job.job_id, timeout=timeout, where=lambda e: e.detail["state"] in terminal
        )
        final = await self.spool.get(job.job_id)
        assert final is not None
        return final

    def results(self, slide: str) -> list[Result]:
        return self.fake.results_for(slide, "dpatia")

    def pid_of(self, worker: str) -> int:
        [ready] = [e for e in self.of("worker-ready") if e.worker == worker]
        return int(ready.detail["pid"])


@pytest_twisted.async_yield_fixture
async def rig(reactor: Any, tmp_path: Path) -> Any:
    fake = FakeSPS(clock=reactor)
    token = fake.issue_token()
    port = reactor.listenTCP(0, Site(fake.resource()), interface="127.0.0.1")
    url = f"http://127.0.0.1:{port.getHost().port}{BASE_PATH}"
    spool = DirectorySpool(directory=FilePath(str(tmp_path / "spool")), reactor=reactor)
    spool.startService()
    http = make_http_client(reactor)
    sps = SPSClient(
        http=http.client, clock=reactor, software_version=__version__, timeout=5.0, retries=1
    )
    writer = ResultWriter(sps=sps, clock=reactor, display_name="dpatia", fresh_grace=0.3)
    the_rig = Rig(reactor, tmp_path, fake, url, token, spool, writer, http)
    yield the_rig
    if the_rig.supervisor is not None and the_rig.supervisor.running:
        await the_rig.supervisor.stopService()
    await spool.stopService()
    await http.close()
    await port.stopListening()


def only_result(rig: Rig, slide: str) -> Result:
    results = rig.results(slide)
    assert len(results) == 1, results
    return results[0]


@pytest_twisted.ensureDeferred
async def test_a_job_runs_and_its_result_replaces_the_progress_frame(rig: Rig) -> None:
    """One job: progress frames, then the final result in place of the frame (one
    annotation), applicationVersion and bookkeeping set, work folder retired."""
    rig.start()
    job = await rig.add("slide-ok", {"seconds": 0.5, "progress_every": 0.05})
    final = await rig.ended(job)
    assert final.state is JobState.DONE
    result = only_result(rig, "slide-ok")
    assert result.displayResult == "test answer"
    assert result.applicationVersion == __version__
    assert frame_status(result) is Status.DONE
    puts = [r for r in rig.fake.requests if r.method == "PUT"]
    # 10 progress reports in 0.5 s at most one write per 0.1 s, plus the final.
    assert 2 <= len(puts) <= 8
    assert len(rig.of("job-progress", job.job_id)) >= 5
    # The work folder is retired: the token goes with the job, the result stays for
    # [spool] retention_days.
    folder = rig.tmp / "work" / job.key
    assert not (folder / "job.json").exists()
    assert (folder / "result.json").exists()


@pytest_twisted.ensureDeferred
async def test_sigkill_mid_job_completes_exactly_once_on_a_restarted_worker(rig: Rig) -> None:
    """SIGKILL the worker while it runs a job: a new worker runs it again, it completes
    once, and the SPS holds one (final) result, not two."""
    record = rig.tmp / "completed.txt"
    rig.start()
    job = await rig.add("slide-kill", {"seconds": 0.6, "record": str(record)})
    started = await rig.wait("job-progress", job.job_id, text="started")
    assert started.worker is not None
    os.kill(rig.pid_of(started.worker), signal.SIGKILL)
    exited = await rig.wait("worker-exited")
    assert exited.detail["how"] == "signal 9"
    final = await rig.ended(job)
    assert final.state is JobState.DONE
    assert final.attempts == 1  # the crash counted
    assert record.read_text().split() == [job.job_id]
    assert len(rig.of("worker-ready")) == 2
    result = only_result(rig, "slide-kill")
    assert result.displayResult == "test answer"
    assert result.displayProperties["Attempt"] == 2


@pytest_twisted.ensureDeferred
async def test_an_analysis_exception_is_a_failed_attempt_and_a_failure_result(rig: Rig) -> None:
    """An analysis that raises: each attempt fails with its message (the worker stays
    up); after max_attempts the job is FAILED and the slide shows the message."""
    rig.start(max_attempts=2)
    job = await rig.add("slide-raise", {"fail": "stain not recognised"})
    final = await rig.ended(job, timeout=30)
    assert final.state is JobState.FAILED
    assert len(rig.of("job-started", job.job_id)) == 2
    assert "ValueError: stain not recognised" in (final.last_error or "")
    assert not rig.of("worker-exited")
    result = only_result(rig, "slide-raise")
    assert frame_status(result) is Status.FAILED
    assert "ValueError: stain not recognised" in str(result.displayProperties["Error"])


@pytest_twisted.ensureDeferred
async def test_a_quality_control_verdict_is_stored_after_the_result(rig: Rig) -> None:
    """An analysis returning quality_control: after the result, the slide's QC status
    is set at the SPS with the versionId from the slide's metadata."""
    rig.start()
    rig.fake.add_slide("slide-qc", width=2000, height=1000)
    version = rig.fake.slides["slide-qc"].info["qualityControl"]["versionId"]
    # The pipeline would have stored the metadata in the job's folder: do it here.
    folder = rig.tmp / "work" / job_key("dpatia", "slide-qc", {"type": "wholeSlide"})
    folder.mkdir(parents=True, mode=0o700)
    (folder / "slide_info.json").write_text(
        json.dumps({"qualityControl": {"status": "NotSet", "versionId": version}})
    )
    job = await rig.add("slide-qc", {"qc": "Rejected"})
    final = await rig.ended(job)
    assert final.state is JobState.DONE
    assert rig.fake.slides["slide-qc"].info["qualityControl"]["status"] == "Rejected"
    assert only_result(rig, "slide-qc").displayResult == "test answer"


@pytest_twisted.ensureDeferred
async def test_a_job_that_always_crashes_fails_after_max_attempts(rig: Rig) -> None:
    """Three crashes: the job ends FAILED and its result says so, in the failure style,
    with the reason; never a stuck "in progress"."""
    rig.start(max_attempts=3)
    job = await rig.add("slide-crash", {"crash": "exit"})
    final = await rig.ended(job, timeout=30)
    assert final.state is JobState.FAILED
    assert len(rig.of("job-started", job.job_id)) == 3
    assert "exit code 3" in (final.last_error or "")
    result = only_result(rig, "slide-crash")
    assert frame_status(result) is Status.FAILED
    assert "failed" in result.displayResult
    assert "the worker process died" in str(result.displayProperties["Error"])
    assert result.data.result is not None
    style = result.data.result.content[0]["style"]  # type: ignore[index]
    assert style["strokeStyle"] == "#E02020"


@pytest_twisted.ensureDeferred
async def test_a_hung_analysis_is_stopped_at_job_timeout(rig: Rig) -> None:
    """An analysis that never returns is stopped at job_timeout; the attempt fails."""
    rig.start(job_timeout=1.0, max_attempts=1)
    job = await rig.add("slide-hang", {"hang": "sleep"})
    final = await rig.ended(job)
    assert final.state is JobState.FAILED
    assert "job_timeout (1 s)" in (final.last_error or "")
    assert frame_status(only_result(rig, "slide-hang")) is Status.FAILED
    assert rig.of("worker-exited")[0].detail["how"] == f"exit code {128 + signal.SIGTERM}"


@pytest_twisted.ensureDeferred
async def test_a_worker_that_stops_answering_heartbeats_is_killed_and_replaced(
    rig: Rig,
) -> None:
    """A frozen worker (SIGSTOP: no heartbeat answers, deaf to SIGTERM) is SIGKILLed
    after three missed heartbeats and replaced; its job's attempt fails."""
    rig.start(heartbeat_interval=0.2, kill_grace=0.5, max_attempts=1)
    job = await rig.add("slide-frozen", {"hang": "stop"})
    final = await rig.ended(job)
    assert final.state is JobState.FAILED
    assert "stopped answering heartbeats" in (final.last_error or "")
    assert rig.of("worker-exited")[0].detail["how"] == "signal 9"
    await rig.until("worker-ready", 2)


@pytest_twisted.ensureDeferred
async def test_a_worker_that_cannot_start_backs_off_instead_of_spinning(rig: Rig) -> None:
    """Workers that die while importing the analysis are restarted after 0.1, 0.2, 0.4,
    0.8 s…; the queued job waits, not lost and no attempt spent."""
    supervisor = rig.start(env={"DPATIA_TEST_EXIT_AT_IMPORT": "1"})
    job = await rig.add("slide-wait")
    await rig.until("worker-spawned", 5)
    exits, spawns = rig.times("worker-exited"), rig.times("worker-spawned")
    gaps = [spawn - died for died, spawn in zip(exits, spawns[1:], strict=False)]
    # Each restart waited at least its delay (timers may fire late, never early).
    assert len(gaps) == 4
    for gap, delay in zip(gaps, [0.1, 0.2, 0.4, 0.8], strict=True):
        assert delay * 0.95 <= gap < delay + 1.0
    assert all(e.detail["how"] == "exit code 7" for e in rig.of("worker-exited"))
    assert supervisor.snapshot()[0]["restart_delay"] == pytest.approx(1.6)
    queued = await rig.spool.get(job.job_id)
    assert queued is not None
    assert (queued.state, queued.attempts) == (JobState.QUEUED, 0)


@pytest_twisted.ensureDeferred
async def test_a_job_for_an_unavailable_analysis_fails_with_a_clear_message(rig: Rig) -> None:
    """[app] analysis names a module that cannot be imported: the job fails with that
    one-line reason, on the slide too."""
    rig.start(analysis="no_such_module_x:run", max_attempts=1)
    ready = await rig.wait("worker-ready")
    reason = "cannot import no_such_module_x (ModuleNotFoundError"
    assert reason in ready.detail["load_error"]
    job = await rig.add("slide-tissue")
    final = await rig.ended(job)
    assert final.state is JobState.FAILED
    assert reason in (final.last_error or "")
    result = only_result(rig, "slide-tissue")
    assert reason in str(result.displayProperties["Error"])


@pytest.mark.parametrize("obedient", [True, False], ids=["stops", "ignores-cancel"])
@pytest_twisted.ensureDeferred
async def test_cancelling_a_running_job_stops_it_and_says_cancelled(
    rig: Rig, obedient: bool
) -> None:
    """spool.request_cancel on a running job: the analysis stops (or its worker is
    killed after kill_grace) within seconds; the result says Cancelled."""
    rig.start(kill_grace=0.5)
    test = {"seconds": 60} if obedient else {"hang": "sleep"}
    job = await rig.add("slide-cancel", test)
    await rig.wait("job-progress", job.job_id, text="started")
    asked = rig.reactor.seconds()
    await rig.spool.request_cancel(job.job_id)
    final = await rig.ended(job, timeout=10)
    assert rig.reactor.seconds() - asked < 3.0
    assert final.state is JobState.CANCELLED
    result = only_result(rig, "slide-cancel")
    assert frame_status(result) is Status.CANCELLED
    assert result.displayProperties["Status"] == "Cancelled"
    if not obedient:
        assert rig.of("worker-exited")[0].detail["how"] == f"exit code {128 + signal.SIGTERM}"


@pytest_twisted.ensureDeferred
async def test_deleting_the_result_stops_the_job_without_recreating_it(rig: Rig) -> None:
    """A user deletes the annotation while the job runs: the next write finds it gone,
    the analysis is cancelled, and no result reappears on the slide."""
    rig.start()
    job = await rig.add("slide-deleted", {"seconds": 60, "progress_every": 0.05})
    await rig.wait("job-progress", job.job_id, where=lambda e: e.detail["percent"] >= 3)
    [result] = rig.results("slide-deleted")
    assert result.id is not None
    del rig.fake.results[result.id]
    final = await rig.ended(job, timeout=10)
    assert final.state is JobState.CANCELLED
    assert final.last_error == "the result was deleted at the SPS"
    assert rig.results("slide-deleted") == []


@pytest_twisted.ensureDeferred
async def test_jobs_are_dispatched_manual_first_then_priority_then_oldest(rig: Rig) -> None:
    """While the only worker is busy: an old notification, a high-priority one and a
    manual request queue up; they then run manual, priority, oldest."""
    rig.start()
    blocker = await rig.add("slide-block", {"seconds": 0.5})
    await rig.wait("job-progress", blocker.job_id, text="started")
    old = await rig.add("slide-old")
    urgent = await rig.add("slide-urgent", priority=5)
    manual = await rig.add("slide-manual", kind=JobKind.CREATE)
    for job in (blocker, old, urgent, manual):
        await rig.ended(job)
    order = [e.job_id for e in rig.of("job-started")]
    assert order == [blocker.job_id, manual.job_id, urgent.job_id, old.job_id]


@pytest_twisted.ensureDeferred
async def test_a_re_request_while_its_slide_runs_waits_then_runs(rig: Rig) -> None:
    """A second request for a slide whose analysis is running is not claimable (one
    analysis per key); the idle worker leaves it, and it runs once the first ends."""
    rig.start(count=2)
    await rig.until("worker-ready", 2)
    first = await rig.add("slide-twice", {"seconds": 0.5})
    await rig.wait("job-progress", first.job_id, text="started")
    second = await rig.add("slide-twice", {"seconds": 0})
    assert second.job_id != first.job_id
    assert (await rig.ended(first)).state is JobState.DONE
    assert (await rig.ended(second)).state is JobState.DONE
    assert [e.job_id for e in rig.of("job-started")] == [first.job_id, second.job_id]
    assert len(rig.results("slide-twice")) == 1


@pytest_twisted.ensureDeferred
async def test_garbage_output_is_logged_bounded_and_harmless(rig: Rig) -> None:
    """A 100 kB line, binary bytes and a flood of lines: cut, escaped, rate-limited,
    tagged with worker and job; the job still completes."""
    lines: list[dict[str, Any]] = []
    dropped: Deferred[None] = Deferred()
    reported: list[str] = []

    def observer(event: dict[str, Any]) -> None:
        if "line" in event and event.get("log_namespace") == "dpatia_daemon.workers.supervisor":
            lines.append(event)
            if "lines dropped" in event["line"] and not reported:
                reported.append(event["line"])
                dropped.callback(None)

    globalLogPublisher.addObserver(observer)
    try:
        rig.start()
        job = await rig.add("slide-garbage", {"garbage": True})
        final = await rig.ended(job)
        await dropped.addTimeout(5, rig.reactor)  # a TimeoutError: no dropped report
    finally:
        globalLogPublisher.removeObserver(observer)
    assert final.state is JobState.DONE
    texts = [e["line"] for e in lines if e["job_id"] in (job.job_id, "-")]
    assert max(len(t) for t in texts) < 4200
    assert any(t.endswith("[line cut at 4096 bytes]") for t in texts)
    assert any("\\x00\\xff\\xfe binary \\x1b[31m red \\x07" in t for t in texts)
    assert any("lines dropped" in t for t in texts)
    assert len(texts) < 400  # 2000 noise lines were not all logged


@pytest_twisted.ensureDeferred
async def test_workers_are_recycled_after_max_jobs_per_worker(rig: Rig) -> None:
    """max_jobs_per_worker = 1: each job runs on a fresh worker."""
    rig.start(max_jobs_per_worker=1)
    first = await rig.add("slide-r1")
    second = await rig.add("slide-r2")
    await rig.ended(first)
    await rig.ended(second)
    workers = [e.worker for e in rig.of("job-started")]
    assert len(set(workers)) == 2
    assert len(rig.of("worker-ready")) >= 2


@pytest_twisted.ensureDeferred
async def test_stopping_puts_a_running_job_back_unharmed(rig: Rig) -> None:
    """stopService with a job still running after shutdown_grace: the worker is
    stopped, the job is QUEUED again with no attempt counted, every child exited."""
    supervisor = rig.start(shutdown_grace=0.3)
    job = await rig.add("slide-stop", {"seconds": 60})
    await rig.wait("job-progress", job.job_id, text="started")
    await supervisor.stopService()
    queued = await rig.spool.get(job.job_id)
    assert queued is not None
    assert (queued.state, queued.attempts) == (JobState.QUEUED, 0)
    assert [s["state"] for s in supervisor.snapshot()] == ["dead"]
    assert rig.of("worker-exited")


@pytest_twisted.ensureDeferred
async def test_an_sps_outage_defers_jobs_and_each_slide_gets_one_final_result(
    rig: Rig,
) -> None:
    """The fake SPS answers 503 (with Retry-After) to every call for 4 s, while four
    jobs run or wait on two workers (the old retry cycle, three attempts at once,
    failed them all in well under a second): no job fails or spends an attempt, each
    analysis ran exactly once (a result computed during the outage is stored when the
    SPS is back, not computed again), and every slide ends with exactly one final
    result and no failure frame."""
    record = rig.tmp / "completed.txt"
    # The SPS client's own retry cycle is short here (Retry-After capped at 0.3 s), so
    # the outage outlasts it: the jobs' fates decide, not the client's patience.
    rig.writer = attrs.evolve(rig.writer, sps=attrs.evolve(rig.writer.sps, backoff_cap=0.3))
    rig.start(count=2, max_attempts=3, sps_probe_interval=0.5, min_backoff=0.2, max_backoff=2.0)
    jobs = [
        await rig.add(f"slide-out-{i}", {"seconds": 0.3, "record": str(record)}) for i in range(4)
    ]
    await rig.wait("job-started", jobs[0].job_id)
    rig.fake.faults.go_down(rig.reactor.seconds(), 4.0)
    finals = [await rig.ended(job, timeout=30) for job in jobs]
    assert [(job.state, job.attempts) for job in finals] == [(JobState.DONE, 0)] * 4
    # The outage did hit them: the records keep when their first deferral was.
    assert any(job.deferred_since is not None for job in finals)
    assert sorted(record.read_text().split()) == sorted(job.job_id for job in jobs)
    for job in jobs:
        result = only_result(rig, job.slide_id)
        assert result.displayResult == "test answer"
        assert frame_status(result) is not Status.FAILED
