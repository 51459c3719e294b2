"""SPS outages and failing jobs on a fake clock: deferral, backoff, the shared health view.

The supervisor runs fake workers (:mod:`fakes`) over a memory spool; the result writer
is a :class:`FakeWriter` whose SPS can be taken down (every call then fails as the
SPS client gives up on a 503 with Retry-After).  The test plays each worker: it answers
RunJob with a result, or fails it as a worker whose fetch hit the outage does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import attrs
import pytest
from conftest import success_result_of
from fakes import FakeWorker, FakeWriter, ProcessClock, make_job
from twisted.internet.defer import Deferred
from twisted.python.filepath import FilePath

from dpatia_daemon.config import WorkersConfig
from dpatia_daemon.jobs import Deferral, DeferralKind, Job, JobState
from dpatia_daemon.models import Result
from dpatia_daemon.spool import MemorySpool
from dpatia_daemon.sps.errors import SPSUnavailable
from dpatia_daemon.sps.results import Status
from dpatia_daemon.workers.commands import AnalysisFailed, TransientFailure
from dpatia_daemon.workers.folders import WorkFolders
from dpatia_daemon.workers.supervisor import Supervisor

OUTAGE = "SPS unavailable (after 5 attempts) (HTTP 503)"


@attrs.define
class OutageWriter(FakeWriter):
    """A FakeWriter whose SPS is down until ``down_until``: every call then fails
    (after the client's own retries) with 503 and ``retry_after``."""

    down_until: float = float("-inf")
    retry_after: float | None = None
    calls_while_down: int = 0
    finals: list[str] = attrs.field(factory=list)
    statuses: list[tuple[str, str]] = attrs.field(factory=list)

    def _check(self) -> None:
        if self.clock.seconds() < self.down_until:
            self.calls_while_down += 1
            raise SPSUnavailable(
                "SPS unavailable (after 5 attempts)",
                endpoint="PUT results/{id}",
                status=503,
                retry_after=self.retry_after,
            )

    async def resolve(self, job: Job) -> Result:
        self._check()
        return await super().resolve(job)

    async def find(self, job: Job) -> Result | None:
        self._check()
        return await super().find(job)

    async def update(self, job: Job, stored: Result, new: Any, keep: Any = None) -> Result:
        self._check()
        self.statuses.append((job.slide_id, new[0]))
        if new[0] == "Final":
            self.finals.append(job.slide_id)
        return await super().update(job, stored, new, keep)


@attrs.define
class Rig:
    reactor: ProcessClock
    spool: MemorySpool
    writer: OutageWriter
    folders: WorkFolders
    supervisor: Supervisor
    # Held, not just their ids: a collected Deferred's id() can be reused by a new one,
    # which would then pass for answered.
    answered: list[Deferred[dict[str, Any]]] = attrs.field(factory=list)
    runs: list[str] = attrs.field(factory=list)

    def workers(self) -> list[FakeWorker]:
        return [p.worker for _, p, _, _ in self.reactor.spawned if p.alive and p.worker]

    def pending(self) -> list[tuple[str, Deferred[dict[str, Any]]]]:
        """RunJob calls not answered yet (each counted once in ``runs``)."""
        found = []
        for worker in self.workers():
            for job_id, d in worker.jobs.items():
                if not any(d is seen for seen in self.answered):
                    self.answered.append(d)
                    self.runs.append(job_id)
                    found.append((job_id, d))
        return found

    def flush(self) -> None:
        for _ in range(10):
            self.reactor.advance(0)

    def step(self, seconds: float = 0.5) -> None:
        self.reactor.advance(seconds)
        self.flush()

    def job(self, job_id: str) -> Job:
        found = success_result_of(self.spool.get(job_id))
        assert found is not None
        return found

    def answer(self, job_id: str, d: Deferred[dict[str, Any]]) -> None:
        """Play a worker whose analysis succeeded: result.json, then the answer."""
        job = self.job(job_id)
        path = self.folders.folder(job).child("result.json")
        path.setContent(json.dumps({"jobId": job_id, "result": {"slideId": job.slide_id}}).encode())
        d.callback({"result_path": path.path})

    def fetch_fails(self, d: Deferred[dict[str, Any]]) -> None:
        """Play a worker whose fetch of the slide hit the outage."""
        d.errback(TransientFailure(f"fetching the slide failed: {OUTAGE}", self.writer.retry_after))


def make_rig(tmp_path: Path, spool: MemorySpool | None = None, **config: Any) -> Rig:
    reactor = ProcessClock(amp=True)
    if spool is None:
        spool = MemorySpool()
        spool.startService()
    writer = OutageWriter(reactor)
    folders = WorkFolders(FilePath(str(tmp_path / "work")))
    settings: dict[str, Any] = {
        "count": 2,
        "work_directory": folders.root,
        "heartbeat_interval": 1000.0,
        "kill_grace": 2.0,
        "job_timeout": 10000.0,
        "shutdown_grace": 5.0,
        "max_attempts": 3,
        "min_backoff": 30.0,
        "max_backoff": 600.0,
        "max_deferral_age": 3 * 86400.0,
        "sps_probe_interval": 10.0,
        **config,
    }
    supervisor = Supervisor(
        reactor=reactor,
        spool=spool,
        writer=writer,  # type: ignore[arg-type]
        config=WorkersConfig(**settings),
        analysis="fake",
        folders=folders,
        cancel_poll_interval=1000.0,
        sweep_interval=3600.0,
        restart_initial=1.0,
    )
    rig = Rig(reactor, spool, writer, folders, supervisor)
    supervisor.startService()
    rig.flush()
    assert len(rig.workers()) == settings["count"]
    return rig


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    return make_rig(tmp_path)


def add(rig: Rig, slide: str) -> Job:
    job = success_result_of(rig.spool.add(make_job(slide, created=rig.reactor.seconds())))
    rig.flush()
    return job


def test_an_outage_longer_than_the_old_retry_cycles_costs_no_attempt_and_no_failure(
    rig: Rig,
) -> None:
    """Six slides, two running, when the SPS answers 503 to everything for 400 s: no
    job fails, no attempt is spent, few calls reach the SPS while it is down (one probe
    per sps_probe_interval, not a retry cycle per job), the result computed before the
    outage is stored without being computed again, and within seconds of the SPS's
    return every slide has exactly one final result and no failure frame."""
    jobs = [add(rig, f"slide-{i}") for i in range(6)]
    first = rig.pending()
    assert len(first) == 2
    rig.writer.down_until = rig.reactor.seconds() + 400.0
    # One analysis finished just as the SPS went away; the other's fetch hits it.
    (computed_id, computed), (fetching_id, fetching) = first
    rig.answer(computed_id, computed)
    rig.fetch_fails(fetching)
    rig.flush()
    computed_job = rig.job(computed_id)
    assert (computed_job.state, computed_job.attempts) == (JobState.QUEUED, 0)
    assert computed_job.deferral_kind is DeferralKind.SPS
    assert computed_job.not_before == pytest.approx(rig.reactor.seconds() + 30.0)
    assert rig.folders.folder(computed_job).child("result.json").exists()

    while rig.reactor.seconds() < rig.writer.down_until:
        for _, d in rig.pending():
            rig.fetch_fails(d)  # a probe's fetch fails as long as the SPS is down
        rig.step()
        for job in jobs:
            assert rig.job(job.job_id).state in (JobState.QUEUED, JobState.RUNNING)
    # 400 s down, probed every 10 s: about 40 probes in all, not 6 jobs' retry cycles.
    assert len(rig.runs) <= 2 + 400 / 10
    assert rig.writer.calls_while_down <= 2 * (2 + 400 / 10)
    assert all(rig.job(job.job_id).attempts == 0 for job in jobs)

    back = rig.reactor.seconds()
    for _ in range(100):
        for job_id, d in rig.pending():
            rig.answer(job_id, d)
        rig.step()
        if all(rig.job(job.job_id).state is JobState.DONE for job in jobs):
            break
    finals = [rig.job(job.job_id) for job in jobs]
    assert [job.state for job in finals] == [JobState.DONE] * 6
    assert rig.reactor.seconds() - back <= 15.0  # the next probe, not the backoff (600 s)
    assert sorted(rig.writer.finals) == sorted(job.slide_id for job in jobs)
    assert all(status != Status.FAILED.value for _, status in rig.writer.statuses)
    assert [job.attempts for job in finals] == [0] * 6
    # The result computed before the outage was stored, never computed again.
    assert rig.runs.count(computed_id) == 1


def test_a_result_the_sps_refused_is_stored_at_the_next_try_without_a_run(rig: Rig) -> None:
    """A store that fails transiently defers the job; once its backoff is over (the
    SPS back meanwhile, no probe needed) result.json is stored and the job is DONE
    with no second RunJob."""
    job = add(rig, "slide-a")
    [(job_id, d)] = rig.pending()
    rig.writer.down_until = rig.reactor.seconds() + 5.0
    rig.answer(job_id, d)
    rig.flush()
    assert rig.job(job.job_id).state is JobState.QUEUED
    for _ in range(80):
        rig.step()
        assert rig.pending() == []
        if rig.job(job.job_id).state is JobState.DONE:
            break
    assert rig.job(job.job_id).state is JobState.DONE
    assert rig.writer.finals == ["slide-a"]
    assert rig.runs == [job.job_id]


def test_retry_after_decides_when_a_deferred_job_runs_again(tmp_path: Path) -> None:
    """A 503 with Retry-After: 45 defers the job 45 s (not min_backoff), recorded in
    the spool, and neither it nor a probe of its SPS (every 5 s otherwise) comes a
    moment earlier."""
    rig = make_rig(tmp_path, count=1, sps_probe_interval=5.0)
    job = add(rig, "slide-r")
    [(_, d)] = rig.pending()
    rig.writer.retry_after = 45.0
    rig.fetch_fails(d)
    rig.flush()
    start = rig.reactor.seconds()
    deferred = rig.job(job.job_id)
    assert deferred.not_before == pytest.approx(start + 45.0)
    assert deferred.deferred_reason == f"fetching the slide failed: {OUTAGE}"
    rig.reactor.advance(44.9)
    rig.flush()
    assert rig.pending() == []
    rig.reactor.advance(0.1)
    rig.flush()
    assert [job_id for job_id, _ in rig.pending()] == [job.job_id]


def test_a_permanent_failure_spends_an_attempt_and_waits_a_backoff(tmp_path: Path) -> None:
    """An analysis error is an attempt spent; the retry waits min_backoff (30 s), the
    next one twice that, then the job fails with a failure frame."""
    rig = make_rig(tmp_path, count=1)
    job = add(rig, "slide-p")
    starts = []
    for _ in range(200):
        for _, d in rig.pending():
            starts.append(rig.reactor.seconds())
            d.errback(AnalysisFailed("ValueError: stain not recognised"))
        rig.step()
        if rig.job(job.job_id).state is JobState.FAILED:
            break
    final = rig.job(job.job_id)
    assert (final.state, final.attempts) == (JobState.FAILED, 2)
    assert "stain not recognised" in (final.last_error or "")
    waits = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    assert waits == pytest.approx([30, 60], abs=1)
    assert rig.writer.statuses[-1] == ("slide-p", Status.FAILED.value)


def test_past_max_deferral_age_a_job_fails_for_good_saying_why(tmp_path: Path) -> None:
    """An SPS down for longer than max_deferral_age (here 100 s): the job fails, its
    error names the limit and the last fault; no attempt was spent on it."""
    rig = make_rig(tmp_path, count=1, max_deferral_age=100.0, min_backoff=10.0, max_backoff=20.0)
    rig.writer.down_until = float("inf")
    job = add(rig, "slide-old")
    for _ in range(600):
        for _, d in rig.pending():
            rig.fetch_fails(d)
        rig.step()
        if rig.job(job.job_id).state is JobState.FAILED:
            break
    final = rig.job(job.job_id)
    assert final.state is JobState.FAILED
    assert final.attempts == 0
    assert "max_deferral_age (100 s" in (final.last_error or "")
    assert OUTAGE in (final.last_error or "")
    assert rig.reactor.seconds() < 200.0


def test_a_job_deferred_before_a_restart_probes_its_sps_at_once(tmp_path: Path) -> None:
    """Queued jobs deferred for their SPS by another daemon (or before a restart), for
    600 s: this daemon does not wait that out but lets one through as a probe right
    away, and its success resumes the others deferred for the same SPS."""
    spool = MemorySpool()
    spool.startService()
    deferred = []
    for i in range(3):
        job = success_result_of(spool.add(make_job(f"slide-{i}")))
        success_result_of(spool.claim(job.job_id))
        later = Deferral(600.0, OUTAGE, DeferralKind.SPS, since=0.0)
        deferred.append(
            success_result_of(spool.release(job.job_id, count_attempt=False, deferral=later))
        )
    rig = make_rig(tmp_path, spool=spool, count=1)
    for _ in range(60):
        for job_id, d in rig.pending():
            rig.answer(job_id, d)
        rig.step()
        if all(rig.job(job.job_id).state is JobState.DONE for job in deferred):
            break
    assert [rig.job(job.job_id).state for job in deferred] == [JobState.DONE] * 3
    assert rig.reactor.seconds() < 30.0
