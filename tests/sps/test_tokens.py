"""Expired callback tokens (issue 4 item 10): the newest token of a slide, tokens from
client credentials, the message without them, and where the secret may (not) go.

Unit tests run in memory against the fake SPS (``RequestTraversalAgent``) on a
``task.Clock``; the few tests that need real worker processes use the fake on loopback
and wait on supervisor events, never on sleeps.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import attrs
import pytest
import pytest_twisted
from conftest import failure_result_of, no_result, success_result_of, write_config
from treq.client import HTTPClient
from treq.testing import RequestTraversalAgent, StubTreq
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs, formatEvent
from twisted.python.filepath import FilePath
from twisted.web.server import Site

from dpatia_daemon import __version__
from dpatia_daemon.config import (
    Config,
    ConfigError,
    SPSConfig,
    URLPrefix,
    WorkersConfig,
    load_config,
)
from dpatia_daemon.frontdoor.routes import IAAPI
from dpatia_daemon.jobs import Callback, Job, JobKind, JobState
from dpatia_daemon.models import Result
from dpatia_daemon.pipeline.prepare import PipelineSettings
from dpatia_daemon.simulator.fake import BASE_PATH, FakeSPS, RecordedRequest
from dpatia_daemon.spool import DirectorySpool, MemorySpool
from dpatia_daemon.sps.client import AccessToken, SPSClient, SPSUnauthorized, make_http_client
from dpatia_daemon.sps.results import Status, frame_status
from dpatia_daemon.sps.tokens import (
    BAD_CREDENTIALS,
    CLIENT_ID_ENV,
    CLIENT_SECRET_ENV,
    NO_CREDENTIALS,
    CallbackSource,
    Credentials,
    CredentialTokens,
    JobCallback,
    TokenBook,
    callback_auth,
)
from dpatia_daemon.sps.writer import ResultWriter
from dpatia_daemon.workers.folders import WorkFolders
from dpatia_daemon.workers.run import JobRun
from dpatia_daemon.workers.supervisor import Supervisor, SupervisorEvent

APP = "dpatia"
SLIDE = "slide-1"
BASE = "http://sps.test" + BASE_PATH
SECRET = "s3cret-Client-Secret-xyzzy"
CREDS = Credentials("svc", SECRET)
TEST_ANALYSIS = "tests.analyses_for_tests:run"


# --- helpers ----------------------------------------------------------------------------


@attrs.define
class Mem:
    """A fake SPS in memory and an SPS client (with its authorizer) on one clock."""

    clock: Clock
    fake: FakeSPS
    agent: RequestTraversalAgent
    sps: SPSClient

    def call(self, token: str, slide: str = SLIDE) -> Deferred[Any]:
        d = ensureDeferred(self.sps.slide_info(Callback(BASE, token), slide))
        self.agent.flush()
        return d

    def bearers(self, since: int = 0) -> list[str]:
        """The Bearer token (or "POST token") of every request from ``since`` on."""
        return [_bearer(r) for r in self.fake.requests[since:]]


def _bearer(request: RecordedRequest) -> str:
    if request.path.endswith("/token"):
        return "POST token"
    return (request.header("authorization") or "").removeprefix("Bearer ")


def mem(
    credentials: Credentials | None = None,
    callbacks: CallbackSource | None = None,
    token_lifetime: float = 3600.0,
) -> Mem:
    clock = Clock()
    fake = FakeSPS(
        clock=clock, client_credentials={CREDS.client_id: SECRET}, token_lifetime=token_lifetime
    )
    fake.add_slide(SLIDE)
    agent = RequestTraversalAgent(fake.resource())
    plain = SPSClient(
        http=HTTPClient(agent), clock=clock, software_version="t", retries=0, random=lambda: 0.5
    )
    auth = callback_auth(plain.fetch_token, clock, APP, credentials, callbacks)
    return Mem(clock, fake, agent, attrs.evolve(plain, auth=auth))


def expired_token(fake: FakeSPS) -> str:
    """A token the fake accepted once and now refuses as expired."""
    token = fake.issue_token(lifetime=1.0)
    fake.clock.advance(2.0)  # type: ignore[attr-defined]
    return token


def make_job(token: str, slide: str = SLIDE, url: str = BASE, **fields: Any) -> Job:
    return Job(
        slide_id=slide,
        application_id=APP,
        kind=JobKind.NOTIFICATION,
        callback=Callback(url, token),
        created=0.0,
        **fields,
    )


def texts(events: Sequence[dict[str, Any]]) -> str:
    return "\n".join(formatEvent(e) + " " + repr(e) for e in events)


# --- the newest callback token ----------------------------------------------------------


def test_the_book_keeps_the_newest_callback_per_slide_bounded() -> None:
    """The newest callback of a slide wins over a job's older one, but not over a newer
    record (merged elsewhere); late older requests are ignored; listeners hear of new
    callbacks only; the book forgets the least recently recorded slides."""
    book = TokenBook(limit=2)
    heard: list[tuple[str, str, str]] = []
    unsubscribe = book.subscribe(lambda app, slide, cb: heard.append((app, slide, cb.token)))
    job = make_job("t1", updated=5.0)
    assert book.newest(job) == job.callback
    book.record(APP, SLIDE, Callback(BASE, "t2"), 10.0)
    assert book.newest(job).token == "t2"
    assert book.newest(attrs.evolve(job, updated=11.0)).token == "t1"
    book.record(APP, SLIDE, Callback(BASE, "t0"), 9.0)  # older, arrived late
    book.record(APP, SLIDE, Callback(BASE, "t2"), 12.0)  # the same callback again
    assert book.newest(job).token == "t2"
    assert heard == [(APP, SLIDE, "t2")]
    book.record(APP, "s2", Callback(BASE, "u"), 1.0)
    book.record(APP, "s3", Callback(BASE, "v"), 1.0)
    assert len(book) == 2
    assert book.newest(job).token == "t1"  # slide-1 was forgotten
    unsubscribe()
    book.record(APP, "s4", Callback(BASE, "w"), 1.0)
    assert len(heard) == 3


@attrs.define
class Front:
    """The front door in memory: IA-API requests in, jobs in a memory spool, writes to a
    fake SPS in memory, with one token book between them."""

    mem: Mem
    book: TokenBook
    spool: MemorySpool
    writer: ResultWriter
    stub: StubTreq

    def create(self, token: str) -> None:
        body = {
            "action": "create",
            "applicationId": APP,
            "slideId": SLIDE,
            "callbackInfo": {"url": BASE, "token": token},
            "cancellationToken": "ct",
            "context": {},
            "input": {"type": "wholeSlide"},
        }
        d = self.stub.post(  # type: ignore[attr-defined]  # built at runtime
            "http://dpatia.test/dpatia",
            data=json.dumps(body).encode(),
            headers={"Content-Type": ["application/json"]},
        )
        self.stub.flush()
        self.mem.agent.flush()
        assert success_result_of(d).code == 200


def front() -> Front:
    m = mem()
    book = TokenBook()
    spool = MemorySpool()
    spool.startService()
    writer = ResultWriter(sps=m.sps, clock=m.clock, display_name="dpatia", tokens=book)
    config = Config(sps=SPSConfig(allowed_callback_urls=(URLPrefix.parse("http://sps.test/"),)))
    api = IAAPI(config=config, spool=spool, sps=m.sps, clock=m.clock, writer=writer, tokens=book)
    return Front(m, book, spool, writer, StubTreq(api.resource()))


def test_a_queued_job_takes_the_token_of_the_newest_request() -> None:
    """Two requests for a queued slide: one job, carrying the second request's token."""
    f = front()
    t1, t2 = f.mem.fake.issue_token(), f.mem.fake.issue_token()
    f.create(t1)
    f.mem.clock.advance(1)
    f.create(t2)
    [job] = success_result_of(f.spool.queued())
    assert job.callback.token == t2
    assert f.book.newest(job).token == t2


