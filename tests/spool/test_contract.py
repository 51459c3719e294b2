"""The spool contract, run against both implementations.

Every test here takes the ``spool`` fixture, parametrised over :class:`MemorySpool`
and a :class:`DirectorySpool` on ``tmp_path`` driven by the real reactor, so the two
cannot drift apart.  What only real files can show is in ``test_directory.py``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
from spool_helpers import make_job, start_directory_spool
from twisted.logger import globalLogPublisher

from dpatia_daemon.jobs import Deferral, DeferralKind, Job, JobKind, JobState
from dpatia_daemon.spool import (
    DirectorySpool,
    ISpool,
    JobChanged,
    JobMoved,
    MemorySpool,
    NotHeld,
)
from dpatia_daemon.spool.transitions import resumed


@pytest_twisted.async_yield_fixture(params=["memory", "directory"])
async def spool(request: Any, tmp_path: Path, reactor: Any) -> AsyncIterator[Any]:
    """A started spool of each implementation."""
    s: Any
    if request.param == "memory":
        s = MemorySpool()
        s.startService()
    else:
        s = start_directory_spool(tmp_path / "spool", reactor)
        # The start-up sweep's announcements must not race the test's first add.
        await s.sweep()
    yield s
    await s.stopService()


def _with(job: Job, **changes: Any) -> Job:
    """Return ``job`` with ``changes``."""
    return attrs.evolve(job, **changes)


async def queued_ids(spool: Any) -> list[str]:
    return [job.job_id for job in await spool.queued()]


# --- the contract ---------------------------------------------------------------------


def test_implementations_provide_ispool() -> None:
    """Both implementations declare and verify ISpool."""
    from zope.interface.verify import verifyClass

    assert verifyClass(ISpool, DirectorySpool)
    assert verifyClass(ISpool, MemorySpool)


@pytest_twisted.ensureDeferred
async def test_add_get_round_trip(spool: Any) -> None:
    """An added job comes back from get() equal, QUEUED."""
    job = make_job(priority=3, context={"a": 1}, cancellation_token="ct")
    stored = await spool.add(job)
    assert stored == job
    assert await spool.get(job.job_id) == job


@pytest_twisted.ensureDeferred
async def test_get_unknown_is_none(spool: Any) -> None:
    """get() of an id never added is None."""
    assert await spool.get("ab" * 16) is None


@pytest_twisted.ensureDeferred
async def test_second_add_merges_keeping_id_and_position(spool: Any) -> None:
    """A second add for a queued key keeps the first job's id and queue position."""
    first = await spool.add(make_job(created=100.0))
    merged = await spool.add(make_job(created=200.0, token="token-2"))
    assert merged.job_id == first.job_id
    assert merged.created == 100.0
    assert merged.updated == 200.0
    assert await queued_ids(spool) == [first.job_id]


@pytest_twisted.ensureDeferred
async def test_merge_newest_token_wins(spool: Any) -> None:
    """The merged job carries the newest callback token and cancellation token."""
    await spool.add(make_job(token="old", cancellation_token="c1"))
    await spool.add(make_job(token="new", cancellation_token="c2", created=150.0))
    [job] = await spool.queued()
    assert job.callback.token == "new"
    assert job.cancellation_token == "c2"


@pytest_twisted.ensureDeferred
async def test_merge_highest_priority_and_create_beats_notification(spool: Any) -> None:
    """Merging keeps the highest priority, and a create request beats a notification."""
    await spool.add(make_job(kind=JobKind.NOTIFICATION, priority=7))
    await spool.add(make_job(kind=JobKind.CREATE, priority=1, created=150.0))
    [job] = await spool.queued()
    assert job.priority == 7
    assert job.kind is JobKind.CREATE


@pytest_twisted.ensureDeferred
async def test_geometry_makes_a_different_key(spool: Any) -> None:
    """A request with geometry is a different job from the whole-slide one."""
    whole = await spool.add(make_job())
    polygon = {"type": "taggedPolygon", "content": {"polygons": [[0, 0, 1, 1]]}}
    region = await spool.add(make_job(input=polygon))
    assert region.key != whole.key
    assert sorted(await queued_ids(spool)) == sorted([whole.job_id, region.job_id])


