"""The queue's index (``spool/index.py``): the head of a large queue and a slide's jobs
without reading the queue, kept right by every transition, repaired by reconciliation.

Real files; fsync is a no-op here (what is measured is reads, not durability).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
from spool_helpers import make_job
from twisted.python.filepath import FilePath

from dpatia_daemon.jobs import Job, JobKind, JobState
from dpatia_daemon.spool import SpoolStore
from dpatia_daemon.spool.index import Entry, QueueIndex, entry_name
from dpatia_daemon.spool.transitions import JobFilter


def _store(path: Path, owner: str = "test") -> SpoolStore:
    store = SpoolStore(FilePath(str(path)), owner=owner, fsync=lambda fd: None)
    store.open()
    return store


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SpoolStore]:
    s = _store(tmp_path / "spool")
    yield s
    s.close()


def _fill(store: SpoolStore, jobs: list[Job]) -> list[Job]:
    out: list[Job] = []
    for i in range(0, len(jobs), 500):
        batch = jobs[i : i + 500]
        results = store.commit_batch(batch, store.write_temps(batch))
        assert all(isinstance(r, Job) for r in results)
        out.extend(r for r in results if isinstance(r, Job))
    return out


def _mixed(n: int) -> list[Job]:
    """``n`` jobs of many slides: notifications of several priorities and a few manual
    requests, created in an order that is not their dispatch order."""
    jobs = []
    for i in range(n):
        manual = i % 97 == 13
        jobs.append(
            make_job(
                f"slide-{i}",
                kind=JobKind.CREATE if manual else JobKind.NOTIFICATION,
                created=1000.0 + ((i * 7919) % n) * 0.001,
                priority=(i % 3),
            )
        )
    return jobs


class _Reads:
    """Counts the records a store decodes."""

    def __init__(self, store: SpoolStore, monkeypatch: Any) -> None:
        self.count = 0
        decode = SpoolStore._decode

        def counting(me: SpoolStore, *args: Any) -> Job:
            if me is store:
                self.count += 1
            return decode(me, *args)

        monkeypatch.setattr(SpoolStore, "_decode", counting)


def _entries(store: SpoolStore) -> list[str]:
    return sorted(store._index.names())


def test_entry_names_sort_in_dispatch_order() -> None:
    """Names compare as sort_key does: manual first, then priority, then age."""
    jobs = _mixed(300) + [make_job("p", kind=JobKind.NOTIFICATION, priority=-5, created=1.0)]
    by_name = sorted(jobs, key=entry_name)
    assert [j.job_id for j in by_name] == [j.job_id for j in sorted(jobs, key=Job.sort_key)]
    assert all(Entry.parse(entry_name(j)) is not None for j in jobs)
    # No slide id (PHI) in a name.
    assert all("slide" not in entry_name(j) for j in jobs)


def test_head_of_a_large_queue_reads_only_the_head(store: SpoolStore, monkeypatch: Any) -> None:
    """The best 20 of 300 queued jobs, in queued()'s order, reading 20 records."""
    _fill(store, _mixed(300))
    fresh = _store(Path(store.directory.path), owner="restarted")
    try:
        reads = _Reads(fresh, monkeypatch)
        head = fresh.queued_head(20)
        assert reads.count <= 20
        assert [j.job_id for j in head] == [j.job_id for j in fresh.queued()[:20]]
        assert head[0].kind is JobKind.CREATE
        # The sweep reads the head too, not the queue (the index is consistent).
        reads.count = 0
        recovered, queued = fresh.sweep(None, head=50)
        assert recovered == [] and len(queued) == 50
        assert reads.count <= 50
        # And a claim by id (no hint: a restart) finds the key from the index's names.
        fresh._hints.clear()
        reads.count = 0
        claimed = fresh.claim(head[0].job_id)
        assert claimed is not None and reads.count <= 2
        fresh.finish(head[0].job_id, JobState.DONE)
    finally:
        fresh.close()


def test_a_head_that_skips_jobs_reads_none_of_them(store: SpoolStore, monkeypatch: Any) -> None:
    """queued_head(limit, skip): the best ``limit`` jobs but the skipped ones (those the
    dispatcher already holds), reading ``limit`` records whatever ``skip`` holds."""
    _fill(store, _mixed(300))
    order = store.queued()
    skip = {j.job_id for j in order[:200:2]}  # every other one of the best 200
    reads = _Reads(store, monkeypatch)
    head = store.queued_head(20, skip=skip)
    assert reads.count <= 20
    assert [j.job_id for j in head] == [j.job_id for j in order if j.job_id not in skip][:20]
    reads.count = 0
    assert store.queued_head(20, skip={j.job_id for j in order}) == []
    assert reads.count == 0


def test_a_head_after_a_job_continues_the_walk(store: SpoolStore, monkeypatch: Any) -> None:
    """queued_head(limit, after=job): the next window after ``job`` in dispatch order,
    ``limit`` records read; the sorted listing is reused by the next windows, and a
    head from the start lists afresh (it sees a job queued meanwhile)."""
    _fill(store, _mixed(300))
    order = store.queued()
    reads = _Reads(store, monkeypatch)
    window = store.queued_head(20, after=order[49])
    assert [j.job_id for j in window] == [j.job_id for j in order[50:70]]
    assert reads.count <= 20
    listings = 0
    names = QueueIndex.names

    def counting(index: QueueIndex) -> Iterator[str]:
        nonlocal listings
        listings += 1
        return names(index)

    monkeypatch.setattr(QueueIndex, "names", counting)
    skip = {j.job_id for j in order[70:80]}
    nxt = store.queued_head(20, skip=skip, after=window[-1])
    assert [j.job_id for j in nxt] == [j.job_id for j in order[80:100]]
    assert listings == 0  # the walk's listing, sorted once
    late = store.add(make_job("late", kind=JobKind.CREATE, priority=99, created=5000.0))
    assert store.queued_head(1)[0].job_id == late.job_id and listings == 1