def test_a_running_job_writes_its_result_with_the_token_of_a_newer_request(
    tmp_path: Path,
) -> None:
    """A job runs with token 1; the SPS revokes it; a new request for the slide brings
    token 2: the job's final result is still written, with token 2."""
    f = front()
    t1 = f.mem.fake.issue_token()
    f.create(t1)
    [queued] = success_result_of(f.spool.queued())
    claimed = success_result_of(f.spool.claim(queued.job_id))
    run = JobRun(
        job=claimed,
        spool=f.spool,
        writer=f.writer,
        folders=WorkFolders(FilePath(str(tmp_path / "work"))),
        clock=f.mem.clock,
        max_attempts=1,
    )
    run.prepare()
    run.begin()
    f.mem.agent.flush()
    assert run.stored is not None

    f.mem.fake.tokens.discard(t1)
    f.mem.clock.advance(60)
    t2 = f.mem.fake.issue_token()
    f.create(t2)  # queues behind the running job, and hands over its token

    done = ensureDeferred(run.complete(Result(slideId=SLIDE, displayResult="the answer")))
    f.mem.agent.flush()
    success_result_of(done)
    final = success_result_of(run.ended)
    assert final.state is JobState.DONE
    [result] = f.mem.fake.results_for(SLIDE, APP)
    assert result.displayResult == "the answer"
    assert frame_status(result) is Status.DONE
    put = [r for r in f.mem.fake.requests if r.method == "PUT"][-1]
    assert _bearer(put) == t2