@pytest_twisted.ensureDeferred
async def test_a_merged_job_answers_a_cancel_of_either_request(spool: Any) -> None:
    """Two requests merged into one queued job: find by either cancellation token finds
    it (the newest is its own, the older one is remembered); another token finds nothing."""
    await spool.add(make_job(cancellation_token="c1"))
    merged = await spool.add(make_job(cancellation_token="c2", created=150.0))
    assert merged.cancellation_token == "c2" and merged.merged_tokens == ("c1",)
    assert [j.job_id for j in await spool.find(cancellation_token="c1")] == [merged.job_id]
    assert [j.job_id for j in await spool.find(cancellation_token="c2")] == [merged.job_id]
    assert await spool.find(cancellation_token="c3") == []
    # The remembered token survives the record's round trip through the spool.
    assert (await spool.get(merged.job_id)).merged_tokens == ("c1",)


@pytest_twisted.ensureDeferred
async def test_queued_order(spool: Any) -> None:
    """queued() is manual requests first, then higher priority, then oldest."""
    note = await spool.add(make_job("n", kind=JobKind.NOTIFICATION, created=1.0))
    late = await spool.add(make_job("c3", created=3.0))
    urgent = await spool.add(make_job("p5", priority=5, created=4.0))
    early = await spool.add(make_job("c2", created=2.0))
    assert await queued_ids(spool) == [urgent.job_id, early.job_id, late.job_id, note.job_id]


@pytest_twisted.ensureDeferred
async def test_claim_moves_to_running(spool: Any) -> None:
    """claim() returns the job RUNNING and it leaves the queue."""
    job = await spool.add(make_job())
    claimed = await spool.claim(job.job_id)
    assert claimed.state is JobState.RUNNING
    assert (await spool.get(job.job_id)).state is JobState.RUNNING
    assert await spool.queued() == []


@pytest_twisted.ensureDeferred
async def test_claim_is_exclusive(spool: Any) -> None:
    """A job can be claimed once; the second claim gets None."""
    job = await spool.add(make_job())
    assert await spool.claim(job.job_id) is not None
    assert await spool.claim(job.job_id) is None


@pytest_twisted.ensureDeferred
async def test_claim_of_unknown_job_is_none(spool: Any) -> None:
    """Claiming a job that does not exist gets None."""
    assert await spool.claim("cd" * 16) is None


@pytest_twisted.ensureDeferred
async def test_add_while_running_makes_a_second_job(spool: Any) -> None:
    """A request for a running key is a new queued job, not merged into the running one."""
    first = await spool.add(make_job())
    await spool.claim(first.job_id)
    second = await spool.add(make_job(token="token-2", created=200.0))
    assert second.job_id != first.job_id
    assert await queued_ids(spool) == [second.job_id]
    assert (await spool.get(first.job_id)).state is JobState.RUNNING


@pytest_twisted.ensureDeferred
async def test_claim_refused_while_same_key_runs(spool: Any) -> None:
    """The second job of a key cannot be claimed while the first runs, and can after."""
    first = await spool.add(make_job())
    await spool.claim(first.job_id)
    second = await spool.add(make_job(created=200.0))
    assert await spool.claim(second.job_id) is None
    await spool.finish(first.job_id, JobState.DONE)
    assert (await spool.claim(second.job_id)).job_id == second.job_id


@pytest_twisted.ensureDeferred
async def test_finish_done(spool: Any) -> None:
    """finish() ends a held job; get() still finds it, in its final state, without
    its callback token (the caller of finish() still gets the token back)."""
    job = await spool.add(make_job())
    await spool.claim(job.job_id)
    done = await spool.finish(job.job_id, JobState.DONE)
    assert done.state is JobState.DONE
    assert done.callback == job.callback
    assert await spool.get(job.job_id) == done.without_secret()
    assert await spool.find() == []


