"""Region jobs through the daemon's whole side: the front door's routes on loopback, a
real directory spool, two real worker processes, and a fake SPS on loopback.

A taggedPolygon app: two regions drawn on one slide are two jobs that run at the same
time, each writing its own result; a cancel of one stops that one only.  Every wait is
on a supervisor event with a bounded timeout, never a sleep.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
from live_stack import start_live_stack
from twisted.internet.defer import Deferred

from dpatia_daemon.config import Config
from dpatia_daemon.jobs import JobState
from dpatia_daemon.models import InputType, Result
from dpatia_daemon.simulator.driver import rectangle_input
from dpatia_daemon.simulator.fake import FakeSPS
from dpatia_daemon.spool import DirectorySpool
from dpatia_daemon.sps.results import Status, frame_status, result_key
from dpatia_daemon.workers.supervisor import Supervisor, SupervisorEvent

pytestmark = pytest.mark.integration

SLIDE = "slide-regions"


@attrs.define
class Daemon:
    """The daemon's parts wired as service.py wires them, and a client for its routes."""

    reactor: Any
    url: str
    callback: str
    token: str
    fake: FakeSPS
    spool: DirectorySpool
    supervisor: Supervisor
    client: Any
    events: list[SupervisorEvent] = attrs.field(factory=list)
    _waiters: list[tuple[Callable[[SupervisorEvent], bool], Deferred[SupervisorEvent]]] = (
        attrs.field(factory=list)
    )

    def seen(self, event: SupervisorEvent) -> None:
        self.events.append(event)
        for entry in list(self._waiters):
            if entry[0](event):
                self._waiters.remove(entry)
                entry[1].callback(event)

    async def wait(
        self, kind: str, job_id: str, timeout: float = 30.0, **detail: Any
    ) -> SupervisorEvent:
        """The first event (seen already or to come) of ``kind`` for ``job_id``."""

        def matches(event: SupervisorEvent) -> bool:
            return (
                event.kind == kind
                and event.job_id == job_id
                and all(event.detail.get(k) == v for k, v in detail.items())
            )

        for event in self.events:
            if matches(event):
                return event
        d: Deferred[SupervisorEvent] = Deferred()
        entry = (matches, d)
        self._waiters.append(entry)

        def expired(result: object, timeout: float) -> SupervisorEvent:
            if entry in self._waiters:
                self._waiters.remove(entry)
            raise AssertionError(f"no {kind} of job {job_id} {detail} within {timeout} s")

        return await d.addTimeout(timeout, self.reactor, onTimeoutCancel=expired)

    async def invoke(self, action: str, **extra: Any) -> tuple[int, Any]:
        body = {
            "action": action,
            "applicationId": "dpatia",
            "slideId": SLIDE,
            "callbackInfo": {"url": self.callback, "token": self.token},
            "context": {},
            **extra,
        }
        response = await self.client.post(
            self.url + "/dpatia",
            json.dumps(body).encode(),
            headers={"Content-Type": ["application/json"]},
        )
        return response.code, json.loads(await response.content())


def _region(x: float) -> dict[str, Any]:
    return rectangle_input("taggedPolygon", (x, 0.1, x + 0.1, 0.2), ["T"])


@pytest_twisted.async_yield_fixture
async def daemon(reactor: Any, tmp_path: Path) -> Any:
    app = attrs.evolve(Config().app, input_type=InputType.TAGGED_POLYGON, tags=("T",))
    stack = start_live_stack(
        reactor, tmp_path, SLIDE, count=2, analysis="tests.analyses_for_tests:run", app=app
    )
    the_daemon = Daemon(
        reactor=reactor,
        url=stack.url,
        callback=stack.callback,
        token=stack.fake.issue_token(),
        fake=stack.fake,
        spool=stack.spool,
        supervisor=stack.supervisor,
        client=stack.client,
    )
    stack.supervisor.observe(the_daemon.seen)
    stack.supervisor.startService()
    yield the_daemon
    await stack.stop()


@pytest_twisted.ensureDeferred
async def test_two_regions_run_side_by_side_and_a_cancel_stops_only_its_own(
    daemon: Daemon,
) -> None:
    """Two region creates on one slide: two results, both jobs running at once on the two
    workers; cancelling the first ends it Cancelled while the second keeps running and
    then stores its own final answer, in its own result."""
    long_run = {"test": {"seconds": 60, "progress_every": 0.2}}
    short_run = {"test": {"seconds": 4, "progress_every": 0.2}}
    code, first = await daemon.invoke(
        "create", input=_region(0.1), cancellationToken="ct-a", context=long_run
    )
    assert code == 200, first
    code, second = await daemon.invoke(
        "create", input=_region(0.5), cancellationToken="ct-b", context=short_run
    )
    assert code == 200, second
    assert first["id"] != second["id"]
    (job_a,) = await daemon.spool.find(cancellation_token="ct-a")
    (job_b,) = await daemon.spool.find(cancellation_token="ct-b")
    assert job_a.key != job_b.key
    started_a = await daemon.wait("job-progress", job_a.job_id, text="started")
    started_b = await daemon.wait("job-progress", job_b.job_id, text="started")
    assert started_a.worker != started_b.worker  # neither region waits for the other

    code, answer = await daemon.invoke("cancel", cancellationToken="ct-a")
    assert (code, answer) == (200, [])
    await daemon.wait("job-ended", job_a.job_id, state="cancelled")
    # The other region's job is untouched: still running, not ended.
    assert not [e for e in daemon.events if e.kind == "job-ended" and e.job_id == job_b.job_id]
    current_b = await daemon.spool.get(job_b.job_id)
    assert current_b is not None and current_b.state is JobState.RUNNING

    await daemon.wait("job-ended", job_b.job_id, state="done")
    results = {r.id: r for r in daemon.fake.results_for(SLIDE, "dpatia")}
    assert set(results) == {first["id"], second["id"]}  # no third result was created
    cancelled: Result = results[first["id"]]
    done: Result = results[second["id"]]
    assert frame_status(cancelled) is Status.CANCELLED
    assert frame_status(done) is Status.DONE and done.displayResult == "test answer"
    assert (result_key(cancelled), result_key(done)) == (job_a.key, job_b.key)
    # The cancelled frame still outlines the first region, not the whole slide.
    assert cancelled.data.result is not None
    (item,) = cancelled.data.result.content
    assert item["polygons"][0]["points"][0] == {"x": 0.1, "y": 0.1}
