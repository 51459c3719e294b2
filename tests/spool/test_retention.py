"""History retention: old done/failed/cancelled records pruned in steps, corrupt/ kept."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import no_result, success_result_of
from spool_helpers import make_job
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.python.filepath import FilePath

from dpatia_daemon.jobs import JobState
from dpatia_daemon.spool import SpoolStore
from dpatia_daemon.spool.retention import HistoryPrune, Retention, prune_history

NOW = 1_900_000_000.0
DAY = 86400.0


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SpoolStore]:
    s = SpoolStore(FilePath(str(tmp_path / "spool")), owner="test")
    s.open()
    yield s
    s.close()


def ended(store: SpoolStore, slide: str, state: JobState, age_days: float) -> str:
    """Add a job for ``slide``, end it in ``state``, and age its record; its job id."""
    job = store.add(make_job(slide))
    if state is JobState.CANCELLED:
        store.cancel(job.job_id)
    else:
        assert store.claim(job.job_id) is not None
        store.finish(job.job_id, state, "boom" if state is JobState.FAILED else None)
    [path] = (store.directory.child(state.value)).globChildren(f"*.{job.job_id}.json")
    os.utime(path.path, (NOW - age_days * DAY, NOW - age_days * DAY))
    return job.job_id


def history(store: SpoolStore) -> set[str]:
    return {
        name.split(".")[1]
        for state in ("done", "failed", "cancelled")
        for name in os.listdir(store.directory.child(state).path)
    }


def retention(store: SpoolStore, clock: Clock, **kw: object) -> Retention:
    return Retention(
        store=store,
        clock=clock,
        retention_days=30,
        wall_clock=lambda: NOW,
        **kw,  # type: ignore[arg-type]
    )


def test_a_pass_removes_only_ended_records_older_than_retention_days(store: SpoolStore) -> None:
    """Old done, failed and cancelled records go; young ones and active jobs stay."""
    old = {
        ended(store, f"old-{s.value}", s, 31)
        for s in (JobState.DONE, JobState.FAILED, JobState.CANCELLED)
    }
    young = {
        ended(store, f"new-{s.value}", s, 29)
        for s in (JobState.DONE, JobState.FAILED, JobState.CANCELLED)
    }
    queued = store.add(make_job("waiting"))
    running = store.add(make_job("busy"))
    store.claim(running.job_id)
    clock = Clock()
    service = retention(store, clock)
    service.startService()
    clock.advance(3600)
    assert history(store) == young
    assert not old & history(store)
    assert service.last is not None and service.last.removed == 3
    assert store.get(queued.job_id) is not None
    assert store.get(running.job_id) is not None
    success_result_of(service.stopService())


def test_a_pass_runs_in_bounded_steps_with_pauses_between_them(store: SpoolStore) -> None:
    """With batch 2, five old records take three steps, one per pause of the clock."""
    for n in range(5):
        ended(store, f"old-{n}", JobState.DONE, 40)
    clock = Clock()
    service = retention(store, clock, batch=2, pause=1.0)
    service.startService()
    clock.advance(3600)
    assert len(history(store)) == 3  # the first step only
    clock.advance(1.0)
    assert len(history(store)) == 1
    clock.advance(1.0)
    assert history(store) == set()
    assert service.last is not None and (service.last.removed, service.last.finished) == (5, True)
    success_result_of(service.stopService())


def test_stop_waits_for_the_step_in_progress_and_ends_the_pass(store: SpoolStore) -> None:
    """A step running in the thread pool finishes before stopService fires; no more follow."""
    for n in range(4):
        ended(store, f"old-{n}", JobState.DONE, 40)
    pending: list[tuple[Deferred[object], object, tuple[object, ...]]] = []

    def later(f: object, *args: object) -> Deferred[object]:
        d: Deferred[object] = Deferred()
        pending.append((d, f, args))
        return d

    def run_next() -> None:
        d, f, args = pending.pop(0)
        d.callback(f(*args))  # type: ignore[operator]

    clock = Clock()
    service = retention(store, clock, batch=1, run_blocking=later)
    service.startService()
    clock.advance(3600)
    run_next()  # corrupt count
    run_next()  # begin
    stopped = service.stopService()
    no_result(stopped)  # the first step is still in the pool
    run_next()  # that step
    run_next()  # end: the lock is released
    assert success_result_of(stopped) is None
    assert len(history(store)) == 3
    assert pending == []
    # The lock was released: another pass can start at once.
    assert prune_history(store, NOW) is not None


def test_a_second_pass_while_one_holds_the_lock_leaves_the_work_to_it(store: SpoolStore) -> None:
    """Another daemon pruning the same spool: this one skips its pass, no error."""
    ended(store, "old", JobState.FAILED, 40)
    other = HistoryPrune(store, NOW)
    assert other.begin()
    try:
        clock = Clock()
        service = retention(store, clock)
        assert success_result_of(service.run_pass()) is None
        assert len(history(store)) == 1
    finally:
        other.end()


def test_records_removed_by_someone_else_meanwhile_count_as_gone(store: SpoolStore) -> None:
    """A record another daemon pruned after this pass listed it is not an error: it
    counts as gone, and the pass goes on."""
    for n in range(3):
        ended(store, f"old-{n}", JobState.DONE, 40)
    prune = HistoryPrune(store, NOW - 30 * DAY, max_scan=1)
    assert prune.begin()
    try:
        first = prune.step()  # the directory is listed now; one record removed
        assert (first.removed, first.finished) == (1, False)
        for child in store.directory.child("done").children():
            child.remove()  # another daemon is quicker with the other two
        rest = prune.step() + prune.step() + prune.step()
    finally:
        prune.end()
    assert (rest.removed, rest.gone, rest.finished) == (0, 2, True)


def test_corrupt_records_are_kept_and_reported_with_a_warning(store: SpoolStore) -> None:
    """corrupt/ is never pruned; each pass counts it and logs one warning with the count."""
    corrupt = store.directory.child("corrupt")
    for n in range(2):
        path = corrupt.child(f"done.bad{n}.json.x")
        path.setContent(b"not json")
        os.utime(path.path, (NOW - 400 * DAY, NOW - 400 * DAY))
    clock = Clock()
    service = retention(store, clock)
    with capturedLogs() as events:
        counts = success_result_of(service.run_pass())
    assert counts is not None and counts.finished
    warnings = [formatEvent(e) for e in events if e["log_level"] is LogLevel.warn]
    assert len(warnings) == 1 and "2 quarantined records in corrupt/" in warnings[0]
    assert service.corrupt == 2
    assert len(corrupt.children()) == 2


def test_the_daemon_tree_has_a_retention_service_and_a_front_door_none(tmp_path: Path) -> None:
    """The main process prunes history; an extra front-door process leaves it to it."""
    from conftest import write_config

    from dpatia_daemon.config import load_config
    from dpatia_daemon.service import build_service

    config = load_config(write_config(tmp_path, {"server": {"listen": "tcp:0"}}))
    main = [s.name for s in build_service(config, MemoryReactorClock())]
    door = [s.name for s in build_service(config, MemoryReactorClock(), front_door=1)]
    assert main.index("retention") == main.index("spool") + 1
    assert "retention" not in door
