"""ResultWriter against a fake SPS on loopback, and the job work folders on disk:
one annotation per slide, no frame over a final answer, private files."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import deferLater
from twisted.python.filepath import FilePath
from twisted.web.server import Site

from dpatia_daemon import __version__
from dpatia_daemon.jobs import Callback, Job, JobKind
from dpatia_daemon.models import RawJSON, Result
from dpatia_daemon.simulator.fake import BASE_PATH, FakeSPS
from dpatia_daemon.sps.client import SPSClient, make_http_client
from dpatia_daemon.sps.results import Status, frame_status
from dpatia_daemon.sps.writer import ResultGone, ResultWriter, Superseded, is_final
from dpatia_daemon.workers.folders import UnusableResult, WorkFolders

pytestmark = pytest.mark.integration


@attrs.define
class Stack:
    fake: FakeSPS
    writer: ResultWriter
    callback: Callback

    def job(self, slide: str, kind: JobKind = JobKind.NOTIFICATION, **fields: Any) -> Job:
        if slide not in self.fake.slides:
            self.fake.add_slide(slide)
        return Job(
            slide_id=slide,
            application_id="dpatia",
            kind=kind,
            callback=self.callback,
            created=0.0,
            **fields,
        )


@pytest_twisted.async_yield_fixture
async def stack(reactor: Any) -> Any:
    fake = FakeSPS(clock=reactor)
    port = reactor.listenTCP(0, Site(fake.resource()), interface="127.0.0.1")
    http = make_http_client(reactor)
    sps = SPSClient(http=http.client, clock=reactor, software_version=__version__, timeout=5)
    writer = ResultWriter(
        sps=sps, clock=reactor, display_name="dpatia", fresh_grace=2.0, poll_interval=0.05
    )
    url = f"http://127.0.0.1:{port.getHost().port}{BASE_PATH}"
    yield Stack(fake, writer, Callback(url, fake.issue_token()))
    await http.close()
    await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_resolve_reuses_the_slides_latest_result_and_creates_only_when_none(
    stack: Stack,
) -> None:
    """No result: one is created (a queued frame); then it is found, not created again,
    even by many concurrent resolves."""
    job = stack.job("slide-a")
    results = await ensureDeferred(
        _all(*[stack.writer.resolve(attrs.evolve(job, job_id=f"{n:032x}")) for n in range(5)])
    )
    assert len({r.id for r in results}) == 1
    assert len(stack.fake.results_for("slide-a")) == 1
    assert frame_status(results[0]) is Status.QUEUED


def _tagged(x: float) -> dict[str, Any]:
    polygon = {"points": [{"x": x, "y": 0.1}, {"x": x + 0.1, "y": 0.1}, {"x": x, "y": 0.2}]}
    return {"type": "taggedPolygon", "content": {"polygon": polygon, "tags": []}}


@pytest_twisted.ensureDeferred
async def test_each_region_resolves_to_its_own_result_and_none_takes_anothers(
    stack: Stack,
) -> None:
    """Region jobs on one slide each get a result of their own (found again by their
    key, even concurrently); a whole-slide job on the same slide never takes a
    region's; and a second job of the same region reuses that region's result."""
    first = stack.job("slide-r", input=_tagged(0.1))
    second = stack.job("slide-r", input=_tagged(0.5))
    got = await ensureDeferred(
        _all(*[stack.writer.resolve(j) for j in (first, second, first, second)])
    )
    assert got[0].id == got[2].id and got[1].id == got[3].id and got[0].id != got[1].id
    whole = await stack.writer.resolve(stack.job("slide-r"))
    assert whole.id not in (got[0].id, got[1].id)
    rerun = await stack.writer.resolve(attrs.evolve(first, job_id="f" * 32, attempts=1))
    assert rerun.id == got[0].id
    assert len(stack.fake.results_for("slide-r")) == 3


@pytest_twisted.ensureDeferred
async def test_a_slide_whose_list_has_foreign_items_is_still_written(stack: Stack) -> None:
    """Unreadable items in the slide's results list are skipped: the job creates its
    result, writes its answer, and the next job of the slide finds and reuses it."""
    job = stack.job("slide-f")
    stack.fake.foreign_results["slide-f"] = [{"id": "1"}, {"slideId": None, "id": 2}, [3]]
    stored = await stack.writer.resolve(job)
    final = stack.writer.final(job, Result(slideId="slide-f", displayResult="answer"))
    await stack.writer.update(job, stored, final)
    again = await stack.writer.resolve(attrs.evolve(job, job_id="e" * 32))
    assert again.id == stored.id and again.displayResult == "answer"


async def _all(*coros: Any) -> list[Any]:
    from twisted.internet.defer import gatherResults

    return await gatherResults([ensureDeferred(c) for c in coros])  # type: ignore[no-any-return]


@pytest_twisted.ensureDeferred
async def test_resolve_of_a_fresh_create_waits_for_the_front_doors_frame(
    reactor: Any, stack: Stack
) -> None:
    """A brand-new create request: the front door stores its frame a moment later;
    resolve finds that one instead of creating a second annotation."""
    job = stack.job("slide-b", JobKind.CREATE, updated=reactor.seconds())
    resolving = ensureDeferred(stack.writer.resolve(job))
    frame = stack.writer.frame(job, Status.QUEUED, "queued")
    await deferLater(reactor, 0.2, lambda: None)
    stored = stack.fake.store_result("dpatia", frame)
    found = await resolving
    assert found.id == stored.id
    assert len(stack.fake.results_for("slide-b")) == 1


@pytest_twisted.ensureDeferred
async def test_a_progress_frame_never_replaces_a_final_result_written_meanwhile(
    stack: Stack,
) -> None:
    """Progress written with a stale versionId, over a final result: declined."""
    job = stack.job("slide-c")
    stored = await stack.writer.resolve(job)
    final = stack.writer.final(job, Result(slideId="slide-c", displayResult="42"))
    done = await stack.writer.update(job, stored, final)
    assert is_final(done)
    progress = stack.writer.frame(job, Status.RUNNING, "working", progress=50)
    with pytest.raises(Superseded):
        await stack.writer.update(job, stored, progress, keep=is_final)
    [current] = stack.fake.results_for("slide-c")
    assert current.displayResult == "42"
    assert current.applicationVersion == __version__


@pytest_twisted.ensureDeferred
async def test_a_deleted_result_is_gone_and_never_recreated(stack: Stack) -> None:
    """After the SPS lost the result (a user deleted it), writes raise ResultGone and
    nothing is created behind the user's back."""
    job = stack.job("slide-d")
    stored = await stack.writer.resolve(job)
    assert stored.id is not None
    del stack.fake.results[stored.id]
    with pytest.raises(ResultGone):
        await stack.writer.update(job, stored, stack.writer.frame(job, Status.RUNNING, "x"))
    with pytest.raises(ResultGone):
        await stack.writer.resolve(attrs.evolve(job, result_id=stored.id))
    assert stack.fake.results_for("slide-d") == []


