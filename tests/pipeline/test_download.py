"""WSI download (:mod:`dpatia_daemon.pipeline.download` and its folder, :mod:`.downloadfolder`).

Most tests run in memory: the real ``SPSClient`` over a real ``Agent`` against the fake
SPS (or a small resource of our own that speaks ``Range``) through
``RequestTraversalAgent``, a ``task.Clock`` for the idle timer and the deadline, and an
inline ``run_blocking``.  The streaming
and back-pressure tests use a loopback ``Site`` and the reactor's thread pool.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import random
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from attrs import define, field
from conftest import failure_result_of, no_result
from treq.client import HTTPClient
from treq.testing import RequestTraversalAgent
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred, maybeDeferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThreadPool
from twisted.python.filepath import FilePath
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site
from zope.interface import implementer

from dpatia_daemon.durable import fsync_directory
from dpatia_daemon.jobs import Callback
from dpatia_daemon.pipeline import download, downloadfolder
from dpatia_daemon.pipeline.download import MANIFEST_NAME, DownloadError, download_files
from dpatia_daemon.pipeline.filenames import (
    fallback_name,
)
from dpatia_daemon.simulator.fake import BASE_PATH, FakeSPS, multipart_related
from dpatia_daemon.sps.client import SPSClient, SPSNotFound, make_http_client

SLIDE = "slide-1"
BASE = "http://sps.test" + BASE_PATH
FILES_PATH = BASE_PATH + f"/slides/{SLIDE}/files"


def inline(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
    """run_blocking for unit tests: run at once, on this thread."""
    return maybeDeferred(f, *args)


def data_of(n: int, seed: int = 0) -> bytes:
    """``n`` deterministic pseudo-random bytes (CRs, LFs and dashes among them)."""
    return random.Random(seed).randbytes(n)


# --- a files resource that speaks Range and can cut or stall -----------------------------


@implementer(IPushProducer)
class _Producer:
    """Writes ``body[start:]`` in chunks while not paused; cuts or stalls on request."""

    def __init__(self, owner: FileServer, request: IRequest, body: bytes) -> None:
        self.owner = owner
        self.request = request
        self.body = body
        self.pos = 0
        self.paused = False
        self.stopped = False
        self.busy = False

    def start(self) -> None:
        self.request.notifyFinish().addErrback(lambda _: self.stopProducing())  # type: ignore[attr-defined]
        self.request.registerProducer(self, True)
        self.resumeProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        if self.busy:
            return
        self.busy = True
        try:
            while not self.paused and not self.stopped:
                limit = len(self.body)
                if self.owner.cut_after is not None:
                    limit = min(limit, self.owner.cut_after)
                if self.owner.stall_after is not None:
                    limit = min(limit, self.owner.stall_after)
                if self.pos >= limit:
                    break
                chunk = self.body[self.pos : min(limit, self.pos + self.owner.chunk)]
                self.pos += len(chunk)
                self.owner.sent += len(chunk)
                self.request.write(chunk)
            if self.stopped or self.paused:
                return
            if self.pos >= len(self.body):
                self.request.unregisterProducer()
                self.request.finish()
            elif self.owner.cut_after is not None and self.pos >= self.owner.cut_after:
                self.owner.cut_after = None  # only the first answer is cut
                self.request.unregisterProducer()
                self.request.transport.loseConnection()  # type: ignore[attr-defined]
            # else: stalled; the client's idle timer must end it
        finally:
            self.busy = False

    def pauseProducing(self) -> None:
        self.paused = True
        self.owner.pauses += 1
        waiters, self.owner.pause_waiters = self.owner.pause_waiters, []
        for d in waiters:
            d.callback(None)

    def stopProducing(self) -> None:
        self.stopped = True
        self.owner.stopped += 1


@define(eq=False)
class FileServer(Resource):
    """Serves ``files`` for any path: one file (with Range, ETag) or multipart/related.

    ``cut_after``: close the first answer's connection after that many body bytes;
    ``stall_after``: stop sending after that many; ``honour_range``: answer Range
    requests with 206 (else 200); ``bad_range``: answer 206 with a wrong Content-Range.
    """

    files: list[tuple[str, bytes]]
    content_type: str | None = None
    disposition: bool = True
    cut_after: int | None = None
    stall_after: int | None = None
    honour_range: bool = True
    bad_range: bool = False
    etag: str | None = '"v1"'
    chunk: int = 4096
    content_length: bool = True
    boundary: str = "bnd-0123456789"
    requests: list[dict[str, str]] = field(factory=list)
    producers: list[_Producer] = field(factory=list)
    sent: int = 0
    pauses: int = 0
    stopped: int = 0
    pause_waiters: list[Deferred[None]] = field(factory=list)
    isLeaf = True

    def __attrs_post_init__(self) -> None:
        Resource.__init__(self)

    def held_back(self) -> Deferred[None]:
        """Fires when the transport holds the server back: now if the latest answer's
        producer is paused, else at its next pause."""
        d: Deferred[None] = Deferred()
        if self.producers and self.producers[-1].paused:
            d.callback(None)
        else:
            self.pause_waiters.append(d)
        return d

    def render_GET(self, request: IRequest) -> Any:
        headers = {
            k.decode().lower(): b", ".join(v).decode()
            for k, v in request.requestHeaders.getAllRawHeaders()
        }
        self.requests.append(headers)
        if len(self.files) == 1:
            name, body = self.files[0]
            request.setHeader(b"content-type", self.content_type or "application/octet-stream")
            if self.disposition:
                quoted = name.replace("\\", "\\\\").replace('"', '\\"')
                request.setHeader(b"content-disposition", f'attachment; filename="{quoted}"')
            if self.etag:
                request.setHeader(b"etag", self.etag)
            wanted = headers.get("range", "")
            if wanted.startswith("bytes=") and self.honour_range:
                start = int(wanted[len("bytes=") : -1])
                if start >= len(body):
                    request.setResponseCode(416)
                    request.setHeader(b"content-range", f"bytes */{len(body)}")
                    return b""
                request.setResponseCode(206)
                shown = start + 1 if self.bad_range else start
                request.setHeader(b"content-range", f"bytes {shown}-{len(body) - 1}/{len(body)}")
                body = body[start:]
        else:
            body = multipart_related(self.files, self.boundary)
            request.setHeader(
                b"content-type", self.content_type or f"multipart/related; boundary={self.boundary}"
            )
        if self.content_length:
            request.setHeader(b"content-length", str(len(body)))
        producer = _Producer(self, request, body)
        self.producers.append(producer)
        producer.start()
        return NOT_DONE_YET


# --- in-memory wiring -----------------------------------------------------------------------


@define
class Env:
    """One SPS client wired in memory to a resource, a clock, and a job folder."""

    agent: RequestTraversalAgent
    clock: Clock
    client: SPSClient
    callback: Callback
    folder: FilePath[str]
    fake: FakeSPS | None = None

    def download(self, **kwargs: Any) -> Deferred[list[FilePath[str]]]:
        kwargs.setdefault("clock", self.clock)
        kwargs.setdefault("run_blocking", inline)
        d = ensureDeferred(download_files(self.client, self.callback, SLIDE, self.folder, **kwargs))
        self.pump(d)
        return d

    def pump(self, d: Deferred[Any]) -> None:
        """Move bytes in memory until ``d`` fires (or nothing moves any more)."""
        done: list[Any] = []
        d.addBoth(lambda r: done.append(r) or r)
        for _ in range(100_000):
            if done:
                return
            self.agent.flush()
            if not any(p.pump() for p in list(self.agent._pumps)):  # type: ignore[attr-defined]
                break

    def result(self, d: Deferred[Any]) -> Any:
        self.pump(d)
        results: list[Any] = []
        d.addBoth(lambda r: results.append(r))
        assert results, "the download did not finish"
        if hasattr(results[0], "raiseException"):
            results[0].raiseException()
        return results[0]


def make_env(
    tmp_path: Path,
    resource: Resource | None = None,
    *,
    fake: FakeSPS | None = None,
) -> Env:
    if resource is None:
        fake = fake or FakeSPS()
        resource = fake.resource()
    agent = RequestTraversalAgent(resource)
    clock = Clock()
    client = SPSClient(
        http=HTTPClient(agent),
        clock=clock,
        software_version="1.0",
        random=lambda: 0.5,
        retries=0,
    )
    token = fake.issue_token() if fake is not None else "secret-token"
    folder = FilePath(str(tmp_path / "job" / "wsi"))
    return Env(agent, clock, client, Callback(BASE, token), folder, fake)


def listing(folder: FilePath[str]) -> dict[str, bytes]:
    return {p.basename(): p.getContent() for p in folder.children() if p.isfile()}


def manifest(folder: FilePath[str]) -> dict[str, Any]:
    return json.loads(folder.child(MANIFEST_NAME).getContent())


# --- single file ------------------------------------------------------------------------------


def test_single_file(tmp_path: Path) -> None:
    """A single file lands under its Content-Disposition name, with a complete manifest."""
    fake = FakeSPS()
    payload = data_of(300_000)
    fake.add_slide(SLIDE, files=[("scan.svs", payload)])
    env = make_env(tmp_path, fake=fake)
    seen: list[tuple[int, int | None]] = []
    files = env.result(env.download(progress=lambda n, t: seen.append((n, t))))
    assert files == [env.folder.child("scan.svs")]
    assert listing(env.folder) == {
        "scan.svs": payload,
        MANIFEST_NAME: env.folder.child(MANIFEST_NAME).getContent(),
    }
    record = manifest(env.folder)
    assert record["complete"] is True
    assert record["files"] == [{"index": 0, "name": "scan.svs", "size": len(payload)}]
    assert seen[-1] == (len(payload), len(payload))
    assert all(t == len(payload) for _, t in seen)


def test_single_file_without_a_name(tmp_path: Path) -> None:
    """Without Content-Disposition the name derives from the slide id's hash (+ type)."""
    server = FileServer([("ignored", b"TIFFDATA")], content_type="image/tiff", disposition=False)
    env = make_env(tmp_path, server)
    files = env.result(env.download())
    assert [f.basename() for f in files] == [fallback_name(SLIDE, ".tiff")]
    assert files[0].getContent() == b"TIFFDATA"