@pytest_twisted.ensureDeferred
async def test_finish_failed_records_error(spool: Any) -> None:
    """finish(FAILED, error) records the error as last_error."""
    job = await spool.add(make_job())
    await spool.claim(job.job_id)
    await spool.finish(job.job_id, JobState.FAILED, "analysis crashed")
    stored = await spool.get(job.job_id)
    assert (stored.state, stored.last_error) == (JobState.FAILED, "analysis crashed")


@pytest_twisted.ensureDeferred
async def test_finish_requires_holding(spool: Any) -> None:
    """finish() of a job this spool does not hold fails with NotHeld."""
    job = await spool.add(make_job())
    with pytest.raises(NotHeld):
        await spool.finish(job.job_id, JobState.DONE)


@pytest_twisted.ensureDeferred
async def test_release_counts_an_attempt(spool: Any) -> None:
    """release(count_attempt=True) requeues with attempts + 1 and the error."""
    job = await spool.add(make_job())
    await spool.claim(job.job_id)
    released = await spool.release(job.job_id, count_attempt=True, error="worker died")
    assert (released.state, released.attempts, released.last_error) == (
        JobState.QUEUED,
        1,
        "worker died",
    )
    assert await spool.queued() == [released]


@pytest_twisted.ensureDeferred
async def test_release_without_counting(spool: Any) -> None:
    """release(count_attempt=False) requeues without counting an attempt."""
    job = await spool.add(make_job())
    await spool.claim(job.job_id)
    released = await spool.release(job.job_id, count_attempt=False)
    assert (released.state, released.attempts) == (JobState.QUEUED, 0)
    assert (await spool.claim(job.job_id)).job_id == job.job_id


@pytest_twisted.ensureDeferred
async def test_release_merges_into_newer_queued_job(spool: Any) -> None:
    """Releasing into a newer queued job leaves one job: the newer one's id and token,
    the released one's queue position, the higher attempt count."""
    old = await spool.add(make_job(created=100.0, token="old"))
    await spool.claim(old.job_id)
    newer = await spool.add(make_job(created=200.0, token="new", priority=4))
    released = await spool.release(old.job_id, count_attempt=True)
    assert released.job_id == newer.job_id
    assert (released.callback.token, released.created, released.priority) == ("new", 100.0, 4)
    assert released.attempts == 1
    assert await spool.queued() == [released]
    assert await spool.get(old.job_id) is None


@pytest_twisted.ensureDeferred
async def test_cancel_queued(spool: Any) -> None:
    """cancel() of a queued job makes it CANCELLED with the reason."""
    job = await spool.add(make_job())
    cancelled = await spool.cancel(job.job_id, "user said so")
    assert (cancelled.state, cancelled.last_error) == (JobState.CANCELLED, "user said so")
    assert await spool.get(job.job_id) == cancelled.without_secret()
    assert await spool.queued() == []


@pytest_twisted.ensureDeferred
async def test_cancel_running_is_none(spool: Any) -> None:
    """cancel() of a running job returns None and leaves it running."""
    job = await spool.add(make_job())
    await spool.claim(job.job_id)
    assert await spool.cancel(job.job_id) is None
    assert (await spool.get(job.job_id)).state is JobState.RUNNING


@pytest_twisted.ensureDeferred
async def test_request_cancel_marks_running_job(spool: Any) -> None:
    """request_cancel() of a running job is seen by cancel_requested() until it finishes."""
    job = await spool.add(make_job())
    await spool.claim(job.job_id)
    assert await spool.cancel_requested(job.job_id) is False
    await spool.request_cancel(job.job_id)
    assert await spool.cancel_requested(job.job_id) is True
    await spool.finish(job.job_id, JobState.CANCELLED, "stopped")
    assert await spool.cancel_requested(job.job_id) is False


@pytest_twisted.ensureDeferred
async def test_request_cancel_of_queued_job_cancels_it(spool: Any) -> None:
    """request_cancel() of a job that is queued (released meanwhile) cancels it at once."""
    job = await spool.add(make_job())
    await spool.request_cancel(job.job_id)
    assert (await spool.get(job.job_id)).state is JobState.CANCELLED
    assert await spool.cancel_requested(job.job_id) is False