def test_a_running_jobs_worker_uses_the_newer_token_the_daemon_sends(tmp_path: Path) -> None:
    """A newer token for a running job is new to its run (the dispatcher then sends it to
    the worker, NewCallback); the worker's SPS calls use it at once, not only after a
    401; callbacks of other jobs or for another SPS URL are left alone."""
    folders = WorkFolders(FilePath(str(tmp_path / "work")))
    callbacks = JobCallback()
    m = mem(callbacks=callbacks)
    t1 = m.fake.issue_token()
    job = make_job(t1)
    folder = folders.prepare(job)
    # job.json holds the token the worker starts with: private to the daemon's user.
    assert oct(os.stat(folder.child("job.json").path).st_mode & 0o777) == "0o600"
    callbacks.follow(job)
    success_result_of(m.call(t1))

    # The SPS revokes token 1; a request brings token 2; the daemon hands it over.
    m.fake.tokens.discard(t1)
    t2 = m.fake.issue_token()
    run = JobRun(job=job, spool=MemorySpool(), writer=None, folders=folders, clock=m.clock)  # type: ignore[arg-type]
    assert run.use_callback(Callback(BASE, t2))
    assert run.job.callback.token == t2
    assert not run.use_callback(Callback(BASE, t2))  # nothing new: nothing to send
    assert callbacks.update(job.job_id, Callback(BASE, t2))  # what NewCallback does
    assert not callbacks.update("f" * 32, Callback(BASE, "another-jobs-token"))

    seen = len(m.fake.requests)
    success_result_of(m.call(t1))
    assert m.bearers(seen) == [t2]

    other = m.fake.issue_token()
    assert callbacks.newest(Callback(BASE, other)).token == other
    assert callbacks.newest(Callback("http://elsewhere.test/x", t1)).token == t1
    callbacks.stop()
    assert callbacks.newest(Callback(BASE, t1)).token == t1


# --- client credentials -----------------------------------------------------------------


def test_an_expired_callback_token_is_replaced_by_a_client_credentials_token() -> None:
    """401 on the callback token → POST /token (Basic auth, applicationId) → the call is
    sent again with that token; later calls skip the rejected callback token."""
    m = mem(CREDS)
    t1 = expired_token(m.fake)
    info = success_result_of(m.call(t1))
    assert info["id"] == SLIDE
    [post] = [r for r in m.fake.requests if r.path.endswith("/token")]
    assert post.query["applicationId"] == [APP]
    assert (post.header("authorization") or "").startswith("Basic ")
    g1 = m.bearers()[-1]
    assert m.bearers() == [t1, "POST token", g1] and g1 in m.fake.tokens
    seen = len(m.fake.requests)
    success_result_of(m.call(t1))
    assert m.bearers(seen) == [g1]


def test_the_credentials_token_is_refreshed_before_it_expires() -> None:
    """Lifetime 100 s: the token is reused until 50 s before its end (min(60, 100/2)),
    then a new one is fetched before any call is refused."""
    m = mem(CREDS, token_lifetime=100.0)
    t1 = expired_token(m.fake)
    success_result_of(m.call(t1))
    g1 = m.bearers()[-1]
    m.clock.advance(49.0)
    seen = len(m.fake.requests)
    success_result_of(m.call(t1))
    assert m.bearers(seen) == [g1]
    m.clock.advance(2.0)  # 51 s after the fetch: inside the margin, still valid
    seen = len(m.fake.requests)
    success_result_of(m.call(t1))
    g2 = m.bearers()[-1]
    assert m.bearers(seen) == ["POST token", g2] and g2 != g1


