"""The dispatcher's bounded window of candidates, and its first dispatch on a backlog.

The window (``workers/candidates.py``) holds the best queued jobs only; the dispatcher
refills it from ``spool.queued_head`` (the spool's index) when it runs low, so a
daemon starting on a large queue dispatches after reading the head, not the queue.
"""

from __future__ import annotations

from collections.abc import Container
from pathlib import Path
from typing import Any

import attrs
from conftest import success_result_of
from fakes import FakeWriter, ProcessClock, make_job
from twisted.internet.defer import Deferred
from twisted.python.filepath import FilePath

from dpatia_daemon.config import WorkersConfig
from dpatia_daemon.jobs import Job, JobKind
from dpatia_daemon.spool import MemorySpool
from dpatia_daemon.sps.tokens import TokenBook
from dpatia_daemon.workers.candidates import Candidates
from dpatia_daemon.workers.folders import WorkFolders
from dpatia_daemon.workers.health import SPSHealth
from dpatia_daemon.workers.supervisor import Supervisor
from dpatia_daemon.workers.waiting import Waiting


def _backlog(n: int) -> list[Job]:
    """``n`` notifications (oldest last), and one manual request and one of priority 5
    created last: dispatch order puts those two first."""
    jobs = [make_job(f"s{i}", created=float(n - i)) for i in range(n)]
    jobs.append(make_job("prio", created=float(n + 1), priority=5))
    jobs.append(make_job("click", kind=JobKind.CREATE, created=float(n + 2)))
    return jobs


def test_the_window_is_bounded_and_keeps_the_best() -> None:
    """2 000 offered to a window of 50: it holds 50, the best, and says it is truncated;
    a better job pushes the worst out, a worse one stays out; pops come in order."""
    jobs = _backlog(2000)
    window = Candidates(limit=50)
    for job in jobs:
        window.offer(job)
    assert len(window) == 50 and window.truncated
    best = sorted(jobs, key=Job.sort_key)
    better = make_job("late-click", kind=JobKind.CREATE, created=1e9)
    assert window.offer(better)
    assert not window.offer(make_job("worst", created=1e9))
    assert len(window) == 50
    popped = [window.pop() for _ in range(50)]
    expected = sorted([*best[:49], better], key=Job.sort_key)
    assert [j.job_id for j in popped if j] == [j.job_id for j in expected]
    assert window.pop() is None


def test_a_merge_that_raises_a_priority_moves_the_job() -> None:
    window = Candidates(limit=10)
    a, b = make_job("a", created=1.0), make_job("b", created=2.0)
    window.offer(a)
    window.offer(b)
    window.offer(attrs.evolve(b, priority=3))
    first = window.pop()
    assert first is not None and first.job_id == b.job_id and first.priority == 3
    assert window.pop() == a and len(window) == 0


def test_refill_says_whether_the_spool_holds_more() -> None:
    window = Candidates(limit=8)
    assert window.refill(_backlog(5), complete=True) == 7
    assert not window.truncated and not window.low
    window.refill([], complete=False)
    assert window.truncated and not window.low  # 7 left of 8: not low yet
    while len(window) > 2:
        window.pop()
    assert window.low


@attrs.define(eq=False)
class CountingSpool(MemorySpool):
    """A memory spool that counts the queued records its listings and reads hand out."""

    handed: int = 0
    full_listings: int = 0

    def queued(self) -> Deferred[list[Job]]:
        self.full_listings += 1
        d = super().queued()
        return d.addCallback(self._count)

    def queued_head(
        self, limit: int, skip: Container[str] = (), after: Job | None = None
    ) -> Deferred[list[Job]]:
        return super().queued_head(limit, skip, after).addCallback(self._count)

    def queued_of(self, key: str, seen: object = None) -> Deferred[tuple[object, Job | None]]:
        def count(found: tuple[object, Job | None]) -> tuple[object, Job | None]:
            self.handed += found[1] is not None
            return found

        return super().queued_of(key, seen).addCallback(count)

    def find(self, **kw: Any) -> Deferred[list[Job]]:
        self.full_listings += 1
        return super().find(**kw)

    def _count(self, jobs: list[Job]) -> list[Job]:
        self.handed += len(jobs)
        return jobs