@pytest_twisted.ensureDeferred
async def test_release_of_cancel_requested_job_cancels_it(spool: Any) -> None:
    """A held job whose cancellation was requested is CANCELLED by release(), not requeued."""
    job = await spool.add(make_job())
    await spool.claim(job.job_id)
    await spool.request_cancel(job.job_id)
    released = await spool.release(job.job_id, count_attempt=True)
    assert released.state is JobState.CANCELLED
    assert await spool.queued() == []
    assert await spool.cancel_requested(job.job_id) is False


@pytest_twisted.ensureDeferred
async def test_update_queued(spool: Any) -> None:
    """update() of a queued job stores the new result id."""
    job = await spool.add(make_job())
    await spool.update(_with(job, result_id=7))
    assert (await spool.get(job.job_id)).result_id == 7


@pytest_twisted.ensureDeferred
async def test_update_of_claimed_queued_copy_is_job_moved(spool: Any) -> None:
    """update() of a queued copy of a job claimed meanwhile fails with JobMoved."""
    job = await spool.add(make_job())
    await spool.claim(job.job_id)
    with pytest.raises(JobMoved):
        await spool.update(_with(job, result_id=7))


@pytest_twisted.ensureDeferred
async def test_update_running_by_holder(spool: Any) -> None:
    """The holder can update its running job."""
    job = await spool.add(make_job())
    running = await spool.claim(job.job_id)
    await spool.update(_with(running, result_id=9))
    assert (await spool.get(job.job_id)).result_id == 9


@pytest_twisted.ensureDeferred
async def test_update_after_merge_is_job_changed(spool: Any) -> None:
    """update() of a copy read before a merge fails with JobChanged (the newer token stays)."""
    job = await spool.add(make_job(token="old"))
    await spool.add(make_job(token="new", created=200.0))
    with pytest.raises(JobChanged):
        await spool.update(_with(job, result_id=7))
    assert (await spool.get(job.job_id)).callback.token == "new"


@pytest_twisted.ensureDeferred
async def test_watch_sees_add_merge_and_release(spool: Any) -> None:
    """Watchers hear of every job becoming QUEUED: add, merge and release."""
    seen: list[Job] = []
    spool.watch(seen.append)
    job = await spool.add(make_job())
    merged = await spool.add(make_job(token="token-2", created=200.0))
    await spool.claim(job.job_id)
    released = await spool.release(job.job_id, count_attempt=False)
    assert seen == [job, merged, released]


@pytest_twisted.ensureDeferred
async def test_watch_unsubscribe(spool: Any) -> None:
    """An unsubscribed watcher hears nothing more."""
    seen: list[Job] = []
    unsubscribe = spool.watch(seen.append)
    unsubscribe()
    await spool.add(make_job())
    assert seen == []


@pytest_twisted.ensureDeferred
async def test_raising_watcher_breaks_nothing(spool: Any) -> None:
    """A raising watcher is logged; the add succeeds and other watchers are still called."""
    errors: list[dict[str, Any]] = []
    observer = errors.append
    globalLogPublisher.addObserver(observer)

    def bad(job: Job) -> None:
        raise RuntimeError("boom")

    seen: list[Job] = []
    spool.watch(bad)
    spool.watch(seen.append)
    try:
        job = await spool.add(make_job())
    finally:
        globalLogPublisher.removeObserver(observer)
    assert seen == [job]
    assert any(e.get("log_failure") is not None for e in errors)


@pytest_twisted.ensureDeferred
async def test_find_by_slide_result_and_token(spool: Any) -> None:
    """find() returns the jobs matching all of the given criteria."""
    a = await spool.add(make_job("a", result_id=1, cancellation_token="t-a"))
    b = await spool.add(make_job("b", result_id=2, cancellation_token="t-b"))
    assert await spool.find(slide_id="a") == [a]
    assert await spool.find(result_id=2) == [b]
    assert await spool.find(cancellation_token="t-a") == [a]
    assert await spool.find(slide_id="a", result_id=2) == []


