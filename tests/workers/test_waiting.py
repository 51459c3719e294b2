"""The waiting room (``workers/waiting.py``) keeps a note of each held job, not the job,
and hands a job back from its record as it is then: a merge meanwhile is seen, a job
claimed or cancelled meanwhile is not handed back.  MemorySpool and ``task.Clock``."""

from __future__ import annotations

import attrs
from conftest import success_result_of
from fakes import make_job
from twisted.internet.task import Clock

from dpatia_daemon.jobs import DeferralKind, Job, JobState
from dpatia_daemon.spool import MemorySpool
from dpatia_daemon.workers.health import SPSHealth, sps_of
from dpatia_daemon.workers.waiting import Waiting, WaitingRoom

URL = "http://127.0.0.1:1/sps"


def _room() -> tuple[Clock, MemorySpool, SPSHealth, WaitingRoom, list[Job]]:
    clock = Clock()
    clock.advance(1000.0)
    spool = MemorySpool()
    spool.startService()
    health = SPSHealth(clock, probe_interval=30.0)
    offered: list[Job] = []
    return clock, spool, health, WaitingRoom(clock, spool, health, offered.append), offered


def _deferred(spool: MemorySpool, slide: str, until: float, kind: DeferralKind) -> Job:
    job = success_result_of(spool.add(make_job(slide)))
    return success_result_of(
        spool.update(
            attrs.evolve(job, not_before=until, deferral_kind=kind, deferred_reason="HTTP 503")
        )
    )


def test_a_deferred_job_waits_as_a_note_and_comes_back_as_its_record_is_now() -> None:
    clock, spool, _, room, offered = _room()
    job = _deferred(spool, "a", 1010.0, DeferralKind.ERROR)
    assert not room.admit(job)
    assert room.jobs() == [Waiting.of(job)] and job.job_id in room
    # A newer request merged in meanwhile raises its priority: the record changed.
    success_result_of(spool.add(attrs.evolve(make_job("a"), priority=7)))
    clock.advance(9.0)
    assert offered == []
    clock.advance(1.0)
    assert len(room) == 0
    assert [j.job_id for j in offered] == [job.job_id] and offered[0].priority == 7


def test_a_job_claimed_or_cancelled_while_it_waited_is_not_handed_back() -> None:
    clock, spool, _, room, offered = _room()
    claimed = _deferred(spool, "a", 1010.0, DeferralKind.ERROR)
    cancelled = _deferred(spool, "b", 1010.0, DeferralKind.ERROR)
    assert not room.admit(claimed) and not room.admit(cancelled)
    # Another daemon on the spool claims one (its deferral over by its clock) and a
    # user cancels the other.
    assert success_result_of(spool.claim(claimed.job_id, now=1020.0)) is not None
    assert success_result_of(spool.cancel(cancelled.job_id)) is not None
    clock.advance(10.0)
    assert offered == [] and len(room) == 0
    assert success_result_of(spool.get(claimed.job_id)).state is JobState.RUNNING


def test_a_recovered_sps_resumes_its_deferred_jobs_from_their_records() -> None:
    """The SPS answers again: a job deferred for it has its deferral cleared in the
    spool (read again from its record, then rewritten) and comes back at once."""
    clock, spool, health, room, offered = _room()
    health.failed(URL, "HTTP 503")
    job = _deferred(spool, "a", 5000.0, DeferralKind.SPS)
    fresh = success_result_of(spool.add(make_job("b")))
    assert not room.admit(job) and not room.admit(fresh)
    assert len(room) == 2
    health.succeeded(URL)
    room.sps_recovered(sps_of(URL))
    assert len(room) == 0
    assert sorted(j.job_id for j in offered) == sorted([job.job_id, fresh.job_id])
    stored = success_result_of(spool.get(job.job_id))
    assert stored.not_before is None and stored.deferral_kind is None


def test_at_a_probe_time_one_job_of_the_failing_sps_goes_back_not_all() -> None:
    """A failing SPS with a backlog waiting for it: at each probe time one job goes
    back (to probe it); the others stay notes, none of their records read again."""
    clock, spool, health, room, offered = _room()
    health.failed(URL, "HTTP 503")
    jobs = [success_result_of(spool.add(make_job(f"s{i}"))) for i in range(50)]
    for job in jobs:
        assert not room.admit(job)
    assert len(room) == 50
    clock.advance(30.0)  # the probe is due
    assert len(offered) == 1 and len(room) == 49
    assert room.admit(offered[0])  # it goes through as the probe
    clock.advance(1.0)
    assert len(offered) == 1
    health.failed(URL, "HTTP 503")  # the probe failed too
    clock.advance(30.0)
    assert len(offered) == 2 and len(room) == 49 - 1