def _started() -> CountingSpool:
    spool = CountingSpool()
    spool.startService()
    return spool


def _supervisor(tmp_path: Path, spool: MemorySpool, reactor: ProcessClock) -> Supervisor:
    folders = WorkFolders(FilePath(str(tmp_path / "work")))
    return Supervisor(
        reactor=reactor,
        spool=spool,
        writer=FakeWriter(reactor),  # type: ignore[arg-type]
        config=WorkersConfig(count=2, work_directory=folders.root, max_attempts=1),
        analysis="fake",
        folders=folders,
        tokens=TokenBook(),
        cancel_poll_interval=1.0,
        sweep_interval=3600.0,
        restart_initial=1.0,
    )


def test_first_dispatch_on_a_backlog_reads_the_head_not_the_queue(tmp_path: Path) -> None:
    """A daemon starting on 3 000 queued jobs dispatches the manual request, then the
    high-priority one, having been handed at most a window of records (and never the
    whole queue); as the window runs low it is refilled in order."""
    reactor, spool, jobs = ProcessClock(amp=True), _started(), _backlog(3000)
    for job in jobs:
        success_result_of(spool.add(job))
    supervisor = _supervisor(tmp_path, spool, reactor)
    supervisor.startService()
    for _ in range(10):
        reactor.advance(0)
    running = [p.worker.jobs for _, p, *_ in reactor.spawned if p.worker is not None]
    started = [job_id for worker_jobs in running for job_id in worker_jobs]
    assert sorted(started) == sorted([jobs[-1].job_id, jobs[-2].job_id])
    assert spool.handed <= 2 * 512
    assert spool.full_listings == 0
    # The rest of the queue is still on "disk" only: nothing beyond the window is held.
    dispatcher = supervisor._dispatcher
    assert dispatcher is not None
    assert len(dispatcher._candidates) <= 512
    # Dispatch order continues from the window: the oldest notifications next.
    best = sorted(jobs, key=Job.sort_key)
    window_order = []
    while (job := dispatcher._candidates.pop()) is not None:
        window_order.append(job.job_id)
    assert window_order == [j.job_id for j in best[2 : 2 + len(window_order)]]


def test_an_outage_walks_the_backlog_once_and_keeps_notes_not_jobs(tmp_path: Path) -> None:
    """With the SPS failing, a daemon on 3 000 queued jobs holds them all back: it reads
    each record about once (a refill skips the jobs already waiting, by their index
    names, instead of reading them again: the old refill re-read them all each time),
    and the waiting room keeps a small note of each, not the parsed job.  When the SPS
    answers again the jobs come back from their records, best first."""
    reactor, spool, jobs = ProcessClock(amp=True), _started(), _backlog(3000)
    for job in jobs:
        success_result_of(spool.add(job))
    health = SPSHealth(reactor, probe_interval=600.0)
    health.failed("http://127.0.0.1:1/sps", "HTTP 503")
    supervisor = attrs.evolve(_supervisor(tmp_path, spool, reactor), health=health)
    supervisor.startService()
    for _ in range(50):
        reactor.advance(0)
    dispatcher = supervisor._dispatcher
    assert dispatcher is not None
    waiting = dispatcher.waiting
    assert len(waiting) == len(jobs)
    assert all(isinstance(note, Waiting) for note in waiting.jobs())
    assert spool.handed <= len(jobs) + 2 * 512  # each record once, and a window more
    assert spool.full_listings == 0
    started = [p.worker.jobs for _, p, *_ in reactor.spawned if p.worker is not None]
    assert not any(started)

    handed = spool.handed
    health.succeeded("http://127.0.0.1:1/sps")
    for _ in range(50):
        reactor.advance(0)
    assert len(waiting) == 0
    running = [p.worker.jobs for _, p, *_ in reactor.spawned if p.worker is not None]
    first = sorted(job_id for worker_jobs in running for job_id in worker_jobs)
    assert first == sorted([jobs[-1].job_id, jobs[-2].job_id])  # the click, then priority 5
    assert len(dispatcher._candidates) <= 512
    # Back from the records: one read each, no listing of the queue.
    assert spool.handed - handed <= len(jobs) + 2 * 512
    assert spool.full_listings == 0