@pytest.mark.parametrize(
    "hostile",
    ["../../x", "/abs/path/x", "", "..", "..\\..\\x", "x\\..\\..", ".", "-x"],
)
def test_hostile_single_file_name_lands_safely(tmp_path: Path, hostile: str) -> None:
    """A hostile single-file name is reduced to a base name inside the folder."""
    fake = FakeSPS()
    fake.add_slide(SLIDE, files=[(hostile, b"payload")])
    env = make_env(tmp_path, fake=fake)
    files = env.result(env.download())
    assert len(files) == 1
    assert files[0].parent() == env.folder
    assert files[0].getContent() == b"payload"
    # Nothing anywhere else under tmp_path but the job folder.
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert written == sorted(["job/wsi/" + MANIFEST_NAME, "job/wsi/" + files[0].basename()])


def test_content_length_mismatch_fails(tmp_path: Path) -> None:
    """A body shorter than its Content-Length is an error; the .part stays."""
    server = FileServer([("a.svs", data_of(50_000))], cut_after=20_000)
    env = make_env(tmp_path, server)
    failure = failure_result_of(env.download(), DownloadError)
    assert "closed after 20000 body bytes" in str(failure.value)
    assert SLIDE in str(failure.value) and "secret-token" not in str(failure.value)
    assert env.folder.child("a.svs.part").getsize() == 20_000
    assert not env.folder.child("a.svs").exists()