def test_find_for_a_slide_reads_its_bucket_only(store: SpoolStore, monkeypatch: Any) -> None:
    """find(slide_id=...) reads the slide's queued records, not the queue's."""
    jobs = _fill(store, _mixed(300))
    region = make_job("slide-150", input={"type": "taggedPolygon", "content": {"a": 1}})
    store.add(region)
    reads = _Reads(store, monkeypatch)
    found = store.find(JobFilter(slide_id="slide-150"))
    assert {j.job_id for j in found} == {jobs[150].job_id, region.job_id}
    assert reads.count <= 8  # the bucket holds about 300/256 slides' jobs
    assert store.find(JobFilter(slide_id="nowhere")) == []


def test_transitions_keep_one_entry_per_queued_job(store: SpoolStore) -> None:
    """Add, merge (raising the priority: the job moves), claim, release, cancel: the
    index always names exactly the queued records, so reconciliation has nothing to do."""
    a = store.add(make_job("a", kind=JobKind.NOTIFICATION, priority=0))
    b = store.add(make_job("b", kind=JobKind.NOTIFICATION, created=50.0))
    merged = store.add(make_job("a", kind=JobKind.NOTIFICATION, priority=9, created=200.0))
    assert merged.job_id == a.job_id and merged.priority == 9
    assert _entries(store) == sorted(entry_name(j) for j in (merged, b))
    assert [j.job_id for j in store.queued_head(1)] == [a.job_id]  # priority 9 first
    assert store.claim(a.job_id) is not None
    assert _entries(store) == [entry_name(b)]
    again = store.release(a.job_id, count_attempt=True, error="x")
    assert sorted(_entries(store)) == sorted([entry_name(b), entry_name(again)])
    assert store.cancel(b.job_id) is not None
    assert _entries(store) == [entry_name(again)]
    assert store.reconcile_index() == 0


def test_reconciliation_repairs_missing_and_stale_entries(store: SpoolStore) -> None:
    """An index lost (an older daemon, a crash) or naming a job gone is repaired from the
    records; a reader skips a stale entry meanwhile."""
    jobs = _fill(store, _mixed(50))
    best = sorted(jobs, key=Job.sort_key)
    # A stale entry: the record removed behind the index's back.
    os.unlink(store._active_path(JobState.QUEUED, best[0].key).path)
    assert [j.job_id for j in store.queued_head(3)] == [j.job_id for j in best[1:4]]
    # Missing entries: half of the index gone.
    for name in _entries(store)[::2]:
        store._index.unlink(name)
    assert store.reconcile_index() > 0
    assert _entries(store) == sorted(entry_name(j) for j in best[1:])
    assert [j.job_id for j in store.queued_head(100)] == [j.job_id for j in best[1:]]
    # A doubled entry (a crash between a merge's rename steps) goes too.
    store._index.put(attrs.evolve(best[1], priority=77))
    assert store.reconcile_index() == 1
    assert store.reconcile_index() == 0


def test_another_daemon_on_the_spool_sees_and_updates_the_same_index(tmp_path: Path) -> None:
    """Two stores on one directory: each one's adds and claims show in the other's head."""
    one, two = _store(tmp_path / "s", "one"), _store(tmp_path / "s", "two")
    try:
        x = one.add(make_job("x", kind=JobKind.NOTIFICATION))
        y = two.add(make_job("y", created=500.0))  # manual: first
        assert [j.job_id for j in one.queued_head(5)] == [y.job_id, x.job_id]
        assert two.claim(x.job_id) is not None
        assert [j.job_id for j in one.queued_head(5)] == [y.job_id]
        assert one.claim(y.job_id) is not None
        assert one.queued_head(5) == [] and two.queued_head(5) == []
    finally:
        one.close()
        two.close()


def test_a_fresh_spool_without_index_is_indexed_at_first_use(tmp_path: Path) -> None:
    """A spool written before the index existed: the first lookup indexes it once."""
    s = _store(tmp_path / "old")
    try:
        jobs = _fill(s, _mixed(30))
        for name in _entries(s):
            s._index.unlink(name)
    finally:
        s.close()
    s = _store(tmp_path / "old")
    try:
        head = s.queued_head(5)
        assert [j.job_id for j in head] == [j.job_id for j in sorted(jobs, key=Job.sort_key)[:5]]
        assert len(_entries(s)) == 30
    finally:
        s.close()


def test_the_quick_check_trusts_agreeing_counts_and_repairs_the_rest(store: SpoolStore) -> None:
    """check_index compares counts only; a difference makes it reconcile; every
    FULL_RECONCILE_EVERY-th sweep reconciles whatever the counts say."""
    from dpatia_daemon.spool.store import FULL_RECONCILE_EVERY

    jobs = _fill(store, _mixed(20))
    assert store.check_index() is False
    name = _entries(store)[0]
    store._index.unlink(name)
    assert store.check_index() is True and name in _entries(store)
    # Two faults that cancel out (one entry missing, one stale): counts agree.
    store._index.unlink(name)
    store._index.put(attrs.evolve(jobs[0], job_id="ab" * 16))
    assert store.check_index() is False
    for _ in range(FULL_RECONCILE_EVERY):
        store.sweep(None)
    assert _entries(store) == sorted(entry_name(j) for j in jobs)
