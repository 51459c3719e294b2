"""Full disks and bounded queues: the front door's AcceptGate, alone (a fake spool and
task.Clock) and over HTTP with a real directory spool whose fsync fails with ENOSPC."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from typing import Any

import attrs
import pytest
import pytest_twisted
import test_routes
from conftest import failure_result_of, success_result_of
from test_routes import Stack
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogPublisher

from dpatia_daemon.frontdoor.capacity import RETRY_AFTER, AcceptGate, SpoolFull
from dpatia_daemon.spool import SpoolRoom

#: test_routes.py's stack, as a fixture of this module.
stack = test_routes.stack


@attrs.define
class FakeRoom:
    """The one spool call the gate makes: ``room``, counted, with a settable answer."""

    free_bytes: int = 10**12
    queued: int = 0
    calls: int = 0
    pending: list[Deferred[SpoolRoom]] = attrs.field(factory=list)
    hold: bool = False

    def room(self, count_queued: bool = False) -> Deferred[SpoolRoom]:
        self.calls += 1
        answer = SpoolRoom(self.free_bytes, self.queued if count_queued else None)
        if self.hold:
            d: Deferred[SpoolRoom] = Deferred()
            self.pending.append(d)
            return d
        return succeed(answer)


@pytest.fixture
def warnings() -> Iterator[list[str]]:
    """The text of every warning logged while the test runs."""
    from twisted.logger import formatEvent

    seen: list[str] = []

    def observer(event: dict[str, Any]) -> None:
        if event.get("log_level") is LogLevel.warn:
            seen.append(formatEvent(event))

    globalLogPublisher.addObserver(observer)
    yield seen
    globalLogPublisher.removeObserver(observer)


def _gate(room: FakeRoom, clock: Clock, **kw: Any) -> AcceptGate:
    return AcceptGate(room, clock, **kw)  # type: ignore[arg-type]


def _check(gate: AcceptGate) -> Deferred[None]:
    return Deferred.fromCoroutine(gate.check())


def _commit(gate: AcceptGate, adding: Deferred[Any]) -> Deferred[Any]:
    return Deferred.fromCoroutine(gate.commit(adding))


def test_low_free_space_refuses_until_space_returns(warnings: list[str]) -> None:
    """Below min_free_bytes: SpoolFull naming the key; one warning when refusing starts
    and one when a job is accepted again, however many requests come in between."""
    room, clock = FakeRoom(free_bytes=1000), Clock()
    gate = _gate(room, clock, min_free_bytes=5000)
    for _ in range(3):
        refused = failure_result_of(_check(gate), SpoolFull)
        assert "1000 bytes free" in refused.value.message
        assert "[spool] min_free_bytes (5000)" in refused.value.message
        assert refused.value.retry_after == RETRY_AFTER
    room.free_bytes = 10_000
    clock.advance(gate.interval)
    success_result_of(_check(gate))
    assert success_result_of(_commit(gate, succeed("job"))) == "job"
    success_result_of(_commit(gate, succeed("job 2")))
    assert [w for w in warnings if "refusing new jobs" in w] == [
        "refusing new jobs (503): the spool's filesystem has 1000 bytes free, less than "
        "[spool] min_free_bytes (5000)"
    ]
    assert [w for w in warnings if "accepting new jobs" in w] == [
        "the spool has room again: accepting new jobs"
    ]


def test_the_spool_is_measured_at_most_once_per_interval() -> None:
    """Checks within ``interval`` reuse one measurement; concurrent ones share it."""
    room, clock = FakeRoom(hold=True), Clock()
    gate = _gate(room, clock, min_free_bytes=1)
    first, second = _check(gate), _check(gate)
    assert room.calls == 1
    room.pending.pop().callback(SpoolRoom(10**9))
    success_result_of(first)
    success_result_of(second)
    room.hold = False
    for _ in range(50):
        clock.advance(gate.interval / 100)
        success_result_of(_check(gate))
    assert room.calls == 1
    clock.advance(gate.interval)
    success_result_of(_check(gate))
    assert room.calls == 2


def test_no_limits_measure_nothing() -> None:
    """min_free_bytes = 0 and no max_queued: the gate never asks the spool."""
    room, clock = FakeRoom(free_bytes=0), Clock()
    gate = _gate(room, clock)
    success_result_of(_check(gate))
    assert room.calls == 0


def test_max_queued_counts_its_own_adds_between_measurements() -> None:
    """max_queued: refused at that many queued records; the gate's own adds count
    until the next measurement."""
    room, clock = FakeRoom(queued=1), Clock()
    gate = _gate(room, clock, max_queued=2)
    success_result_of(_check(gate))
    success_result_of(_commit(gate, succeed("job")))
    refused = failure_result_of(_check(gate), SpoolFull)
    assert refused.value.message == (
        "the daemon cannot take new jobs now: 2 jobs are queued, as many as "
        "[spool] max_queued allows (2)"
    )
    room.queued = 0  # a worker took them
    clock.advance(gate.interval)
    success_result_of(_check(gate))


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_a_full_disk_at_commit_refuses_for_an_interval(code: int) -> None:
    """ENOSPC or EDQUOT from the commit: SpoolFull; further requests are refused for
    ``interval`` without trying, then the spool is measured and tried again."""
    room, clock = FakeRoom(), Clock()
    gate = _gate(room, clock, min_free_bytes=1)
    success_result_of(_check(gate))
    refused = failure_result_of(_commit(gate, fail(OSError(code, "full"))), SpoolFull)
    assert "the spool's filesystem is full (full)" in refused.value.message
    calls = room.calls
    failure_result_of(_check(gate), SpoolFull)
    assert room.calls == calls
    clock.advance(gate.interval)
    success_result_of(_check(gate))
    assert room.calls == calls + 1
    success_result_of(_commit(gate, succeed("job")))
    assert gate.refusing is None


def test_other_commit_errors_pass_through() -> None:
    """An I/O error that is not a full disk stays what it is (the error chain's 500)."""
    gate = _gate(FakeRoom(), Clock())
    failure_result_of(_commit(gate, fail(OSError(errno.EIO, "I/O error"))), OSError)
    assert gate.refusing is None


# --- over HTTP, with a real spool --------------------------------------------------------


def _no_space(fd: int) -> None:
    """An fsync on a full disk: files fail with ENOSPC (directories still sync)."""
    if stat.S_ISREG(os.fstat(fd).st_mode):
        raise OSError(errno.ENOSPC, "No space left on device")
    os.fsync(fd)


def _spool_tree(stack: Stack) -> dict[str, bytes]:
    root = stack.spool_dir
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and p.parent.name != "locks"
    }