@pytest_twisted.ensureDeferred
async def test_the_front_doors_frame_does_not_overwrite_a_running_jobs_result(
    stack: Stack,
) -> None:
    """store_queued_frame once the job is no longer queued: the existing result is
    returned unchanged; with no result at all, the frame is created (once)."""
    job = stack.job("slide-e")

    async def no() -> bool:
        return False

    created = await stack.writer.store_queued_frame(job, None, no)
    assert created.id is not None
    running = await stack.writer.update(
        job, created, stack.writer.frame(job, Status.RUNNING, "busy", progress=10)
    )
    again = await stack.writer.store_queued_frame(job, None, no)
    assert again.id == created.id
    assert frame_status(again) is Status.RUNNING
    assert again.versionId == running.versionId
    assert len(stack.fake.results_for("slide-e")) == 1


# --- work folders -----------------------------------------------------------------------


def folder_job(slide_id: str = "s", **fields: Any) -> Job:
    return Job(
        slide_id=slide_id,
        application_id="dpatia",
        kind=JobKind.NOTIFICATION,
        callback=Callback("http://x/", "token-secret"),
        created=0.0,
        **fields,
    )


def test_work_folders_are_private_and_hold_the_job(tmp_path: Path) -> None:
    """0700 folder named by the job key, 0600 job.json with the job (and its token)."""
    folders = WorkFolders(FilePath(str(tmp_path / "work")))
    job = folder_job()
    folder = Path(folders.prepare(job).path)
    assert folder.name == job.key
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(folder / "job.json").st_mode) == 0o600
    assert Job.from_json((folder / "job.json").read_bytes()) == job


def test_a_results_serialised_content_is_read_as_raw_json(tmp_path: Path) -> None:
    """A worker's result.json with its content as a JSON text (resultContent) reads as
    RawJSON of that text; the inline content of an older worker still reads; a
    resultContent that is not a content, or beside inline content, is refused."""
    folders = WorkFolders(FilePath(str(tmp_path / "work")))
    job = folder_job()
    folder = Path(folders.prepare(job).path)
    path = folder / "result.json"
    content = [{"polygons": [{"points": [{"x": 0.5, "y": 0.25}]}]}]

    def write(payload: dict[str, Any], **extra: Any) -> None:
        result = {"slideId": "s", "displayResult": "n", "data": {"result": payload}}
        path.write_text(json.dumps({"jobId": job.job_id, "result": result, **extra}))

    write({"type": "primitive"}, resultContent=json.dumps(content))
    read = folders.read_result(job, str(path))
    assert read.data.result is not None
    assert read.data.result.content == RawJSON(json.dumps(content))
    write({"type": "primitive", "content": content})
    inline = folders.read_result(job, str(path))
    assert inline.data.result is not None and inline.data.result.content == content
    for payload, text in (
        ({"type": "primitive"}, "not json"),
        ({"type": "primitive"}, 42),
        ({"type": "primitive", "content": content}, json.dumps(content)),
    ):
        write(payload, resultContent=text)
        with pytest.raises(UnusableResult):
            folders.read_result(job, str(path))