@pytest_twisted.ensureDeferred
async def test_find_by_state(spool: Any) -> None:
    """find() looks at QUEUED and RUNNING by default and at other states on request."""
    job = await spool.add(make_job())
    await spool.claim(job.job_id)
    assert [j.job_id for j in await spool.find(slide_id="slide-1")] == [job.job_id]
    await spool.finish(job.job_id, JobState.DONE)
    assert await spool.find(slide_id="slide-1") == []
    done = await spool.find(slide_id="slide-1", states=frozenset({JobState.DONE}))
    assert [j.job_id for j in done] == [job.job_id]


@pytest_twisted.ensureDeferred
async def test_counts(spool: Any) -> None:
    """counts() reports every state."""
    a = await spool.add(make_job("a"))
    await spool.add(make_job("b"))
    c = await spool.add(make_job("c"))
    await spool.claim(a.job_id)
    await spool.cancel(c.job_id)
    counts = await spool.counts()
    assert counts == {
        JobState.QUEUED: 1,
        JobState.RUNNING: 1,
        JobState.DONE: 0,
        JobState.FAILED: 0,
        JobState.CANCELLED: 1,
    }


@pytest_twisted.ensureDeferred
async def test_recover_leaves_held_jobs_alone(spool: Any) -> None:
    """recover() does not touch jobs this (live) spool holds."""
    job = await spool.add(make_job())
    await spool.claim(job.job_id)
    assert await spool.recover() == []
    assert (await spool.get(job.job_id)).state is JobState.RUNNING


@pytest.mark.parametrize(
    "call",
    [
        lambda s: s.get("../x"),
        lambda s: s.claim("../x"),
        lambda s: s.cancel("../../etc/passwd"),
        lambda s: s.request_cancel("x/.."),
        lambda s: s.cancel_requested(""),
        lambda s: s.finish("..", JobState.DONE),
        lambda s: s.add(make_job(job_id="../x")),
        lambda s: s.add(make_job(key="../x")),
    ],
)
@pytest_twisted.ensureDeferred
async def test_hostile_ids_are_value_errors(spool: Any, call: Any) -> None:
    """Ids that are not lowercase hex never become paths: ValueError."""
    with pytest.raises(ValueError):
        await call(spool)


@pytest_twisted.ensureDeferred
async def test_memory_recover_after_abandon() -> None:
    """MemorySpool.abandon_held() makes recover() requeue with an attempt counted."""
    spool = MemorySpool()
    spool.startService()
    job = await spool.add(make_job())
    await spool.claim(job.job_id)
    spool.abandon_held()
    [recovered] = await spool.recover()
    assert (recovered.job_id, recovered.state, recovered.attempts) == (
        job.job_id,
        JobState.QUEUED,
        1,
    )




@pytest_twisted.ensureDeferred
async def test_room_counts_queued_records_on_request(spool: Any) -> None:
    """room(): the free space, and with count_queued one per queued key (a merge adds
    none); without it the queue is not counted."""
    await spool.add(make_job("slide-1"))
    await spool.add(make_job("slide-1", token="token-2", created=150.0))
    await spool.add(make_job("slide-2"))
    room = await spool.room(count_queued=True)
    assert room.free_bytes > 0 and room.queued == 2
    assert (await spool.room()).queued is None


# --- deferral -------------------------------------------------------------------------


def _deferral(not_before: float, kind: DeferralKind = DeferralKind.SPS) -> Deferral:
    return Deferral(not_before, "SPS unavailable (HTTP 503)", kind, since=150.0)


@pytest_twisted.ensureDeferred
async def test_release_with_a_deferral_keeps_it_on_the_record(spool: Any) -> None:
    """release(deferral=...) queues the job with not_before, the reason, the kind and
    since; no attempt is counted when the caller says so."""
    job = await spool.add(make_job())
    await spool.claim(job.job_id)
    released = await spool.release(
        job.job_id, count_attempt=False, error="SPS down", deferral=_deferral(500.0)
    )
    assert (released.state, released.attempts) == (JobState.QUEUED, 0)
    assert (released.not_before, released.deferred_reason) == (500.0, "SPS unavailable (HTTP 503)")
    assert (released.deferral_kind, released.deferred_since) == (DeferralKind.SPS, 150.0)
    assert await spool.get(job.job_id) == released
    assert await spool.queued() == [released]