# --- multipart --------------------------------------------------------------------------------


THREE = [("a.dcm", data_of(70_000, 1)), ("b.dcm", data_of(0, 2)), ("c.dcm", data_of(123_457, 3))]


def test_multipart_three_parts(tmp_path: Path) -> None:
    """Three parts land as three files, in order, each recorded in the manifest."""
    fake = FakeSPS()
    fake.add_slide(SLIDE, files=THREE)
    env = make_env(tmp_path, fake=fake)
    files = env.result(env.download())
    assert [(f.basename(), f.getContent()) for f in files] == THREE
    assert [e["size"] for e in manifest(env.folder)["files"]] == [len(d) for _, d in THREE]
    assert not [p for p in env.folder.children() if p.basename().endswith(".part")]


@pytest.mark.parametrize(
    "content_type", ['multipart/form-data; boundary="{b}"', "multipart/mixed;boundary={b}"]
)
def test_any_multipart_type(tmp_path: Path, content_type: str) -> None:
    """multipart/form-data (as the pypi mock sends) and others are parsed too."""
    server = FileServer(THREE, content_type=content_type.format(b="bnd-0123456789"), chunk=7)
    env = make_env(tmp_path, server)
    assert [(f.basename(), f.getContent()) for f in env.result(env.download())] == THREE


def test_hostile_multipart_names_land_safely(tmp_path: Path) -> None:
    """Traversal, absolute, empty, dot and backslash names all land inside the folder,
    de-duplicated; nothing is written anywhere else."""
    hostile = ["../../x", "/etc/x", "", "..", "..\\..\\x", ".", "x", "sub/../../x"]
    fake = FakeSPS()
    fake.add_slide(SLIDE, files=[(name, f"#{i}".encode()) for i, name in enumerate(hostile)])
    env = make_env(tmp_path, fake=fake)
    files = env.result(env.download())
    fb = fallback_name(SLIDE)
    assert [f.basename() for f in files] == [
        "x",
        "x (2)",
        f"{fb}-3",
        f"{fb}-4",
        "x (3)",
        f"{fb}-6",
        "x (4)",
        "x (5)",
    ]
    assert [f.getContent() for f in files] == [f"#{i}".encode() for i in range(len(hostile))]
    outside = [p for p in tmp_path.rglob("*") if p.is_file() and p.parent != Path(env.folder.path)]
    assert outside == []


def test_malformed_multipart_fails_and_closes(tmp_path: Path) -> None:
    """A part whose Content-Length lies is an error naming the slide; the connection closes."""
    body = multipart_related([("a.dcm", b"12345")], "bnd").replace(
        b"Content-Length: 5", b"Content-Length: 9"
    )

    class Lying(Resource):
        isLeaf = True

        def render_GET(self, request: IRequest) -> bytes:
            request.setHeader(b"content-type", b"multipart/related; boundary=bnd")
            return body

    env = make_env(tmp_path, Lying())
    failure = failure_result_of(env.download(), DownloadError)
    assert "malformed multipart answer" in str(failure.value)