def test_a_rejected_credentials_token_is_refreshed_exactly_once() -> None:
    """The SPS revokes our access token: one 401, one refresh, one retry, success."""
    m = mem(CREDS)
    t1 = expired_token(m.fake)
    success_result_of(m.call(t1))
    g1 = m.bearers()[-1]
    m.fake.tokens.discard(g1)
    seen = len(m.fake.requests)
    success_result_of(m.call(t1))
    g2 = m.bearers()[-1]
    assert m.bearers(seen) == [g1, "POST token", g2]

    # If the fresh token is refused too, the call fails (no loop of refreshes).
    m.fake.tokens.clear()
    m.fake.client_credentials.clear()
    seen = len(m.fake.requests)
    error = failure_result_of(m.call(t1), SPSUnauthorized).value
    assert m.bearers(seen) == [g2, "POST token"]
    assert BAD_CREDENTIALS in str(error)


def test_concurrent_calls_share_one_token_request() -> None:
    """Five calls in flight get 401 on an expired callback token: one POST /token."""
    m = mem(CREDS)
    t1 = expired_token(m.fake)
    m.fake.faults = attrs.evolve(m.fake.faults, latency=0.5)
    calls = [m.call(t1) for _ in range(5)]
    for _ in range(6):
        m.clock.advance(0.5)
        m.agent.flush()
    for d in calls:
        assert success_result_of(d)["id"] == SLIDE
    assert m.bearers().count("POST token") == 1
    assert m.bearers().count(t1) == 5


def test_a_token_request_is_shared_and_a_caller_giving_up_does_not_cancel_it() -> None:
    """Single flight at the provider: one fetch for many callers (first use and forced
    refresh alike); a refused token already replaced costs no new fetch."""
    fetched: list[Deferred[AccessToken]] = []

    def fetch(base: str, app: str, client_id: str, secret: str) -> Deferred[AccessToken]:
        assert (base, app, client_id, secret) == (BASE, APP, "svc", SECRET)
        fetched.append(Deferred())
        return fetched[-1]

    tokens = CredentialTokens(fetch=fetch, clock=Clock(), application_id=APP, credentials=CREDS)
    waiting = [ensureDeferred(tokens.token(BASE + "/")) for _ in range(4)]
    gave_up = waiting.pop()
    gave_up.cancel()
    failure_result_of(gave_up, CancelledError)
    assert len(fetched) == 1
    fetched[0].callback(AccessToken("g1", expires_in=300.0))
    assert [success_result_of(d) for d in waiting] == ["g1"] * 3

    refreshing = [ensureDeferred(tokens.refresh(BASE, "g1")) for _ in range(3)]
    assert len(fetched) == 2
    no_result(refreshing[0])
    fetched[1].callback(AccessToken("g2", expires_in=300.0))
    assert [success_result_of(d) for d in refreshing] == ["g2"] * 3
    assert success_result_of(ensureDeferred(tokens.refresh(BASE, "g1"))) == "g2"
    assert len(fetched) == 2
    assert tokens.issued("g1") and tokens.issued("g2") and not tokens.issued("t1")


# --- without credentials ----------------------------------------------------------------


def test_without_credentials_a_rejected_token_fails_with_a_clear_message() -> None:
    """No credentials: the 401 is final, and the error says what to configure."""
    m = mem()
    t1 = expired_token(m.fake)
    error = failure_result_of(m.call(t1), SPSUnauthorized).value
    assert isinstance(error, SPSUnauthorized)
    assert NO_CREDENTIALS in str(error)
    assert error.status == 401
    assert m.bearers() == [t1]
    assert t1 not in str(error) and t1 not in repr(error)