@pytest_twisted.ensureDeferred
async def test_claim_with_a_clock_refuses_a_deferred_job_until_not_before(spool: Any) -> None:
    """claim(now=...) refuses a job deferred past now (it stays queued) and takes it
    from not_before on."""
    job = await spool.add(make_job())
    await spool.claim(job.job_id)
    await spool.release(job.job_id, count_attempt=False, deferral=_deferral(500.0))
    assert await spool.claim(job.job_id, now=499.0) is None
    assert (await spool.get(job.job_id)).state is JobState.QUEUED
    claimed = await spool.claim(job.job_id, now=500.0)
    assert claimed is not None and claimed.state is JobState.RUNNING


@pytest_twisted.ensureDeferred
async def test_a_plain_release_clears_the_deferral_but_keeps_its_age(spool: Any) -> None:
    """A release without a deferral may run at once; deferred_since (the deferral's
    age) stays for max_deferral_age."""
    job = await spool.add(make_job())
    await spool.claim(job.job_id)
    await spool.release(job.job_id, count_attempt=False, deferral=_deferral(500.0))
    await spool.claim(job.job_id, now=600.0)
    again = await spool.release(job.job_id, count_attempt=False)
    assert (again.not_before, again.deferred_reason, again.deferral_kind) == (None, None, None)
    assert again.deferred_since == 150.0
    assert await spool.claim(job.job_id, now=0.0) is not None


@pytest_twisted.ensureDeferred
async def test_resuming_a_deferred_job_is_an_update(spool: Any) -> None:
    """update(resumed(job)) clears the deferral of a queued job: claimable at once."""
    job = await spool.add(make_job())
    await spool.claim(job.job_id)
    deferred = await spool.release(job.job_id, count_attempt=False, deferral=_deferral(500.0))
    stored = await spool.update(resumed(deferred))
    assert stored.not_before is None
    assert await spool.claim(job.job_id, now=200.0) is not None


@pytest_twisted.ensureDeferred
async def test_a_merged_request_keeps_the_deferral(spool: Any) -> None:
    """A newer request for a deferred job's slide brings its token, and the job keeps
    waiting (its SPS is what failed); a release into a newer queued job keeps the
    released job's deferral."""
    job = await spool.add(make_job(token="old"))
    await spool.claim(job.job_id)
    await spool.release(job.job_id, count_attempt=False, deferral=_deferral(500.0))
    merged = await spool.add(make_job(token="new", created=300.0))
    assert (merged.job_id, merged.callback.token, merged.not_before) == (job.job_id, "new", 500.0)

    running = await spool.claim(job.job_id, now=500.0)
    newer = await spool.add(make_job(token="newest", created=600.0))
    released = await spool.release(running.job_id, count_attempt=False, deferral=_deferral(900.0))
    assert (released.job_id, released.callback.token) == (newer.job_id, "newest")
    assert released.not_before == 900.0


@pytest_twisted.ensureDeferred
async def test_queued_of_reads_a_key_record_only_when_it_changed(spool: Any) -> None:
    """queued_of(key): (None, None) without a queued record; the record and a tag; the
    same tag and no record while unchanged; a new tag and the merged record after a
    newer request for the key."""
    job = make_job(token="old")
    assert await spool.queued_of(job.key) == (None, None)
    await spool.add(job)
    tag, found = await spool.queued_of(job.key)
    assert tag is not None and found == job
    assert await spool.queued_of(job.key, tag) == (tag, None)
    await spool.add(_with(make_job(token="new", created=200.0), job_id="cd" * 16))
    newer, merged = await spool.queued_of(job.key, tag)
    assert newer != tag
    assert merged is not None and merged.callback.token == "new"
    with pytest.raises(ValueError):
        await spool.queued_of("../x")