def test_truncated_multipart_without_length_fails(tmp_path: Path) -> None:
    """A multipart body that ends cleanly but before its closing delimiter is an error."""

    class Short(Resource):
        isLeaf = True

        def render_GET(self, request: IRequest) -> bytes:
            request.setHeader(b"content-type", b"multipart/related; boundary=bnd")
            return multipart_related([("a.dcm", b"12345"), ("b.dcm", b"678")], "bnd")[:-20]

    env = make_env(tmp_path, Short())
    failure = failure_result_of(env.download(), DownloadError)
    assert "truncated" in str(failure.value)
    assert env.folder.child("a.dcm").getContent() == b"12345"


def test_empty_multipart_fails(tmp_path: Path) -> None:
    """A multipart answer without parts is an error (there is nothing to analyse)."""

    class Empty(Resource):
        isLeaf = True

        def render_GET(self, request: IRequest) -> bytes:
            request.setHeader(b"content-type", b"multipart/related; boundary=bnd")
            return b"--bnd--\r\n"

    env = make_env(tmp_path, Empty())
    assert "no parts" in str(failure_result_of(env.download(), DownloadError).value)


# --- retries and resumes ----------------------------------------------------------------------


def files_requests(fake: FakeSPS) -> int:
    return sum(1 for r in fake.requests if r.path == FILES_PATH)


def test_complete_download_is_not_requested_again(tmp_path: Path) -> None:
    """A retry after a complete download makes no request and returns the same files."""
    fake = FakeSPS()
    fake.add_slide(SLIDE, files=THREE)
    env = make_env(tmp_path, fake=fake)
    first = env.result(env.download())
    assert files_requests(fake) == 1
    seen: list[tuple[int, int | None]] = []
    again = env.result(env.download(progress=lambda n, t: seen.append((n, t))))
    assert again == first and files_requests(fake) == 1
    total = sum(len(d) for _, d in THREE)
    assert seen == [(total, total)]


def test_missing_file_means_download_again(tmp_path: Path) -> None:
    """If a recorded file vanished, the retry requests again and rewrites only it."""
    fake = FakeSPS()
    fake.add_slide(SLIDE, files=THREE)
    env = make_env(tmp_path, fake=fake)
    env.result(env.download())
    inode_a = os.stat(env.folder.child("a.dcm").path).st_ino
    env.folder.child("c.dcm").remove()
    files = env.result(env.download())
    assert files_requests(fake) == 2
    assert [(f.basename(), f.getContent()) for f in files] == THREE
    assert os.stat(env.folder.child("a.dcm").path).st_ino == inode_a


def test_corrupt_manifest_is_ignored(tmp_path: Path) -> None:
    """An unreadable manifest means starting over, not failing."""
    fake = FakeSPS()
    fake.add_slide(SLIDE, files=THREE)
    env = make_env(tmp_path, fake=fake)
    env.folder.makedirs()
    env.folder.child(MANIFEST_NAME).setContent(b"{not json")
    assert len(env.result(env.download())) == 3


def test_interrupted_multipart_resumes_without_rewriting_completed_parts(
    tmp_path: Path,
) -> None:
    """Cut in the middle of the third part: the retry consumes parts 1-2 without
    writing them (same inode and mtime) and completes part 3."""
    fake = FakeSPS()
    fake.add_slide(SLIDE, files=THREE)
    fake.faults.drop_after_bytes = 70_000 + 100_000
    fake.faults.drop_count = 1
    env = make_env(tmp_path, fake=fake)
    failure = failure_result_of(env.download(), DownloadError)
    assert "closed after" in str(failure.value)
    assert env.folder.child("a.dcm").getContent() == THREE[0][1]
    assert env.folder.child("c.dcm.part").exists()
    assert [e["name"] for e in manifest(env.folder)["files"]] == ["a.dcm", "b.dcm"]
    stat_a = os.stat(env.folder.child("a.dcm").path)
    stat_b = os.stat(env.folder.child("b.dcm").path)
    files = env.result(env.download())
    assert [(f.basename(), f.getContent()) for f in files] == THREE
    for name, before in (("a.dcm", stat_a), ("b.dcm", stat_b)):
        after = os.stat(env.folder.child(name).path)
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert not env.folder.child("c.dcm.part").exists()
    assert manifest(env.folder)["complete"] is True


def test_interrupted_single_file_starts_over_when_the_sps_ignores_range(tmp_path: Path) -> None:
    """SPSClient asks for the rest (Range); an SPS that answers 200 with the whole file
    instead gets the file fetched whole again, correctly."""
    payload = data_of(200_000)
    server = FileServer([("scan.svs", payload)], cut_after=80_000, honour_range=False)
    env = make_env(tmp_path, server)
    failure_result_of(env.download(), DownloadError)
    assert env.folder.child("scan.svs.part").getsize() == 80_000
    files = env.result(env.download())
    assert files[0].getContent() == payload
    assert server.requests[-1]["range"] == "bytes=80000-"
    assert server.sent == 80_000 + 200_000