def test_a_result_is_reused_only_by_the_same_job(tmp_path: Path) -> None:
    """result.json of this job is reused by its retry; another job's is dropped; a
    path outside the folder or a broken file is refused."""
    folders = WorkFolders(FilePath(str(tmp_path / "work")))
    job = folder_job()
    folder = Path(folders.prepare(job).path)
    result = {"slideId": "s", "displayResult": "42"}
    (folder / "result.json").write_text(json.dumps({"jobId": job.job_id, "result": result}))
    reused = folders.completed(job)
    assert reused is not None and reused.result.displayResult == "42"
    assert reused.verdict is None
    with pytest.raises(UnusableResult):
        folders.read_result(job, str(tmp_path / "elsewhere.json"))
    other = attrs.evolve(job, job_id="f" * 32)
    folders.prepare(other)
    assert not (folder / "result.json").exists()
    assert folders.completed(other) is None


def test_prune_removes_only_old_folders_of_ended_jobs(tmp_path: Path) -> None:
    """prune keeps active keys and recently touched folders."""
    root = tmp_path / "work"
    folders = WorkFolders(FilePath(str(root)))
    active, ended, fresh = (folder_job(slide_id=f"s{n}") for n in range(3))
    for job in (active, ended, fresh):
        folders.prepare(job)
    old = 1_000_000.0
    for job in (active, ended):
        os.utime(root / job.key, (old, old))
    folders.prune({active.key}, now=old + 3600)
    assert sorted(p.name for p in root.iterdir()) == sorted([active.key, fresh.key])


def _ended_job_folder(tmp_path: Path, folders: WorkFolders) -> tuple[Job, Path]:
    job = Job(
        slide_id="slide-r",
        application_id="dpatia",
        kind=JobKind.CREATE,
        callback=Callback("http://127.0.0.1:1/x", "secret-token"),
        created=1.0,
    )
    folder = Path(folders.prepare(job).path)
    for name in ("slide_info.json", "thumbnail.png", "label.jpg", "result.json"):
        (folder / name).write_bytes(b"x")
    (folder / "wsi").mkdir()
    (folder / "wsi" / "slide.tif").write_bytes(b"x" * 100)
    return job, folder


@pytest.mark.parametrize("keep_wsi", [False, True])
def test_retiring_a_folder_keeps_the_records_and_drops_secrets(
    tmp_path: Path, keep_wsi: bool
) -> None:
    """When a job ends, its token and label go at once, the WSI unless keep_wsi;
    metadata, thumbnail and result stay for retention_days."""
    folders = WorkFolders(FilePath(str(tmp_path / "work")), keep_wsi=keep_wsi, retention_days=30)
    job, folder = _ended_job_folder(tmp_path, folders)
    folders.remove(job)
    left = sorted(p.name for p in folder.iterdir())
    expected = ["result.json", "slide_info.json", "thumbnail.png"] + (["wsi"] if keep_wsi else [])
    assert left == sorted(expected)
    assert not any(b"secret-token" in p.read_bytes() for p in folder.rglob("*") if p.is_file())


def test_retired_folders_are_pruned_after_retention_days(tmp_path: Path) -> None:
    """prune() keeps a retired folder until retention_days have passed since the job
    ended; a folder left by a crash (job.json still there) goes after min_age."""
    folders = WorkFolders(FilePath(str(tmp_path / "work")), retention_days=2)
    job, folder = _ended_job_folder(tmp_path, folders)
    folders.remove(job)
    ended = os.stat(folder).st_mtime
    crashed = Job(
        slide_id="slide-c",
        application_id="dpatia",
        kind=JobKind.CREATE,
        callback=Callback("http://127.0.0.1:1/x", "t"),
        created=1.0,
    )
    stale = Path(folders.prepare(crashed).path)
    os.utime(stale, (ended, ended))
    folders.prune(set(), now=ended + 3600)
    assert folder.exists() and not stale.exists()
    folders.prune(set(), now=ended + 2 * 86400 + 1)
    assert not folder.exists()


def test_zero_retention_removes_everything_at_once(tmp_path: Path) -> None:
    """retention_days = 0: an ended job's folder is removed whole."""
    folders = WorkFolders(FilePath(str(tmp_path / "work")), retention_days=0)
    job, folder = _ended_job_folder(tmp_path, folders)
    folders.remove(job)
    assert not folder.exists()
