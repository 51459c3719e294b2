"""A create's SPS calls: the slide's info is read while its results are, so the click
waits for two round trips one after another (results ∥ info, then create or update),
not three (IA-API.md: the reuse rule needs the slide's results first)."""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from test_routes import Stack, stack  # noqa: F401  (the fixture)
from twisted.internet.defer import Deferred

from dpatia_daemon.sps.client import SPSClient


@pytest_twisted.ensureDeferred
async def test_create_reads_slide_info_while_it_reads_the_results(
    stack: Stack,  # noqa: F811
    reactor: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The slide info's answer is held until the results are asked for: a create that
    read them one after the other would time out here; the result is created after
    both, and the answer is the stored queued result."""
    events: list[str] = []
    listing: Deferred[None] = Deferred()
    slide_info, list_results = SPSClient.slide_info, SPSClient.list_results
    create_result = SPSClient.create_result

    async def held_info(self: SPSClient, *args: Any, **kw: Any) -> Any:
        events.append("info asked")
        await listing.addTimeout(5, reactor)
        info = await slide_info(self, *args, **kw)
        events.append("info answered")
        return info

    async def listed(self: SPSClient, *args: Any, **kw: Any) -> Any:
        events.append("results asked")
        if not listing.called:
            listing.callback(None)
        found = await list_results(self, *args, **kw)
        events.append("results answered")
        return found

    async def created(self: SPSClient, *args: Any, **kw: Any) -> Any:
        events.append("create")
        return await create_result(self, *args, **kw)

    monkeypatch.setattr(SPSClient, "slide_info", held_info)
    monkeypatch.setattr(SPSClient, "list_results", listed)
    monkeypatch.setattr(SPSClient, "create_result", created)
    code, answer, _ = await stack.post("/dpatia", stack.invocation())
    assert code == 200, answer
    assert answer["displayProperties"]["Status"] == "Queued"
    assert events.index("results asked") < events.index("info answered")
    assert events[-1] == "create"
    assert {"info answered", "results answered"} <= set(events[:-1])


@pytest_twisted.ensureDeferred
async def test_a_create_for_an_unknown_slide_still_says_so(stack: Stack) -> None:  # noqa: F811
    """The info read in parallel still decides: a slide the SPS does not know is an
    error answer, and no result is created for it."""
    code, answer, _ = await stack.post("/dpatia", stack.invocation(slideId="nowhere"))
    assert code != 200
    assert stack.fake.results_for("nowhere") == []


@pytest_twisted.ensureDeferred
async def test_a_second_click_on_a_known_result_is_one_put(stack: Stack) -> None:  # noqa: F811
    """Once this process has written the slide's result, the next create for the slide
    is one PUT onto it (no listing, no slide info); the job stays the same result."""
    code, first, _ = await stack.post("/dpatia", stack.invocation())
    assert code == 200, first
    before = len(stack.fake.requests)
    code, second, _ = await stack.post("/dpatia", stack.invocation(cancellationToken="ct-2"))
    assert code == 200, second
    calls = [(r.method, r.path) for r in stack.fake.requests[before:]]
    assert [method for method, _ in calls] == ["PUT"], calls
    assert second["id"] == first["id"] and second["versionId"] != first["versionId"]
    assert second["displayProperties"]["Status"] == "Queued"


@pytest_twisted.ensureDeferred
async def test_a_known_result_deleted_at_the_sps_is_found_anew(stack: Stack) -> None:  # noqa: F811
    """The user deleted the result this process knew (the SPS removed it and sent the
    delete, which stopped its job): the next create's PUT meets a 404, the create goes
    back to the slide's listing, and a new result is created."""
    code, first, _ = await stack.post("/dpatia", stack.invocation())
    assert code == 200, first
    stack.fake.results.pop(first["id"])  # as a user deleting the annotation
    code, _, _ = await stack.post("/dpatia", stack.invocation("delete", input=first))
    assert code == 200
    before = len(stack.fake.requests)
    code, second, _ = await stack.post("/dpatia", stack.invocation(cancellationToken="ct-2"))
    assert code == 200, second
    methods = [r.method for r in stack.fake.requests[before:]]
    assert methods[0] == "PUT" and methods[-1] == "POST" and len(methods) == 4, methods
    assert second["id"] != first["id"]
    assert [r.id for r in stack.fake.results_for(stack.invocation()["slideId"])] == [second["id"]]


@pytest_twisted.ensureDeferred
async def test_a_create_reads_while_it_commits_and_writes_only_after(
    stack: Stack,  # noqa: F811
    reactor: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The job's durable commit is held until the slide's results and info have both
    been asked for: the reads overlap the commit.  The result is created only once the
    job is on disk, so a crash in between leaves no "queued" annotation without a job."""
    events: list[str] = []
    both_asked: Deferred[None] = Deferred()
    slide_info, list_results = SPSClient.slide_info, SPSClient.list_results
    create_result = SPSClient.create_result
    add = stack.spool.add

    def asked(what: str) -> None:
        events.append(what)
        if {"info asked", "results asked"} <= set(events) and not both_asked.called:
            both_asked.callback(None)

    async def info(self: SPSClient, *args: Any, **kw: Any) -> Any:
        asked("info asked")
        return await slide_info(self, *args, **kw)

    async def listed(self: SPSClient, *args: Any, **kw: Any) -> Any:
        asked("results asked")
        return await list_results(self, *args, **kw)

    async def created(self: SPSClient, *args: Any, **kw: Any) -> Any:
        events.append("create")
        return await create_result(self, *args, **kw)

    async def held_add(job: Any) -> Any:
        await both_asked.addTimeout(5, reactor)
        committed = await add(job)
        events.append("committed")
        return committed

    monkeypatch.setattr(SPSClient, "slide_info", info)
    monkeypatch.setattr(SPSClient, "list_results", listed)
    monkeypatch.setattr(SPSClient, "create_result", created)
    monkeypatch.setattr(stack.spool, "add", lambda job: Deferred.fromCoroutine(held_add(job)))
    code, answer, _ = await stack.post("/dpatia", stack.invocation())
    assert code == 200, answer
    assert events.index("committed") < events.index("create") == len(events) - 1
    assert [r.method for r in stack.fake.requests].count("POST") == 1


@pytest_twisted.ensureDeferred
async def test_the_answer_does_not_wait_for_the_result_note(
    stack: Stack,  # noqa: F811
    reactor: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The job's second durable write (its result id) is held until the create has been
    answered: the answer does not wait for it.  A delete of that result waits for the
    note, so it still finds (and stops) the job."""
    answered: Deferred[None] = Deferred()
    update = stack.spool.update
    events: list[str] = []

    async def held_update(job: Any) -> Any:
        await answered.addTimeout(5, reactor)
        written = await update(job)
        events.append("noted")
        return written

    monkeypatch.setattr(stack.spool, "update", lambda job: Deferred.fromCoroutine(held_update(job)))
    code, answer, _ = await stack.post("/dpatia", stack.invocation())
    assert code == 200, answer
    (job,) = await stack.spool.queued()
    assert job.result_id is None  # not yet noted: the answer came first
    find = stack.spool.find

    def finding(**kw: Any) -> Any:
        events.append("find")
        return find(**kw)

    monkeypatch.setattr(stack.spool, "find", finding)
    deleting = Deferred.fromCoroutine(stack.post("/dpatia", stack.invocation("delete", input=answer)))
    answered.callback(None)
    code, _, _ = await deleting
    assert code == 200
    assert events == ["noted", "find"]
    assert await stack.spool.queued() == []  # the delete found the job by its result id


@pytest_twisted.ensureDeferred
async def test_reads_made_ahead_are_not_used_after_a_write_of_the_key(
    stack: Stack,  # noqa: F811
) -> None:
    """Reads started before a commit, then a write of the same slide's result by this
    process (another job's frame) before the frame is stored: the listing is stale, so
    the slide is read again and its result reused, never a second annotation."""
    from dpatia_daemon.jobs import Callback, Job, JobKind

    def job(token: str) -> Job:
        return Job(
            slide_id="slide-1",
            application_id="dpatia",
            kind=JobKind.CREATE,
            callback=Callback(stack.callback, stack.token),
            created=1.0,
            cancellation_token=token,
        )

    async def queued() -> bool:
        return True

    writer = stack.api.writer
    first, second = job("ct-1"), job("ct-2")
    ahead = writer.read_ahead(second, (1000, 500))
    assert ahead is not None
    assert await ahead.results == []  # read: the slide has no result yet
    made = await writer.store_queued_frame(first, (1000, 500), queued)
    stored = await writer.store_queued_frame(second, (1000, 500), queued, ahead)
    assert stored.id == made.id
    assert [r.id for r in stack.fake.results_for("slide-1")] == [made.id]