def test_interrupted_single_file_resumes_with_range(tmp_path: Path) -> None:
    """SPSClient.open_files sends Range/If-Range: the retry asks for bytes=N- (If-Range:
    the ETag), gets 206, and appends only the missing bytes."""
    payload = data_of(200_000)
    server = FileServer([("scan.svs", payload)], cut_after=80_000)
    env = make_env(tmp_path, server)
    failure_result_of(env.download(), DownloadError)
    pending = manifest(env.folder)["pending"]
    assert pending == {"name": "scan.svs", "size": 200_000, "validator": '"v1"'}
    seen: list[tuple[int, int | None]] = []
    files = env.result(env.download(progress=lambda n, t: seen.append((n, t))))
    assert files[0].getContent() == payload
    assert server.requests[-1]["range"] == "bytes=80000-"
    assert server.requests[-1]["if-range"] == '"v1"'
    assert server.sent == 200_000  # 80 000 + the 120 000 missing
    assert seen[0][0] >= 80_000 and seen[-1] == (200_000, 200_000)
    assert "pending" not in manifest(env.folder)


def test_mismatched_content_range_starts_over(tmp_path: Path) -> None:
    """A 206 that does not continue our .part is dropped and the file fetched whole."""
    payload = data_of(100_000)
    server = FileServer([("scan.svs", payload)], cut_after=30_000, bad_range=True)
    env = make_env(tmp_path, server)
    failure_result_of(env.download(), DownloadError)
    files = env.result(env.download())
    assert files[0].getContent() == payload
    assert [r.get("range") for r in server.requests] == [None, "bytes=30000-", None]


def test_range_not_satisfiable_starts_over(tmp_path: Path) -> None:
    """A 416 (our .part is longer than the file now) means fetching it whole."""
    payload = data_of(10_000)
    server = FileServer([("scan.svs", payload)])
    env = make_env(tmp_path, server)
    env.folder.makedirs()
    env.folder.child("scan.svs.part").setContent(b"x" * 9_000)
    env.folder.child(MANIFEST_NAME).setContent(
        json.dumps(
            {
                "format": 1,
                "slide": hashlib.sha256(SLIDE.encode()).hexdigest(),
                "complete": False,
                "files": [],
                "pending": {"name": "scan.svs", "size": None, "validator": None},
            }
        ).encode()
    )
    server.files = [("scan.svs", payload[:5_000])]
    files = env.result(env.download())
    assert files[0].getContent() == payload[:5_000]
    assert [r.get("range") for r in server.requests] == ["bytes=9000-", None]


def test_part_that_changed_size_is_fetched_again(tmp_path: Path) -> None:
    """A completed part whose server copy changed (no part Content-Length to tell) fails
    the attempt and is forgotten, so the next attempt writes it again."""
    first = [("a.dcm", b"A" * 1000), ("b.dcm", b"B" * 10)]

    @define(eq=False)
    class NoLengths(Resource):
        files: list[tuple[str, bytes]]
        isLeaf = True

        def __attrs_post_init__(self) -> None:
            Resource.__init__(self)

        def render_GET(self, request: IRequest) -> bytes:
            request.setHeader(b"content-type", b"multipart/related; boundary=bnd")
            return multipart_related(self.files, "bnd").replace(b"Content-Length", b"X-Length")

    server = NoLengths(first)
    env = make_env(tmp_path, server)
    env.result(env.download())
    env.folder.child(MANIFEST_NAME).setContent(
        env.folder.child(MANIFEST_NAME)
        .getContent()
        .replace(b'"complete": true', b'"complete": false')
    )
    server.files = [("a.dcm", b"a" * 999), ("b.dcm", b"B" * 10)]
    failure = failure_result_of(env.download(), DownloadError)
    assert "downloaded again" in str(failure.value)
    assert not env.folder.child("a.dcm").exists()
    files = env.result(env.download())
    assert files[0].getContent() == b"a" * 999


def test_sps_errors_pass_through(tmp_path: Path) -> None:
    """A failing request is the SPS client's error (as for every SPS call)."""
    env = make_env(tmp_path, fake=FakeSPS())
    failure_result_of(env.download(), SPSNotFound)
    assert not env.folder.child(MANIFEST_NAME).exists()


# --- timers and cancellation ------------------------------------------------------------------


def test_idle_timeout(tmp_path: Path) -> None:
    """No byte for idle_timeout seconds: a DownloadError, the connection closed, .part kept."""
    server = FileServer([("scan.svs", data_of(100_000))], stall_after=10_000)
    env = make_env(tmp_path, server)
    d = env.download(idle_timeout=30.0)
    no_result(d)
    env.clock.advance(29.0)
    no_result(d)
    env.clock.advance(1.0)
    failure = failure_result_of(d, DownloadError)
    assert "no data for 30 s after 10000 bytes" in str(failure.value)
    env.agent.flush()
    assert server.stopped == 1
    assert env.folder.child("scan.svs.part").getsize() == 10_000


def test_idle_timer_restarts_with_data(tmp_path: Path) -> None:
    """Bytes arriving reset the idle timer: a slow but steady server is not idle."""
    payload = data_of(40_000)
    server = FileServer([("scan.svs", payload)], stall_after=10_000)
    env = make_env(tmp_path, server)
    d = env.download(idle_timeout=30.0)
    for limit in (20_000, 30_000, None):
        env.clock.advance(20.0)
        server.stall_after = limit
        server.producers[-1].resumeProducing()
        env.pump(d)
    assert env.result(d)[0].getContent() == payload