def test_the_failure_reaches_the_result_when_a_newer_token_can_write_it(
    tmp_path: Path,
) -> None:
    """The attempt failed on an expired token (no credentials); a newer request for the
    slide arrived meanwhile: the failure frame, with the message, is written with it,
    and the log says it too."""
    f = front()
    t1 = f.mem.fake.issue_token()
    f.create(t1)
    [queued] = success_result_of(f.spool.queued())
    claimed = success_result_of(f.spool.claim(queued.job_id))
    f.mem.fake.tokens.discard(t1)
    error = failure_result_of(f.mem.call(t1), SPSUnauthorized).value
    t2 = f.mem.fake.issue_token()
    f.mem.clock.advance(60)
    f.create(t2)
    run = JobRun(
        job=claimed,
        spool=f.spool,
        writer=f.writer,
        folders=WorkFolders(FilePath(str(tmp_path / "work"))),
        clock=f.mem.clock,
        max_attempts=1,
    )
    message = f"fetching the slide failed: {error}"
    with capturedLogs() as events:
        failing = ensureDeferred(run.fail(message))
        f.mem.agent.flush()
        success_result_of(failing)
    assert success_result_of(run.ended).state is JobState.FAILED
    [result] = f.mem.fake.results_for(SLIDE, APP)
    assert frame_status(result) is Status.FAILED
    assert NO_CREDENTIALS in str(result.displayProperties.get("Error"))
    assert NO_CREDENTIALS in texts(events)


# --- secrets ----------------------------------------------------------------------------


class SpawnRecorder(MemoryReactorClock):
    """A reactor whose spawnProcess records argv and environment (nothing runs)."""

    def __init__(self) -> None:
        super().__init__()
        self.spawns: list[tuple[list[str], dict[str, str]]] = []

    def spawnProcess(
        self, proto: Any, executable: Any, args: Any, env: Any = None, **kw: Any
    ) -> Any:
        self.spawns.append((list(args), dict(env or {})))
        raise OSError("not spawning in this test")


def test_workers_get_the_secret_in_their_environment_never_on_argv(tmp_path: Path) -> None:
    """The spawn argv carries no secret; the environment does (and only ours: a
    variable inherited from the daemon's own environment is dropped); no repr and no
    log line shows it."""
    reactor = SpawnRecorder()
    spool = MemorySpool()
    spool.startService()

    def supervisor(credentials: Credentials | None) -> Supervisor:
        return Supervisor(
            reactor=reactor,
            spool=spool,
            writer=None,  # type: ignore[arg-type]
            config=WorkersConfig(count=1, work_directory=FilePath(str(tmp_path / "w"))),
            analysis="demo",
            pipeline=PipelineSettings(application_id=APP),
            env={"PATH": "/bin", CLIENT_SECRET_ENV: "inherited-secret"},
            credentials=credentials,
        )

    with capturedLogs() as events:
        with_creds = supervisor(CREDS)
        with_creds.startService()
        with_creds.stopService()
        without = supervisor(None)
        without.startService()
        without.stopService()
    (argv, env), (argv2, env2) = reactor.spawns[0], reactor.spawns[1]
    assert not any(SECRET in arg or "svc" == arg for arg in argv + argv2)
    assert env[CLIENT_ID_ENV] == "svc" and env[CLIENT_SECRET_ENV] == SECRET
    assert CLIENT_ID_ENV not in env2 and CLIENT_SECRET_ENV not in env2
    assert SECRET not in repr(with_creds) and SECRET not in repr(CREDS)
    assert SECRET not in texts(events)


def test_worker_takes_the_credentials_out_of_its_environment() -> None:
    """A worker reads the credentials once and removes them from its environment, so
    processes its analysis starts do not inherit them."""
    environ = {"PATH": "/bin", **CREDS.to_environ()}
    assert Credentials.take_from_environ(environ) == CREDS
    assert environ == {"PATH": "/bin"}
    assert Credentials.take_from_environ(environ) is None


def test_no_secret_or_token_in_the_log_of_a_credentials_flow() -> None:
    """Fetching, refreshing and refusing tokens logs neither the secret, the Basic
    header, nor any token."""
    with capturedLogs() as events:
        m = mem(CREDS, token_lifetime=100.0)
        t1 = expired_token(m.fake)
        success_result_of(m.call(t1))
        m.fake.tokens.discard(m.bearers()[-1])
        success_result_of(m.call(t1))
        m.fake.client_credentials[CREDS.client_id] = "changed"
        m.clock.advance(100)
        failure_result_of(m.call(t1), SPSUnauthorized)
    logged = texts(events)
    assert "obtained an access token" in logged
    secrets = [SECRET, t1, *(t for t in m.bearers() if t != "POST token")]
    for secret in secrets:
        assert secret not in logged


