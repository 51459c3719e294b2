"""The supervisor's logic without processes: backoff, dispatch order, progress
throttling, output lines, and the AMP commands' round trip, all on a fake clock."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
from conftest import no_result, success_result_of
from fakes import FakeWriter, ProcessClock, make_job
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.test.iosim import connect, makeFakeClient, makeFakeServer

from dpatia_daemon.backoff import Backoff
from dpatia_daemon.config import WorkersConfig
from dpatia_daemon.jobs import Job, JobKind, JobState
from dpatia_daemon.models import Result
from dpatia_daemon.spool import MemorySpool
from dpatia_daemon.sps.results import Status
from dpatia_daemon.text import bounded
from dpatia_daemon.workers.candidates import Candidates
from dpatia_daemon.workers.child import WorkerProtocol
from dpatia_daemon.workers.commands import (
    AnalysisFailed,
    CancelJob,
    Hello,
    NewCallback,
    Ping,
    Progress,
    RunJob,
)
from dpatia_daemon.workers.folders import WorkFolders
from dpatia_daemon.workers.linelog import LineLog
from dpatia_daemon.workers.pool import CHILD_FDS, DaemonAMP, WorkerState
from dpatia_daemon.workers.run import JobRun
from dpatia_daemon.workers.supervisor import Supervisor


def make_supervisor(tmp_path: Path, reactor: Any, **config: Any) -> Supervisor:
    spool = MemorySpool()
    spool.startService()
    return Supervisor(
        reactor=reactor,
        spool=spool,
        writer=None,  # type: ignore[arg-type]  # no job runs in these tests
        config=WorkersConfig(count=1, work_directory=FilePath(str(tmp_path / "work")), **config),
        analysis="demo",
        folders=WorkFolders(FilePath(str(tmp_path / "work"))),
        restart_initial=1.0,
        healthy_after=5.0,
    )


def test_crash_loop_backs_off_doubling_to_the_cap_and_resets_after_a_healthy_run(
    tmp_path: Path,
) -> None:
    """Workers dying young are restarted after 1, 2, 4, 8, 8 s (cap 8); one that lived
    past healthy_after is replaced at once and the delay starts from 1 again."""
    reactor = ProcessClock()
    supervisor = make_supervisor(tmp_path, reactor, restart_backoff_cap=8.0)
    supervisor.startService()
    delays = []
    for _ in range(5):
        _, process, _, _ = reactor.spawned[-1]
        reactor.advance(0.5)  # dies young
        process.end(code=3)
        died = reactor.seconds()
        while len(reactor.spawned) == len(delays) + 1:
            reactor.advance(0.25)
        delays.append(reactor.spawned[-1][0] - died)
    assert delays == [1.0, 2.0, 4.0, 8.0, 8.0]

    # A healthy run: the next start is immediate and the delay resets.
    _, process, _, _ = reactor.spawned[-1]
    reactor.advance(10)
    process.end(code=1)
    reactor.advance(0)
    assert reactor.spawned[-1][0] == reactor.seconds()
    _, process, _, _ = reactor.spawned[-1]
    reactor.advance(0.5)
    process.end(code=3)
    reactor.advance(0.99)
    count = len(reactor.spawned)
    reactor.advance(0.02)
    assert len(reactor.spawned) == count + 1

    stopped = supervisor.stopService()
    no_result(stopped)
    reactor.spawned[-1][1].end(code=0)
    success_result_of(stopped)


def test_backoff_policy_values() -> None:
    """Backoff alone: young deaths double the delay up to the cap; healthy resets."""
    backoff = Backoff(initial=1.0, cap=5.0, healthy_after=5.0)
    assert [backoff.after_exit(0.1, healthy=False) for _ in range(5)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert backoff.after_exit(30.0, healthy=True) == 0.0
    assert backoff.after_exit(0.1, healthy=False) == 1.0
    # Long-lived but unhealthy (its analysis did not load): still backs off.
    assert backoff.after_exit(30.0, healthy=False) == 2.0


def test_workers_get_amp_on_fds_3_and_4_and_stop_on_eof(tmp_path: Path) -> None:
    """Spawn: python -m dpatia_daemon.workers.child with AMP on fds 3/4; stop closes fd 3 and
    fires only once the child exited, TERM then KILL if it lingers."""
    reactor = ProcessClock()
    supervisor = make_supervisor(tmp_path, reactor, kill_grace=10.0)
    supervisor.startService()
    _, process, args, fds = reactor.spawned[0]
    assert args[1:5] == ["-m", "dpatia_daemon.workers.child", "--analysis", "demo"]
    assert fds == CHILD_FDS == {0: "w", 1: "r", 2: "r", 3: "w", 4: "r"}
    assert b"Hello" in process.written
    stopped = supervisor.stopService()
    assert 3 in process.closed
    reactor.advance(10)
    assert process.signals == ["TERM"]
    reactor.advance(10)
    assert process.signals == ["TERM", "KILL"]
    no_result(stopped)
    process.end(signal=9)
    success_result_of(stopped)
    assert len(reactor.spawned) == 1  # no restart while stopping


def test_a_worker_that_never_says_hello_is_killed_and_replaced(tmp_path: Path) -> None:
    """start_timeout: a worker stuck before answering Hello is terminated."""
    reactor = ProcessClock()
    supervisor = make_supervisor(tmp_path, reactor)
    supervisor.start_timeout = 30.0
    supervisor.startService()
    _, process, _, _ = reactor.spawned[0]
    reactor.advance(30)
    assert process.signals == ["TERM"]
    assert supervisor.snapshot()[0]["state"] == WorkerState.STOPPING.value
    process.end(signal=15)
    reactor.advance(1.0)
    assert len(reactor.spawned) == 2
    supervisor.stopService()
    reactor.spawned[-1][1].end(code=0)


# --- dispatch order ---------------------------------------------------------------------


def test_candidates_order_manual_first_then_priority_then_oldest() -> None:
    """Manual create requests before notifications; within a class, higher priority,
    then oldest first; a re-offered job with a new rank moves."""
    jobs = {
        "n-old": make_job("n-old", created=1.0),
        "n-new": make_job("n-new", created=5.0),
        "n-urgent": make_job("n-urgent", created=9.0, priority=5),
        "c-new": make_job("c-new", kind=JobKind.CREATE, created=8.0),
        "c-old": make_job("c-old", kind=JobKind.CREATE, created=2.0),
    }
    candidates = Candidates()
    for job in jobs.values():
        candidates.offer(job)
    by_id = {job.job_id: name for name, job in jobs.items()}
    # A merge made the newest notification a manual request: it jumps ahead.
    candidates.offer(attrs.evolve(jobs["n-new"], kind=JobKind.CREATE))
    order = []
    while (job := candidates.pop()) is not None:
        order.append(by_id[job.job_id])
    assert order == ["c-old", "n-new", "c-new", "n-urgent", "n-old"]
    assert len(candidates) == 0


def test_candidates_are_bounded_but_never_refuse_a_manual_request() -> None:
    """At most ``limit`` notifications are held (then the list says it is truncated,
    so the spool is listed again when it runs dry); a manual request always fits."""
    candidates = Candidates(limit=3)
    candidates.offer_all(make_job(f"s{i}", created=float(i)) for i in range(10))
    assert len(candidates) == 3
    assert candidates.truncated
    assert candidates.offer(make_job("manual", kind=JobKind.CREATE, created=99.0))
    assert not candidates.offer(make_job("late", created=100.0))
    assert candidates.pop().slide_id == "manual"  # type: ignore[union-attr]


# --- progress throttling ----------------------------------------------------------------


def running_job(tmp_path: Path) -> tuple[MemorySpool, Job, Clock, FakeWriter, JobRun]:
    spool = MemorySpool()
    spool.startService()
    job = success_result_of(spool.add(make_job("slide-p")))
    claimed = success_result_of(spool.claim(job.job_id))
    clock = Clock()
    writer = FakeWriter(clock)
    run = JobRun(
        job=claimed,
        spool=spool,
        writer=writer,  # type: ignore[arg-type]
        folders=WorkFolders(FilePath(str(tmp_path / "work"))),
        clock=clock,
        progress_interval=2.0,
    )
    run.prepare()
    run.begin()
    return spool, claimed, clock, writer, run


def test_progress_is_throttled_to_one_write_per_interval_with_the_latest_values(
    tmp_path: Path,
) -> None:
    """Reports at 0, 0.5, 1, 1.5, 2.5, 3 s with a 2 s interval: written at 0 (first),
    2 (the 1.5 s value) and 4 (the 3 s value); nothing more once it is quiet."""
    _, _, clock, writer, run = running_job(tmp_path)
    reports = {0.0: 1, 0.5: 2, 1.0: 3, 1.5: 4, 2.5: 5, 3.0: 6}
    for step in range(20):  # 0.5 s steps, so timers fire on time
        if step * 0.5 in reports:
            run.on_progress(reports[step * 0.5], "working")
        clock.advance(0.5)
    assert [(t, p) for t, _, p in writer.writes] == [(0.0, 1), (2.0, 4), (4.0, 6)]


def test_no_progress_frame_is_written_after_the_final_result(tmp_path: Path) -> None:
    """A progress write in flight when the analysis ends is written first; a pending
    (throttled) one is dropped; nothing follows the final write."""
    spool, job, clock, writer, run = running_job(tmp_path)
    gate: Deferred[None] = Deferred()
    writer.hold.append(gate)
    run.on_progress(10, "first")  # in flight, held
    clock.advance(0.5)
    run.on_progress(20, "pending")  # throttled until t=2
    done = ensureDeferred(run.complete(Result(slideId=job.slide_id, displayResult="42")))
    no_result(done)
    gate.callback(None)
    success_result_of(done)
    clock.advance(10)
    run.on_progress(30, "late")
    clock.advance(10)
    assert [kind for _, kind, _ in writer.writes] == [Status.RUNNING.value, "Final"]
    assert success_result_of(spool.get(job.job_id)).state is JobState.DONE


def test_a_failed_attempt_is_retried_and_the_last_one_fails_with_a_frame(tmp_path: Path) -> None:
    """Attempts below max_attempts go back to the queue (counted) with a retry frame;
    the last one ends FAILED with a failure frame."""
    spool, job, _, writer, run = running_job(tmp_path)
    run.max_attempts = 2
    success_result_of(ensureDeferred(run.fail("boom")))
    requeued = success_result_of(spool.get(job.job_id))
    assert (requeued.state, requeued.attempts, requeued.last_error) == (JobState.QUEUED, 1, "boom")
    assert writer.writes[-1][1] == Status.QUEUED.value

    claimed = success_result_of(spool.claim(job.job_id))
    second = JobRun(
        job=claimed,
        spool=spool,
        writer=writer,  # type: ignore[arg-type]
        folders=run.folders,
        clock=run.clock,
        max_attempts=2,
    )
    success_result_of(ensureDeferred(second.fail("boom again")))
    final = success_result_of(spool.get(job.job_id))
    assert (final.state, final.last_error) == (JobState.FAILED, "boom again")
    assert writer.writes[-1][1] == Status.FAILED.value


# --- worker output ----------------------------------------------------------------------


def test_output_lines_are_cut_escaped_and_rate_limited() -> None:
    """A 100 kB line is cut at max_line, binary and control bytes are escaped, a flood
    is limited to the burst and then reported as dropped."""
    clock = Clock()
    lines: list[str] = []
    out = LineLog(lines.append, clock, max_line=100, rate=10.0, burst=5.0)
    out.feed(b"x" * 5000)
    out.feed(b"y" * 5000 + b"\nok\n")
    out.feed(b"\x00\xff bin \x1b[31m\r\n")
    assert lines[0] == "x" * 100 + " [line cut at 100 bytes]"
    assert lines[1] == "ok"
    assert lines[2] == "\\x00\\xff bin \\x1b[31m"
    lines.clear()
    out.feed(b"".join(b"flood %d\n" % i for i in range(50)))
    assert len(lines) == 2  # the rest of the burst
    clock.advance(1.0)
    out.feed(b"after\n")
    assert lines[2:] == ["[48 lines dropped: more than 10 lines/s]", "after"]
    out.feed(b"no newline")
    out.flush()
    assert lines[-1] == "no newline"


# --- AMP round trip ---------------------------------------------------------------------


def test_amp_commands_round_trip_in_memory() -> None:
    """Hello, Ping, CancelJob, NewCallback and an AnalysisFailed RunJob daemon → worker; Progress
    worker → daemon; error messages keep their text."""
    progress: list[tuple[str, int, str]] = []
    daemon = DaemonAMP(lambda job_id, percent, text: progress.append((job_id, percent, text)))
    worker = WorkerProtocol(
        reactor=Clock(),
        spec="no.such:analysis",
        analysis=None,
        load_error="cannot import no.such",
    )
    pump = connect(worker, makeFakeServer(worker), daemon, makeFakeClient(daemon))

    hello = daemon.callRemote(Hello)
    pump.flush()
    answer = success_result_of(hello)
    assert answer["analysis"] == "no.such:analysis"
    assert answer["load_error"] == "cannot import no.such"

    ping = daemon.callRemote(Ping)
    pump.flush()
    assert success_result_of(ping) == {}

    # An error answer with no errback attached makes AMP drop the connection: the
    # errback goes on at once, as in the supervisor.
    failures: list[Failure] = []
    daemon.callRemote(RunJob, job_id="ab12", work_dir="/nonexistent").addErrback(failures.append)
    pump.flush()
    assert failures[0].check(AnalysisFailed)
    assert failures[0].value.message == "cannot import no.such"

    cancel = daemon.callRemote(CancelJob, job_id="ab12")
    pump.flush()
    assert success_result_of(cancel) == {"running": False}

    newer = daemon.callRemote(NewCallback, job_id="ab12", url="http://sps.test/x", token="t2")
    pump.flush()
    assert success_result_of(newer) == {"running": False}

    report = worker.callRemote(Progress, job_id="ab12", percent=40, text="halfway")
    pump.flush()
    success_result_of(report)
    assert progress == [("ab12", 40, "halfway")]


def test_long_messages_are_bounded_for_amp() -> None:
    """Texts sent over AMP are cut below its 64 KiB value limit."""
    assert len(bounded("x" * 100_000)) == 4000
    assert bounded("short") == "short"