def test_deadline(tmp_path: Path) -> None:
    """The overall deadline ends a download that keeps trickling."""
    server = FileServer([("scan.svs", data_of(100_000))], stall_after=10_000)
    env = make_env(tmp_path, server)
    d = env.download(idle_timeout=100.0, deadline=50.0)
    env.clock.advance(50.0)
    failure = failure_result_of(d, DownloadError)
    assert "deadline of 50 s" in str(failure.value)
    env.agent.flush()
    assert server.stopped == 1
    assert env.folder.child("scan.svs.part").exists()


def test_deadline_covers_the_request(tmp_path: Path) -> None:
    """The deadline also ends a request whose headers never come."""
    fake = FakeSPS()
    fake.add_slide(SLIDE, files=THREE)
    fake.hang_next = 1
    env = make_env(tmp_path, fake=fake)
    env.client.timeout = 1000.0
    d = env.download(deadline=5.0)
    env.clock.advance(5.0)
    assert "deadline" in str(failure_result_of(d, DownloadError).value)


def test_cancel_closes_and_keeps_part(tmp_path: Path) -> None:
    """Cancelling the download (a cancelled job) closes the connection; .part stays."""
    server = FileServer([("scan.svs", data_of(100_000))], stall_after=10_000)
    env = make_env(tmp_path, server)
    d = env.download()
    d.cancel()
    failure_result_of(d, CancelledError)
    env.agent.flush()
    assert server.stopped == 1
    assert env.folder.child("scan.svs.part").getsize() == 10_000


def test_write_error_is_a_download_error(tmp_path: Path) -> None:
    """A .part that is a planted symlink is refused (O_NOFOLLOW), nothing written outside."""
    outside = tmp_path / "outside"
    outside.write_bytes(b"keep")
    server = FileServer([("scan.svs", b"payload")])
    env = make_env(tmp_path, server)
    env.folder.makedirs()
    os.symlink(str(outside), env.folder.child("scan.svs.part").path)
    failure = failure_result_of(env.download(), DownloadError)
    assert "cannot write the file" in str(failure.value)
    assert outside.read_bytes() == b"keep"


# --- over a real socket -----------------------------------------------------------------------


def _threads(reactor: Any) -> Callable[..., Deferred[Any]]:
    def run(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        return deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)

    return run


async def _loopback(
    reactor: Any, server: Resource, folder: FilePath[str], **kwargs: Any
) -> list[FilePath[str]]:
    port = reactor.listenTCP(0, Site(server), interface="127.0.0.1")
    http = make_http_client(reactor)
    client = SPSClient(http=http.client, clock=reactor, software_version="1", timeout=10)
    callback = Callback(f"http://127.0.0.1:{port.getHost().port}{BASE_PATH}", "t")
    try:
        kwargs.setdefault("run_blocking", _threads(reactor))
        return await download_files(client, callback, SLIDE, folder, clock=reactor, **kwargs)
    finally:
        await http.close()
        await maybeDeferred(port.stopListening)


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_loopback_multipart_streams(reactor: Any, tmp_path: Path) -> None:
    """A multi-MiB 3-part answer over a real socket, written through the thread pool."""
    parts = [
        ("a.dcm", data_of(3_000_000, 1)),
        ("b.dcm", data_of(5, 2)),
        ("c.dcm", data_of(5_000_000, 3)),
    ]
    server = FileServer(parts, chunk=65_536)
    folder = FilePath(str(tmp_path / "wsi"))
    files = await _loopback(reactor, server, folder)
    assert [(f.basename(), f.getContent()) for f in files] == parts


#: Seconds a loopback test waits for an event before it fails.
_WAIT = 20.0