@pytest_twisted.ensureDeferred
async def test_enospc_at_commit_is_a_503_and_leaves_nothing_behind(
    stack: Stack, warnings: list[str]
) -> None:
    """A full disk while committing: 503 with Retry-After and a JSON error naming the
    cause, for notifications and creates; no temp file left, the job accepted before
    unchanged; once space returns (and the pause is over) jobs are accepted again."""
    clock = Clock()
    stack.api.gate = AcceptGate(stack.spool, clock, min_free_bytes=1)
    code, _, _ = await stack.post("/dpatia/imagenotification", stack.notification("slide-5"))
    assert code == 200
    await stack.api.background.drain()
    await stack.api.notes_written()
    before = _spool_tree(stack)
    requests = len(stack.fake.requests)
    stack.spool.store.fsync = _no_space
    for path, body in [
        ("/dpatia/imagenotification", stack.notification("slide-7")),
        ("/dpatia", stack.invocation(slideId="slide-8")),
        ("/dpatia/imagenotification", stack.notification("slide-9")),
    ]:
        code, answer, headers = await stack.post(path, body)
        assert code == 503, answer
        assert headers.getRawHeaders("Retry-After") == [str(RETRY_AFTER)]
        assert "filesystem is full" in answer["error"] and answer["field"] is None
    assert _spool_tree(stack) == before
    assert list((stack.spool_dir / "tmp").iterdir()) == []
    # Nothing was written at the SPS (a create reads the slide's results and info while
    # it commits: reads only, so a failed commit leaves no "queued" annotation behind).
    assert [r.method for r in stack.fake.requests[requests:] if r.method != "GET"] == []
    stack.spool.store.fsync = os.fsync
    clock.advance(stack.api.gate.interval)
    code, answer, _ = await stack.post("/dpatia/imagenotification", stack.notification("slide-7"))
    assert (code, answer) == (200, {})
    assert sorted(j.slide_id for j in await stack.spool.queued()) == ["slide-5", "slide-7"]
    assert len([w for w in warnings if "refusing new jobs" in w]) == 1
    assert len([w for w in warnings if "accepting new jobs" in w]) == 1


@pytest_twisted.ensureDeferred
async def test_min_free_bytes_and_max_queued_refusals_over_http(stack: Stack) -> None:
    """Too little free space, or max_queued jobs queued: 503 + Retry-After naming the
    key, and nothing written."""
    clock = Clock()
    stack.api.gate = AcceptGate(stack.spool, clock, min_free_bytes=2**62)
    code, answer, headers = await stack.post("/dpatia", stack.invocation())
    assert code == 503 and "[spool] min_free_bytes" in answer["error"]
    assert headers.getRawHeaders("Retry-After") == [str(RETRY_AFTER)]
    assert stack.spool_files() == []
    stack.api.gate = AcceptGate(stack.spool, clock, max_queued=1)
    code, _, _ = await stack.post("/dpatia/imagenotification", stack.notification("slide-5"))
    assert code == 200
    code, answer, _ = await stack.post("/dpatia/imagenotification", stack.notification("slide-7"))
    assert code == 503 and "[spool] max_queued allows (1)" in answer["error"]
    clock.advance(stack.api.gate.interval)  # measured again: still one queued
    code, answer, _ = await stack.post("/dpatia/imagenotification", stack.notification("slide-7"))
    assert code == 503
    assert [j.slide_id for j in await stack.spool.queued()] == ["slide-5"]
    # A cancel or modify adds no job: never refused for room.
    code, answer, _ = await stack.post("/dpatia", stack.invocation("cancel", input=None))
    assert (code, answer) == (200, [])