def _config(tmp_path: Path, sps: dict[str, str], mode: int) -> str:
    path = write_config(tmp_path, {"sps": sps})
    os.chmod(path, mode)
    return path


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_config_refuses_a_client_secret_in_a_file_others_can_read(
    tmp_path: Path, mode: int
) -> None:
    """A client_secret in a group- or world-readable file: one line naming the file and
    the fix, and not the secret."""
    path = _config(tmp_path, {"client_id": "svc", "client_secret": SECRET}, mode)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: [sps] client_secret: ")
    assert f"chmod 600 {path}" in message
    assert SECRET not in message and "\n" not in message


def test_config_takes_client_credentials_from_a_private_file(tmp_path: Path) -> None:
    """Mode 0600: loaded; the secret never shows in the config's repr; both keys or
    neither; a world-readable file without a secret is fine."""
    config = load_config(_config(tmp_path, {"client_id": "svc", "client_secret": SECRET}, 0o600))
    assert (config.sps.client_id, config.sps.client_secret) == ("svc", SECRET)
    assert SECRET not in repr(config)
    with pytest.raises(ConfigError, match=r"\[sps\] client_secret: must be set too"):
        load_config(_config(tmp_path, {"client_id": "svc"}, 0o600))
    assert load_config(_config(tmp_path, {}, 0o644)).sps.client_secret is None


# --- with real workers ------------------------------------------------------------------


@attrs.define
class Rig:
    """A supervisor with real workers that fetch the slide, a directory spool and a
    fake SPS on loopback; the daemon-side client and the workers share one setup."""

    reactor: Any
    fake: FakeSPS
    url: str
    spool: DirectorySpool
    book: TokenBook
    writer: ResultWriter
    supervisor: Supervisor
    events: list[SupervisorEvent] = attrs.field(factory=list)
    waiters: list[tuple[str, str, Deferred[SupervisorEvent]]] = attrs.field(factory=list)

    @staticmethod
    def matches(event: SupervisorEvent, kind: str, job_id: str) -> bool:
        return (
            event.kind == kind
            and event.job_id == job_id
            and (kind != "job-ended" or event.detail.get("state") in ("done", "failed"))
        )

    def event(self, event: SupervisorEvent) -> None:
        self.events.append(event)
        for entry in list(self.waiters):
            if self.matches(event, entry[0], entry[1]):
                self.waiters.remove(entry)
                entry[2].callback(event)

    def wait(self, kind: str, job_id: str, timeout: float = 30.0) -> Deferred[SupervisorEvent]:
        """The first event of ``kind`` for ``job_id`` (a job's end: done or failed)."""
        for event in self.events:
            if self.matches(event, kind, job_id):
                return succeed(event)

        def forget(d: Deferred[SupervisorEvent]) -> None:
            if entry in self.waiters:
                self.waiters.remove(entry)

        def expired(result: object, timeout: float) -> NoReturn:
            raise AssertionError(f"no {kind} for {job_id}")

        d: Deferred[SupervisorEvent] = Deferred(forget)
        entry = (kind, job_id, d)
        self.waiters.append(entry)
        return d.addTimeout(timeout, self.reactor, onTimeoutCancel=expired)

    async def add(self, token: str, test: dict[str, Any]) -> Job:
        job = attrs.evolve(
            make_job(token, url=self.url, context={"test": test}), created=self.reactor.seconds()
        )
        return await self.spool.add(job)


async def _rig(reactor: Any, tmp_path: Path, credentials: Credentials | None) -> Any:
    fake = FakeSPS(clock=reactor, client_credentials={CREDS.client_id: SECRET})
    fake.add_slide(SLIDE, width=2000, height=1000)
    port = reactor.listenTCP(0, Site(fake.resource()), interface="127.0.0.1")
    url = f"http://127.0.0.1:{port.getHost().port}{BASE_PATH}"
    spool = DirectorySpool(directory=FilePath(str(tmp_path / "spool")), reactor=reactor)
    spool.startService()
    http = make_http_client(reactor)
    plain = SPSClient(
        http=http.client, clock=reactor, software_version=__version__, timeout=5.0, retries=1
    )
    sps = attrs.evolve(plain, auth=callback_auth(plain.fetch_token, reactor, APP, credentials))
    book = TokenBook()
    writer = ResultWriter(
        sps=sps, clock=reactor, display_name="dpatia", fresh_grace=0.3, tokens=book
    )
    supervisor = Supervisor(
        reactor=reactor,
        spool=spool,
        writer=writer,
        config=WorkersConfig(
            count=1,
            work_directory=FilePath(str(tmp_path / "work")),
            max_attempts=1,
            progress_interval=0.1,
            kill_grace=2.0,
        ),
        analysis=TEST_ANALYSIS,
        pipeline=PipelineSettings(
            download_wsi=False, sps_timeout=5.0, sps_retries=1, application_id=APP
        ),
        tokens=book,
        credentials=credentials,
        restart_initial=0.1,
    )
    rig = Rig(reactor, fake, url, spool, book, writer, supervisor)
    supervisor.observe(rig.event)
    supervisor.startService()
    return rig, (supervisor, spool, http, port)