async def _held_up(
    reactor: Any,
    server: FileServer,
    folder: FilePath[str],
    op: str,
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[Deferred[list[FilePath[str]]], Deferred[None], list[int]]:
    """Start a loopback download whose blocking operations named ``op`` wait for a gate;
    return once the body has paused its transport to wait for the disk and the server
    has been held back after that, with the download, the gate, and a list that counts
    the held operations."""
    threads = _threads(reactor)
    gate: Deferred[None] = Deferred()
    released: list[bool] = []
    gate.addCallback(lambda _: released.append(True))
    held: list[int] = []

    def run_blocking(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        if f.__name__ == op and not released:
            held.append(1)
            d: Deferred[None] = Deferred()
            gate.addCallback(lambda _: threads(f, *args).chainDeferred(d))
            return d
        return threads(f, *args)

    body_waits: Deferred[None] = Deferred()
    waited: list[bool] = []
    real_wait = download._Body._wait

    def spy_wait(body: Any, wait: Deferred[None]) -> None:
        real_wait(body, wait)
        if not waited:
            waited.append(True)
            body_waits.callback(None)

    monkeypatch.setattr(download._Body, "_wait", spy_wait)
    started = ensureDeferred(_loopback(reactor, server, folder, run_blocking=run_blocking))
    await body_waits.addTimeout(_WAIT, reactor)
    # The client stopped reading; the server keeps writing until the socket buffers
    # hold it back.
    await server.held_back().addTimeout(_WAIT, reactor)
    return started, gate, held


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_loopback_commits_overlap_but_are_bounded(
    reactor: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Many small parts: the stream goes on while earlier files are fsynced, but with
    no more than 4 commits in flight (each holds a descriptor): then the client waits."""
    parts = [(f"{i:03}.dcm", data_of(500_000, i)) for i in range(60)]
    server = FileServer(parts, chunk=65_536)
    folder = FilePath(str(tmp_path / "wsi"))
    started, gate, held = await _held_up(reactor, server, folder, "commit", monkeypatch)
    assert len(held) == 1  # the others queue behind it, in order
    # Parts 2-4 were written while part 1 waits for its fsync...
    assert folder.child("003.dcm.part").getsize() == 500_000
    assert not folder.child("000.dcm").exists()
    # ...and then the client stopped reading: the server holds most of the body.
    assert not folder.child("005.dcm.part").exists()
    assert server.sent < 20_000_000, server.sent
    gate.callback(None)
    files = await started
    assert [(f.basename(), f.getContent()) for f in files] == parts
    assert [e["index"] for e in manifest(folder)["files"]] == list(range(60))


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_loopback_reads_more_than_64_kib_at_a_time(
    reactor: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a body streams, the socket is read in chunks bigger than Twisted's 64 KiB
    (less CPU per GiB); the file arrives intact all the same."""
    writes: list[int] = []
    real_write_all = downloadfolder.write_all

    def spy(fd: int, data: bytes) -> None:
        writes.append(len(data))
        real_write_all(fd, data)

    monkeypatch.setattr(downloadfolder, "write_all", spy)
    payload = data_of(8 * 1024 * 1024, 5)
    server = FileServer([("big.svs", payload)], chunk=1024 * 1024)
    folder = FilePath(str(tmp_path / "wsi"))
    files = await _loopback(reactor, server, folder)
    assert files[0].getContent() == payload
    assert max(writes) > 64 * 1024, max(writes)


def test_directory_fsync_refused_does_not_fail_the_download(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A network filesystem that answers a directory fsync with EINVAL (NFS, SMB) gets
    the files downloaded all the same: the refusal is tolerated, not an error."""
    refused: list[int] = []

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            refused.append(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        os.fsync(fd)

    monkeypatch.setattr(
        downloadfolder, "fsync_directory", functools.partial(fsync_directory, fsync=fsync)
    )
    fake = FakeSPS()
    fake.add_slide(SLIDE, files=THREE)
    env = make_env(tmp_path, fake=fake)
    files = env.result(env.download())
    assert [(f.basename(), f.getContent()) for f in files] == THREE
    assert refused, "no directory fsync was attempted"
    assert manifest(env.folder)["complete"] is True


# --- odd answers ----------------------------------------------------------------------------


def test_unexpected_status_is_an_error(tmp_path: Path) -> None:
    """A 2xx other than 200 (here a 206 nobody asked for) is refused."""

    class Partial(Resource):
        isLeaf = True

        def render_GET(self, request: IRequest) -> bytes:
            request.setResponseCode(206)
            request.setHeader(b"content-range", b"bytes 0-3/10")
            return b"abcd"

    env = make_env(tmp_path, Partial())
    assert "unexpected answer HTTP 206" in str(
        failure_result_of(env.download(), DownloadError).value
    )


def test_switch_from_single_to_multipart(tmp_path: Path) -> None:
    """A .part of an interrupted single file is removed when the next answer is multipart."""
    server = FileServer([("scan.svs", data_of(50_000))], cut_after=10_000)
    env = make_env(tmp_path, server)
    failure_result_of(env.download(), DownloadError)
    assert env.folder.child("scan.svs.part").exists()
    server.files = THREE
    files = env.result(env.download())
    assert [(f.basename(), f.getContent()) for f in files] == THREE
    assert sorted(p.basename() for p in env.folder.children()) == sorted(
        [MANIFEST_NAME, "a.dcm", "b.dcm", "c.dcm"]
    )


def test_shorter_answer_forgets_extra_files(tmp_path: Path) -> None:
    """If the answer now has fewer parts, the manifest lists only the current ones."""
    server = FileServer(THREE)
    env = make_env(tmp_path, server)
    env.result(env.download())
    env.folder.child("a.dcm").remove()  # force a new request
    server.files = THREE[:2]
    files = env.result(env.download())
    assert [f.basename() for f in files] == ["a.dcm", "b.dcm"]
    assert [e["name"] for e in manifest(env.folder)["files"]] == ["a.dcm", "b.dcm"]


def test_progress_is_throttled(tmp_path: Path) -> None:
    """Progress is reported at most every half second of clock time, and at the end."""
    payload = data_of(100_000)
    server = FileServer([("scan.svs", payload)], stall_after=10_000)
    env = make_env(tmp_path, server)
    seen: list[tuple[int, int | None]] = []
    d = env.download(progress=lambda n, t: seen.append((n, t)))
    assert seen == [(10_000, 100_000)]  # the first bytes
    for limit in (20_000, 30_000):
        server.stall_after = limit
        server.producers[-1].resumeProducing()
        env.pump(d)
    assert len(seen) == 1  # no clock time passed
    env.clock.advance(0.5)
    server.stall_after = None
    server.producers[-1].resumeProducing()
    env.result(d)
    assert seen[1][0] > 30_000 and seen[-1] == (100_000, 100_000)


def test_unusable_folder_is_a_download_error(tmp_path: Path) -> None:
    """A folder that cannot be created (a file is in the way) is a DownloadError."""
    env = make_env(tmp_path, FileServer([("a.svs", b"x")]))
    env.folder.parent().makedirs()
    env.folder.setContent(b"in the way")
    assert "cannot use the download folder" in str(
        failure_result_of(env.download(), DownloadError).value
    )


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_simulator_cut_download_resumes_with_range(reactor: Any, tmp_path: Path) -> None:
    """The SPS simulator's fault "drop the connection mid-download": the retry asks for
    the rest (Range, If-Range) and the simulator answers 206 from that offset."""
    from dpatia_daemon.simulator.faults import Faults

    payload = data_of(3_000_000, 7)
    source = tmp_path / "scan.tif"
    source.write_bytes(payload)
    fake = FakeSPS(clock=reactor, faults=Faults(drop_after_bytes=1_000_000, drop_count=1))
    fake.add_slide(SLIDE).file_paths = [("scan.tif", source)]
    fake.tokens.add("t")
    folder = FilePath(str(tmp_path / "wsi"))
    with pytest.raises(DownloadError):
        await _loopback(reactor, fake.resource(), folder)
    files = await _loopback(reactor, fake.resource(), folder)
    assert [(f.basename(), f.getContent()) for f in files] == [("scan.tif", payload)]
    last = fake.requests[-1]
    assert last.header("range").startswith("bytes=")
    assert int(last.header("range")[6:-1]) >= 900_000


# --- transient or permanent -------------------------------------------------------------


def test_a_full_disk_is_a_transient_fault_of_this_host(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC while writing a file: a DownloadError marked transient and ``disk`` (the
    worker defers the job, no attempt spent, and the SPS is not blamed)."""

    def full(fd: int, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(downloadfolder, "write_all", full)
    env = make_env(tmp_path, FileServer([("scan.svs", data_of(10_000))]))
    error = failure_result_of(env.download(), DownloadError).value
    assert (error.transient, error.disk) == (True, True)
    assert "No space left" in str(error)


def test_a_full_disk_removes_the_partial_files_and_the_retry_completes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC in the middle of a multipart answer's second file: the .part files (and
    temp files) are removed before the error, so the space goes back; the file
    completed before stays, and the retry (disk free again) completes the rest."""
    files = [("a.dcm", data_of(50_000, 1)), ("b.dcm", data_of(400_000, 2))]
    fake = FakeSPS()
    fake.add_slide(SLIDE, files=files)
    env = make_env(tmp_path, fake=fake)
    real = downloadfolder.write_all
    written = [0]

    def filling(fd: int, data: bytes) -> None:
        if written[0] + len(data) > 100_000:
            raise OSError(errno.ENOSPC, "No space left on device")
        written[0] += len(data)
        real(fd, data)

    monkeypatch.setattr(downloadfolder, "write_all", filling)
    env.folder.makedirs()
    env.folder.child(".stale.json.1.tmp").setContent(b"half a manifest")
    error = failure_result_of(env.download(), DownloadError).value
    assert error.disk
    assert sorted(p.basename() for p in env.folder.children()) == [
        ".dpatia-files.json",
        "a.dcm",
    ]
    monkeypatch.setattr(downloadfolder, "write_all", real)
    done = env.result(env.download())
    assert [(f.basename(), f.getContent()) for f in done] == files


def test_an_idle_answer_is_transient_and_a_refused_write_is_not(tmp_path: Path) -> None:
    """No byte for idle_timeout: transient (the SPS may answer later).  A .part that is
    a planted symlink: a write refused for good, permanent."""
    server = FileServer([("scan.svs", data_of(100_000))], stall_after=10_000)
    env = make_env(tmp_path, server)
    d = env.download(idle_timeout=30.0)
    env.clock.advance(30.0)
    idle = failure_result_of(d, DownloadError).value
    assert (idle.transient, idle.disk) == (True, False)

    other = tmp_path / "other"
    other.mkdir()
    outside = tmp_path / "outside"
    outside.write_bytes(b"keep")
    env = make_env(other, FileServer([("scan.svs", b"payload")]))
    env.folder.makedirs()
    os.symlink(str(outside), env.folder.child("scan.svs.part").path)
    refused = failure_result_of(env.download(), DownloadError).value
    assert (refused.transient, refused.disk) == (False, False)
