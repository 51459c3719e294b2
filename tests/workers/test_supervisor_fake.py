"""Heartbeats, deadlines, cancellation, newer tokens and the shutdown drain, on a fake
process reactor (procmon's ``DummyProcessReactor`` idea) and a ``task.Clock``.

Each worker is a :class:`~fakes.FakeProcess` with a :class:`~fakes.FakeWorker` on its
AMP fds: the test decides when the analysis answers, whether heartbeats are answered
and when the process exits.  The real-process path is proven by test_supervisor.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import attrs
import pytest
from conftest import no_result, success_result_of
from fakes import FakeProcess, FakeWorker, FakeWriter, ProcessClock, make_job
from twisted.python.filepath import FilePath

from dpatia_daemon.config import WorkersConfig
from dpatia_daemon.frontdoor.routes import CANCEL_REQUESTED
from dpatia_daemon.jobs import Callback, Job, JobState
from dpatia_daemon.spool import MemorySpool
from dpatia_daemon.sps.results import Status
from dpatia_daemon.sps.tokens import TokenBook
from dpatia_daemon.workers.commands import JobCancelled
from dpatia_daemon.workers.events import SupervisorEvent
from dpatia_daemon.workers.folders import WorkFolders
from dpatia_daemon.workers.supervisor import Supervisor


@attrs.define
class Rig:
    """A supervisor with one fake worker over a memory spool."""

    reactor: ProcessClock
    spool: MemorySpool
    writer: FakeWriter
    tokens: TokenBook
    supervisor: Supervisor
    folders: WorkFolders
    events: list[SupervisorEvent] = attrs.field(factory=list)

    @property
    def process(self) -> FakeProcess:
        return self.reactor.last

    @property
    def worker(self) -> FakeWorker:
        worker = self.process.worker
        assert worker is not None
        return worker

    def flush(self) -> None:
        """Deliver what the fake worker answered (one reactor turn at a time)."""
        for _ in range(10):
            self.reactor.advance(0)

    def add(self, slide: str = "slide-1") -> Job:
        """Queue a job; with an idle worker it is running when this returns."""
        job = success_result_of(self.spool.add(make_job(slide)))
        self.flush()
        assert job.job_id in self.worker.jobs, "the job did not reach the worker"
        return job

    def get(self, job: Job) -> Job:
        self.flush()
        found = success_result_of(self.spool.get(job.job_id))
        assert found is not None
        return found

    def of(self, kind: str) -> list[SupervisorEvent]:
        return [e for e in self.events if e.kind == kind]

    def advance(self, seconds: float, step: float = 0.1) -> None:
        """Advance the clock in small steps, so timers fire on time."""
        target = self.reactor.seconds() + seconds
        while self.reactor.seconds() + step < target:
            self.reactor.advance(step)
        # The last step lands on the target exactly (no float drift).
        self.reactor.advance(target - self.reactor.seconds())
        self.flush()


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    reactor = ProcessClock(amp=True)
    spool = MemorySpool()
    spool.startService()
    writer = FakeWriter(reactor)
    tokens = TokenBook()
    folders = WorkFolders(FilePath(str(tmp_path / "work")))
    supervisor = Supervisor(
        reactor=reactor,
        spool=spool,
        writer=writer,  # type: ignore[arg-type]
        config=WorkersConfig(
            count=1,
            work_directory=folders.root,
            heartbeat_interval=1.0,
            kill_grace=2.0,
            job_timeout=10.0,
            shutdown_grace=5.0,
            max_attempts=1,
        ),
        analysis="fake",
        folders=folders,
        tokens=tokens,
        cancel_poll_interval=1.0,
        sweep_interval=3600.0,
        restart_initial=1.0,
    )
    rig = Rig(reactor, spool, writer, tokens, supervisor, folders)
    supervisor.observe(rig.events.append)
    supervisor.startService()
    rig.flush()
    assert [e.kind for e in rig.events] == ["worker-spawned", "worker-ready"]
    return rig


def test_a_worker_that_misses_three_heartbeats_is_terminated_and_its_job_fails(
    rig: Rig,
) -> None:
    """Pings every second: a worker that stops answering gets SIGTERM at the third
    missed interval (not before), the job's attempt fails saying why, and the slot gets
    a new worker."""
    job = rig.add()
    rig.worker.deaf = True
    rig.advance(3.9)  # pings at 1, 2, 3: the answers of 1 and 2 are missing
    assert rig.process.signals == []
    rig.advance(0.1)  # 4: the third missed answer
    assert rig.process.signals == ["TERM"]
    rig.advance(2.0)  # it ignores SIGTERM too
    assert rig.process.signals == ["TERM", "KILL"]
    rig.process.end(signal=9)
    final = rig.get(job)
    assert final.state is JobState.FAILED
    assert final.last_error == "the worker stopped answering heartbeats and was killed"
    assert rig.writer.writes[-1][1] == Status.FAILED.value
    rig.advance(1.0)
    assert len(rig.reactor.spawned) == 2
    assert rig.of("worker-ready")[-1].worker != rig.of("job-started")[0].worker


def test_an_analysis_past_job_timeout_is_stopped_and_its_attempt_fails(rig: Rig) -> None:
    """job_timeout 10 s: SIGTERM at 10 s (heartbeats answered all along), SIGKILL
    kill_grace later; the attempt fails with the deadline in its error."""
    job = rig.add()
    rig.advance(9.9)
    assert rig.process.signals == []
    rig.advance(0.1)
    assert rig.process.signals == ["TERM"]
    rig.advance(2.0)
    assert rig.process.signals == ["TERM", "KILL"]
    rig.process.end(signal=9)
    final = rig.get(job)
    assert final.state is JobState.FAILED
    assert "job_timeout (10 s)" in (final.last_error or "")


def test_a_cancellation_through_this_daemon_reaches_the_worker_at_once(rig: Rig) -> None:
    """What the front door does for a running job of its own daemon (the durable
    request, then its cancel_running hook) sends CancelJob before any clock tick; the
    analysis stops and the job ends CANCELLED with a Cancelled frame."""
    job = rig.add()
    success_result_of(rig.spool.request_cancel(job.job_id))
    assert rig.supervisor.cancel(job.job_id, CANCEL_REQUESTED)
    assert rig.worker.cancels == [job.job_id]
    rig.worker.jobs[job.job_id].errback(JobCancelled("stopped"))
    final = rig.get(job)
    assert final.state is JobState.CANCELLED
    assert rig.writer.writes[-1][1] == Status.CANCELLED.value
    assert rig.process.signals == []


def test_a_cancellation_through_another_process_is_seen_by_polling(rig: Rig) -> None:
    """A cancel marker written by another process on the spool: CancelJob at the next
    poll (cancel_poll_interval), not before."""
    job = rig.add()
    success_result_of(rig.spool.request_cancel(job.job_id))
    assert rig.worker.cancels == []
    rig.advance(1.0)
    assert rig.worker.cancels == [job.job_id]


def test_a_cancelled_analysis_that_does_not_stop_is_terminated_after_kill_grace(
    rig: Rig,
) -> None:
    """CancelJob unanswered by a result: SIGTERM kill_grace later; the job still ends
    CANCELLED (not failed)."""
    job = rig.add()
    assert rig.supervisor.cancel(job.job_id)
    rig.advance(1.9)
    assert rig.process.signals == []
    rig.advance(0.1)
    assert rig.process.signals == ["TERM"]
    rig.process.end(code=143)
    assert rig.get(job).state is JobState.CANCELLED


def test_stopping_drains_then_puts_the_running_job_back_and_waits_for_every_exit(
    rig: Rig,
) -> None:
    """stopService: the running job gets shutdown_grace (5 s); then its worker gets
    SIGTERM, the job is QUEUED again with no attempt counted, no worker is restarted,
    and the stop fires only once the process exited."""
    job = rig.add()
    stopped = rig.supervisor.stopService()
    rig.advance(4.9)
    no_result(stopped)
    assert rig.process.signals == []
    rig.advance(0.1)
    assert rig.process.signals == ["TERM"]
    no_result(stopped)
    rig.process.end(code=143)
    rig.advance(0.1)
    success_result_of(stopped)
    final = rig.get(job)
    assert (final.state, final.attempts) == (JobState.QUEUED, 0)
    assert len(rig.reactor.spawned) == 1


def test_stopping_lets_a_job_that_ends_within_the_grace_finish(rig: Rig, tmp_path: Path) -> None:
    """A job whose analysis answers during shutdown_grace is stored (DONE); its worker
    is then stopped by EOF, without a signal."""
    job = rig.add()
    stopped = rig.supervisor.stopService()
    rig.advance(1.0)
    path = rig.folders.folder(job).child("result.json")
    path.setContent(json.dumps({"jobId": job.job_id, "result": {"slideId": job.slide_id}}).encode())
    rig.worker.jobs[job.job_id].callback({"result_path": path.path})
    rig.advance(0.1)
    success_result_of(stopped)
    assert rig.get(job).state is JobState.DONE
    assert rig.process.signals == []
    assert 3 in rig.process.closed


def test_a_newer_callback_token_is_sent_to_the_running_jobs_worker(rig: Rig) -> None:
    """A request for the running job's slide brings a newer token: the worker is sent
    it (NewCallback) at once, and the job's own writes use it."""
    job = rig.add()
    newer = Callback("http://127.0.0.1:1/sps", "newer-token")
    rig.tokens.record(job.application_id, job.slide_id, newer, 1.0)
    rig.flush()
    assert rig.worker.callbacks == [(job.job_id, newer.url, newer.token)]
    [handed] = rig.of("job-callback")
    assert handed.detail["running"] is True
    # The same token again is nothing new.
    rig.tokens.record(job.application_id, job.slide_id, newer, 2.0)
    assert len(rig.worker.callbacks) == 1


def test_the_quality_control_verdict_rides_in_the_answer_and_goes_through_the_writer(
    rig: Rig,
) -> None:
    """RunJob answers with the verdict and the slide's QC versionId: the writer stores
    it after the final result (no second read of the work folder's files)."""
    job = rig.add()
    path = rig.folders.folder(job).child("result.json")
    path.setContent(json.dumps({"jobId": job.job_id, "result": {"slideId": job.slide_id}}).encode())
    rig.worker.jobs[job.job_id].callback(
        {"result_path": path.path, "quality_control": "Rejected", "qc_version": "qc-7"}
    )
    assert rig.get(job).state is JobState.DONE
    assert rig.writer.verdicts == [(job.job_id, "Rejected", "qc-7")]
    assert [kind for _, kind, _ in rig.writer.writes][-2:] == ["Final", "QC"]