async def _teardown(parts: Any) -> None:
    supervisor, spool, http, port = parts
    await supervisor.stopService()
    await spool.stopService()
    await http.close()
    await port.stopListening()


@pytest_twisted.async_yield_fixture
async def rig_with_credentials(reactor: Any, tmp_path: Path) -> Any:
    rig, parts = await _rig(reactor, tmp_path, CREDS)
    yield rig
    await _teardown(parts)


@pytest_twisted.async_yield_fixture
async def rig_without_credentials(reactor: Any, tmp_path: Path) -> Any:
    rig, parts = await _rig(reactor, tmp_path, None)
    yield rig
    await _teardown(parts)


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_a_job_whose_token_expired_completes_with_client_credentials(
    rig_with_credentials: Rig,
) -> None:
    """Worker and daemon each get a 401 on the expired callback token, obtain one token
    with client credentials (passed to the worker in its environment), and the job
    ends DONE with its result."""
    rig = rig_with_credentials
    t1 = expired_token_now(rig.fake)
    with capturedLogs() as events:
        job = await rig.add(t1, {})
        ended = await rig.wait("job-ended", job.job_id)
    assert ended.detail["state"] == "done", await rig.spool.get(job.job_id)
    [result] = rig.fake.results_for(SLIDE, APP)
    assert result.displayResult == "test answer"
    bearers = [_bearer(r) for r in rig.fake.requests]
    assert bearers.count("POST token") == 2  # one per process
    assert bearers.count(t1) == 2  # then remembered as rejected
    assert SECRET not in texts(events)


def expired_token_now(fake: FakeSPS) -> str:
    """A token that expired just now (the fake's clock is the reactor here)."""
    return fake.issue_token(lifetime=0.0)


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_a_running_job_switches_to_the_token_of_a_newer_request(
    rig_without_credentials: Rig,
) -> None:
    """Mid-analysis, the SPS revokes token 1 and a request brings token 2: the worker is
    sent it (NewCallback) while the job runs, and the daemon's writes (progress, result)
    use token 2."""
    rig = rig_without_credentials
    t1 = rig.fake.issue_token()
    job = await rig.add(t1, {"seconds": 1.0, "progress_every": 0.05})
    await rig.wait("job-progress", job.job_id)
    rig.fake.tokens.discard(t1)
    t2 = rig.fake.issue_token()
    rig.book.record(APP, SLIDE, Callback(rig.url, t2), rig.reactor.seconds())
    handed = await rig.wait("job-callback", job.job_id)
    assert handed.detail["running"] is True
    ended = await rig.wait("job-ended", job.job_id)
    assert ended.detail["state"] == "done"
    [result] = rig.fake.results_for(SLIDE, APP)
    assert frame_status(result) is Status.DONE
    last_put = [r for r in rig.fake.requests if r.method == "PUT"][-1]
    assert _bearer(last_put) == t2


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_without_credentials_an_expired_token_fails_the_attempt_saying_why(
    rig_without_credentials: Rig,
) -> None:
    """No credentials, token expired, no newer one: the worker's attempt fails at the
    metadata step and the job's error (and the daemon log) carry the clear message."""
    rig = rig_without_credentials
    t1 = expired_token_now(rig.fake)
    with capturedLogs() as logged:
        job = await rig.add(t1, {})
        ended = await rig.wait("job-ended", job.job_id)
    assert ended.detail["state"] == "failed"
    final = await rig.spool.get(job.job_id)
    assert final is not None and NO_CREDENTIALS in (final.last_error or "")
    assert NO_CREDENTIALS in texts(logged)
    assert "POST token" not in [_bearer(r) for r in rig.fake.requests]
