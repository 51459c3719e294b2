"""The IA-API front door, in process: real HTTP on loopback (body limits, headers and
status codes are the HTTP server's business), a real directory spool, a fake SPS."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
import treq
from twisted.internet.defer import ensureDeferred
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.server import Site

from dpatia_daemon import __version__
from dpatia_daemon.config import AccessLog, Config, SPSConfig, URLPrefix
from dpatia_daemon.frontdoor.routes import IAAPI
from dpatia_daemon.frontdoor.site import IASite, make_site
from dpatia_daemon.jobs import JobKind, JobState
from dpatia_daemon.simulator.fake import FakeSPS
from dpatia_daemon.spool import DirectorySpool
from dpatia_daemon.sps.client import SPSClient, make_http_client
from dpatia_daemon.sps.writer import ResultWriter

APP = "dpatia"
BASE = "/SectraPathologyServer/external/imageanalysis/v1"


@attrs.define
class Stack:
    """A running API with its spool and fake SPS, and a client to call it."""

    url: str
    callback: str
    token: str
    fake: FakeSPS
    spool: DirectorySpool
    spool_dir: Path
    api: IAAPI
    client: Any

    async def post(
        self, path: str, body: Any, content_type: str = "application/json"
    ) -> tuple[int, Any, Any]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        response = await self.client.post(
            self.url + path, data, headers={"Content-Type": [content_type]}
        )
        text = await response.content()
        return response.code, json.loads(text), response.headers

    async def get(self, path: str) -> tuple[int, Any, Any]:
        response = await self.client.get(self.url + path)
        return response.code, json.loads(await response.content()), response.headers

    def spool_files(self) -> list[Path]:
        return sorted(p for p in self.spool_dir.rglob("*.json") if p.is_file())

    def invocation(self, action: str = "create", **extra: Any) -> dict[str, Any]:
        body = {
            "action": action,
            "applicationId": APP,
            "slideId": "slide-1",
            "callbackInfo": {"url": self.callback, "token": self.token},
            "cancellationToken": "ct-1",
            "context": {},
            "input": {"type": "wholeSlide"},
        }
        body.update(extra)
        return body

    def notification(self, slide_id: str = "slide-1", **extra: Any) -> dict[str, Any]:
        body = {
            "action": "newImageFiles",
            "applicationId": APP,
            "slideId": slide_id,
            "callbackInfo": {"url": self.callback, "token": self.token},
            "cancellationToken": f"ct-{slide_id}",
            "context": {},
            "imageInfo": {"imageSize": {"width": 2000, "height": 1000}, "micronsPerPixel": 0.5},
        }
        body.update(extra)
        return body


@pytest.fixture
def stack(reactor: Any, tmp_path: Path) -> Any:
    fake = FakeSPS()
    for slide in ("slide-1", "slide-5", "slide-7", "slide-8", "slide-9"):
        fake.add_slide(slide)
    token = fake.issue_token()
    sps_port = reactor.listenTCP(0, Site(fake.resource()), interface="127.0.0.1")
    callback = f"http://127.0.0.1:{sps_port.getHost().port}{BASE}"
    config = attrs.evolve(
        Config(),
        server=attrs.evolve(Config().server, max_body_bytes=4096),
        sps=SPSConfig(
            allowed_callback_urls=(URLPrefix.parse("http://127.0.0.1:*/"),), timeout=5.0, retries=1
        ),
    )
    spool_dir = tmp_path / "spool"
    from twisted.python.filepath import FilePath

    spool = DirectorySpool(directory=FilePath(str(spool_dir)), reactor=reactor, owner="test")
    spool.startService()
    http = make_http_client(reactor)
    sps = SPSClient(
        http=http.client, clock=reactor, software_version=__version__, timeout=5.0, retries=1
    )
    writer = ResultWriter(sps=sps, clock=reactor, display_name=config.app.display_name)
    api = IAAPI(config=config, spool=spool, sps=sps, clock=reactor, writer=writer)
    api_port = reactor.listenTCP(0, make_site(api.resource(), config), interface="127.0.0.1")
    pool = HTTPConnectionPool(reactor, persistent=False)
    client = treq.client.HTTPClient(Agent(reactor, pool=pool))
    yield Stack(
        url=f"http://127.0.0.1:{api_port.getHost().port}",
        callback=callback,
        token=token,
        fake=fake,
        spool=spool,
        spool_dir=spool_dir,
        api=api,
        client=client,
    )

    async def teardown() -> None:
        await api.background.drain()
        await api_port.stopListening()
        await sps_port.stopListening()
        await http.close()
        await spool.stopService()

    pytest_twisted.blockon(ensureDeferred(teardown()))


# --- bad input: every case answers with a clear error and writes nothing ---------------

VALID = object()  # placeholder replaced by the stack's valid invocation


def _bad_cases() -> list[tuple[str, str, Any, str, int, str | None]]:
    """(id, path, body mutation, content type, expected status, expected field)."""
    return [
        ("not-json", "/dpatia", b"{not json", "application/json", 400, "$"),
        ("json-array", "/dpatia", b"[]", "application/json", 400, "$"),
        ("no-action", "/dpatia", {"drop": "action"}, "application/json", 400, "$.action"),
        (
            "unknown-action",
            "/dpatia",
            {"set": ("action", "explode")},
            "application/json",
            400,
            "$.action",
        ),
        (
            "slide-not-string",
            "/dpatia",
            {"set": ("slideId", 42)},
            "application/json",
            400,
            "$.slideId",
        ),
        ("empty-slide", "/dpatia", {"set": ("slideId", "")}, "application/json", 400, "$.slideId"),
        (
            "no-callback",
            "/dpatia",
            {"drop": "callbackInfo"},
            "application/json",
            400,
            "$.callbackInfo",
        ),
        (
            "no-token",
            "/dpatia",
            {"set": ("callbackInfo", {"url": "http://127.0.0.1:1/x"})},
            "application/json",
            400,
            "$.callbackInfo.token",
        ),
        (
            "context-not-object",
            "/dpatia",
            {"set": ("context", [1])},
            "application/json",
            400,
            "$.context",
        ),
        (
            "unknown-input-type",
            "/dpatia",
            {"set": ("input", {"type": "wholeBody"})},
            "application/json",
            400,
            "$.input",
        ),
        (
            "wrong-input-type",
            "/dpatia",
            {"set": ("input", {"type": "multiArea", "content": {"polygons": []}})},
            "application/json",
            400,
            "$.input.type",
        ),
        (
            "bad-polygon-point",
            "/dpatia",
            {
                "set": (
                    "input",
                    {
                        "type": "taggedPolygon",
                        "content": {"polygon": {"points": [{"x": "a", "y": 0}]}},
                    },
                )
            },
            "application/json",
            400,
            "$.input.content.polygon.points[0].x",
        ),
        (
            "wrong-app",
            "/dpatia",
            {"set": ("applicationId", "someone-else")},
            "application/json",
            400,
            "$.applicationId",
        ),
        (
            "modify-without-id",
            "/dpatia",
            {"set": ("action", "modify"), "set2": ("input", {"slideId": "slide-1"})},
            "application/json",
            400,
            "$.input.id",
        ),
        (
            "callback-not-allowed",
            "/dpatia",
            {
                "set": (
                    "callbackInfo",
                    {"url": "http://10.1.2.3/SectraPathologyServer", "token": "t"},
                )
            },
            "application/json",
            403,
            "$.callbackInfo.url",
        ),
        (
            "callback-https-not-allowed",
            "/dpatia",
            {"set": ("callbackInfo", {"url": "https://127.0.0.1/x", "token": "t"})},
            "application/json",
            403,
            "$.callbackInfo.url",
        ),
        (
            "too-large",
            "/dpatia",
            {"set": ("context", {"pad": "x" * 5000})},
            "application/json",
            413,
            None,
        ),
        ("form-encoded", "/dpatia", {}, "application/x-www-form-urlencoded", 415, "Content-Type"),
        ("text-plain", "/dpatia", {}, "text/plain", 415, "Content-Type"),
        ("notify-not-json", "/dpatia/imagenotification", b"nope", "application/json", 400, "$"),
        (
            "notify-no-slide",
            "/dpatia/imagenotification",
            {"notify": True, "drop": "slideId"},
            "application/json",
            400,
            "$.slideId",
        ),
        (
            "notify-bad-priority",
            "/dpatia/imagenotification",
            {"notify": True, "set": ("imageInfo", {"priority": "high"})},
            "application/json",
            400,
            "$.imageInfo.priority",
        ),
        (
            "notify-bad-callback",
            "/dpatia/imagenotification",
            {
                "notify": True,
                "set": ("callbackInfo", {"url": "http://169.254.169.254/", "token": "t"}),
            },
            "application/json",
            403,
            "$.callbackInfo.url",
        ),
        (
            "notify-polygon-input",
            "/dpatia/imagenotification",
            {"notify": True, "set": ("input", {"type": "multiArea"})},
            "application/json",
            400,
            "$.input",
        ),
    ]


@pytest.mark.parametrize(
    ("path", "mutation", "content_type", "status", "field"),
    [case[1:] for case in _bad_cases()],
    ids=[case[0] for case in _bad_cases()],
)
@pytest_twisted.ensureDeferred
async def test_bad_input_gets_a_clear_error_and_writes_nothing(
    stack: Stack, path: str, mutation: Any, content_type: str, status: int, field: str | None
) -> None:
    """Each malformed request: the expected status, a JSON error naming the field,
    the IA-API headers, no job in the spool and no call to the SPS."""
    if isinstance(mutation, bytes):
        body: Any = mutation
    else:
        body = stack.notification() if mutation.get("notify") else stack.invocation()
        if "drop" in mutation:
            del body[mutation["drop"]]
        for key in ("set", "set2"):
            if key in mutation:
                name, value = mutation[key]
                body[name] = value
    before = len(stack.fake.requests)
    code, answer, headers = await stack.post(path, body, content_type)
    assert code == status, answer
    assert set(answer) == {"error", "field"}
    assert isinstance(answer["error"], str) and answer["error"]
    assert answer["field"] == field
    assert headers.getRawHeaders("X-Sectra-ApiVersion") == ["1.5"]
    assert headers.getRawHeaders("X-Sectra-SoftwareVersion") == [__version__]
    assert headers.getRawHeaders("Content-Type") == ["application/json"]
    assert stack.spool_files() == []
    assert len(stack.fake.requests) == before


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("PUT", "/dpatia", 405),
        ("DELETE", "/dpatia", 405),
        ("GET", "/dpatia/imagenotification", 405),
        ("POST", "/dpatia/info", 405),
        ("GET", "/nothing", 404),
    ],
)
@pytest_twisted.ensureDeferred
async def test_wrong_method_or_path_is_json(
    stack: Stack, method: str, path: str, status: int
) -> None:
    """405 and 404 are JSON errors with the IA-API headers, like every other answer."""
    response = await stack.client.request(method, stack.url + path)
    body = json.loads(await response.content())
    assert response.code == status
    assert "error" in body
    assert response.headers.getRawHeaders("X-Sectra-ApiVersion") == ["1.5"]
    assert stack.spool_files() == []


# --- the happy paths ------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_root_registration_and_info(stack: Stack) -> None:
    """GET /, GET {route} and GET {route}/info describe the app."""
    code, root, _ = await stack.get("/")
    assert code == 200
    assert (
        root["service"] == "dpatia"
        and root["version"] == __version__
        and root["route"] == "/dpatia"
    )
    assert root["jobs"] == {"queued": 0, "running": 0, "done": 0, "failed": 0, "cancelled": 0}
    assert root["notifications"] == {"accepted": 0, "filtered": 0}
    code, registration, _ = await stack.get("/dpatia")
    assert code == 200
    host = stack.url.removeprefix("http://")
    assert registration == {
        "applicationId": APP,
        "displayName": "dpatia analysis",
        "manufacturer": "dpatia",
        "url": f"http://{host}/dpatia",
        "inputTemplate": {"type": "wholeSlide"},
        "context": {},
    }
    code, info, _ = await stack.get("/dpatia/info")
    assert (code, info) == (200, {"apiVersion": "1.5", "softwareVersion": __version__})


@pytest_twisted.ensureDeferred
async def test_registration_uses_public_url(reactor: Any, stack: Stack) -> None:
    """With [server] public_url set, registration reports it instead of the Host header."""
    stack.api.config = attrs.evolve(
        stack.api.config,
        server=attrs.evolve(stack.api.config.server, public_url="https://ia.hospital.example:5443"),
    )
    _, registration, _ = await stack.get("/dpatia")
    assert registration["url"] == "https://ia.hospital.example:5443/dpatia"


@pytest_twisted.ensureDeferred
async def test_create_spools_the_job_and_answers_the_stored_queued_result(stack: Stack) -> None:
    """create: one queued job on disk, one result stored at the SPS, and the answer is
    that stored result with id and versionId."""
    code, answer, _ = await stack.post("/dpatia", stack.invocation())
    assert code == 200, answer
    assert isinstance(answer["id"], int) and answer["versionId"]
    assert answer["displayProperties"]["Status"] == "Queued"
    stored = stack.fake.results_for("slide-1")
    assert [r.id for r in stored] == [answer["id"]]
    (job,) = await stack.spool.queued()
    assert job.kind is JobKind.CREATE and job.slide_id == "slide-1"
    await stack.api.notes_written()  # the result id is noted after the answer
    (job,) = await stack.spool.queued()
    assert job.result_id == answer["id"]
    # Every call to the SPS carried the token and the version header.
    for recorded in stack.fake.requests:
        assert recorded.headers["authorization"] == f"Bearer {stack.token}"
        assert recorded.headers["x-sectra-apiversion"] == "1.5"


@pytest_twisted.ensureDeferred
async def test_second_create_reuses_the_result_and_the_job(stack: Stack) -> None:
    """A second create for a queued slide updates the same job and the same result."""
    _, first, _ = await stack.post("/dpatia", stack.invocation())
    newer = stack.fake.issue_token()
    body = stack.invocation(callbackInfo={"url": stack.callback, "token": newer})
    _, second, _ = await stack.post("/dpatia", body)
    assert second["id"] == first["id"]
    assert second["versionId"] != first["versionId"]
    assert len(stack.fake.results_for("slide-1")) == 1
    (job,) = await stack.spool.queued()
    assert job.callback.token == newer


@pytest_twisted.ensureDeferred
async def test_notification_answers_at_once_and_stores_the_frame_afterwards(stack: Stack) -> None:
    """A notification is answered {} with the job queued; its frame follows."""
    code, answer, _ = await stack.post("/dpatia/imagenotification", stack.notification("slide-9"))
    assert (code, answer) == (200, {})
    (job,) = await stack.spool.queued()
    assert job.kind is JobKind.NOTIFICATION
    await stack.api.background.drain()
    await stack.api.notes_written()
    (result,) = stack.fake.results_for("slide-9")
    assert result.displayProperties["Status"] == "Queued"
    (job,) = await stack.spool.queued()
    assert job.result_id == result.id


@pytest_twisted.ensureDeferred
async def test_notification_is_acknowledged_when_the_sps_is_down(stack: Stack) -> None:
    """The SPS being unreachable does not stop a notification from being accepted."""
    stack.fake.fail_next.extend([503] * 10)
    code, answer, _ = await stack.post("/dpatia/imagenotification", stack.notification("slide-5"))
    assert (code, answer) == (200, {})
    await stack.api.background.drain()
    assert [j.slide_id for j in await stack.spool.queued()] == ["slide-5"]


@pytest_twisted.ensureDeferred
async def test_create_when_the_sps_fails_keeps_the_job_and_says_502(stack: Stack) -> None:
    """create with the SPS answering 500: 502 naming the SPS; the job stays queued."""
    stack.fake.fail_next.extend([500] * 10)
    code, answer, _ = await stack.post("/dpatia", stack.invocation())
    assert code == 502
    assert "Sectra Pathology Server" in answer["error"]
    assert stack.token not in json.dumps(answer)
    assert len(await stack.spool.queued()) == 1


@pytest_twisted.ensureDeferred
async def test_cancel_removes_the_queued_job_and_marks_the_result(stack: Stack) -> None:
    """cancel: the queued job is cancelled, the answer is [], the result says Cancelled."""
    _, created, _ = await stack.post("/dpatia", stack.invocation())
    code, answer, _ = await stack.post("/dpatia", stack.invocation("cancel", input=None))
    assert (code, answer) == (200, [])
    assert await stack.spool.queued() == []
    (job,) = await stack.spool.find(slide_id="slide-1", states=frozenset({JobState.CANCELLED}))
    await stack.api.background.drain()
    (result,) = stack.fake.results_for("slide-1")
    assert result.id == created["id"]
    assert result.displayProperties["Status"] == "Cancelled"


@pytest_twisted.ensureDeferred
async def test_delete_cancels_the_job_of_that_result(stack: Stack) -> None:
    """delete of a result: its queued job is cancelled; the answer is {}."""
    _, created, _ = await stack.post("/dpatia", stack.invocation())
    code, answer, _ = await stack.post("/dpatia", stack.invocation("delete", input=created))
    assert (code, answer) == (200, {})
    assert await stack.spool.queued() == []


@pytest_twisted.ensureDeferred
async def test_delete_of_a_running_job_requests_its_cancellation(stack: Stack) -> None:
    """delete while the job runs: a durable cancellation request for its holder."""
    _, created, _ = await stack.post("/dpatia", stack.invocation())
    await stack.api.notes_written()  # (a worker that claims it first notes it itself)
    (job,) = await stack.spool.queued()
    claimed = await stack.spool.claim(job.job_id)
    assert claimed is not None
    await stack.post("/dpatia", stack.invocation("delete", input=created))
    assert await stack.spool.cancel_requested(job.job_id)
    await stack.spool.release(job.job_id, count_attempt=False)


@pytest_twisted.ensureDeferred
async def test_a_running_jobs_cancellation_is_pushed_to_this_daemons_workers(
    stack: Stack,
) -> None:
    """With cancel_running set (workers in this daemon), a cancel of a running job is
    pushed at once, after the durable request; a queued job is cancelled in the spool
    and nothing is pushed."""
    pushed: list[tuple[str, str]] = []
    stack.api.cancel_running = lambda job_id, reason: pushed.append((job_id, reason))
    await stack.post("/dpatia", stack.invocation())
    (job,) = await stack.spool.queued()
    assert await stack.spool.claim(job.job_id) is not None
    await stack.post("/dpatia", stack.invocation("cancel"))
    assert await stack.spool.cancel_requested(job.job_id)
    assert pushed == [(job.job_id, "cancellation requested")]
    await stack.spool.release(job.job_id, count_attempt=False)

    await stack.post("/dpatia", stack.invocation(slideId="slide-5"))
    await stack.post("/dpatia", stack.invocation("cancel", slideId="slide-5"))
    assert len(pushed) == 1


@pytest_twisted.ensureDeferred
async def test_modify_stores_the_users_change(stack: Stack) -> None:
    """modify: the user's change is stored (with its versionId) and returned."""
    _, created, _ = await stack.post("/dpatia", stack.invocation())
    changed = dict(created, displayResult="corrected by Dr. X")
    code, answer, _ = await stack.post("/dpatia", stack.invocation("modify", input=changed))
    assert code == 200, answer
    assert answer["displayResult"] == "corrected by Dr. X"
    assert answer["versionId"] != created["versionId"]
    (stored,) = stack.fake.results_for("slide-1")
    assert stored.displayResult == "corrected by Dr. X"


@pytest_twisted.ensureDeferred
async def test_tokens_never_reach_the_log(stack: Stack) -> None:
    """Accepting, refusing and failing requests never logs the callback token."""
    from twisted.logger import globalLogPublisher

    seen: list[str] = []

    def observer(event: dict[str, Any]) -> None:
        from twisted.logger import formatEvent

        seen.append(formatEvent(event) + repr(event))

    globalLogPublisher.addObserver(observer)
    try:
        await stack.post("/dpatia", stack.invocation())
        await stack.post("/dpatia/imagenotification", stack.notification("slide-7"))
        await stack.post(
            "/dpatia",
            stack.invocation(callbackInfo={"url": "http://10.0.0.1/x", "token": stack.token}),
        )
        stack.fake.fail_next.extend([500] * 10)
        await stack.post("/dpatia", stack.invocation(slideId="slide-8"))
        await stack.api.background.drain()
    finally:
        globalLogPublisher.removeObserver(observer)
    assert seen, "expected some log events"
    assert not [line for line in seen if stack.token in line]


@pytest_twisted.ensureDeferred
async def test_filtered_notification_writes_nothing_and_is_counted(stack: Stack) -> None:
    """A notification the [notifications] rules refuse: {} at once, no job, no SPS call,
    and GET / counts it; one that matches is taken."""
    from dpatia_daemon.frontdoor.notifications import NotificationRules

    stack.api.config = attrs.evolve(
        stack.api.config, notifications=NotificationRules(stainings=("H&E",), max_mpp=0.6)
    )
    before = len(stack.fake.requests)
    pas = stack.notification(
        "slide-5", imageInfo={"staining": {"displayName": "PAS"}, "micronsPerPixel": 0.5}
    )
    code, answer, _ = await stack.post("/dpatia/imagenotification", pas)
    assert (code, answer) == (200, {})
    await stack.api.background.drain()
    assert stack.spool_files() == []
    assert len(stack.fake.requests) == before
    he = stack.notification(
        "slide-7", imageInfo={"staining": {"displayName": "h&e"}, "micronsPerPixel": 0.5}
    )
    code, answer, _ = await stack.post("/dpatia/imagenotification", he)
    assert (code, answer) == (200, {})
    assert [j.slide_id for j in await stack.spool.queued()] == ["slide-7"]
    _, root, _ = await stack.get("/")
    assert root["notifications"] == {"accepted": 1, "filtered": 1}


@pytest_twisted.ensureDeferred
async def test_disabled_notifications_are_all_ignored(stack: Stack) -> None:
    """[notifications] enabled = false: every notification is answered {} and dropped."""
    from dpatia_daemon.frontdoor.notifications import NotificationRules

    stack.api.config = attrs.evolve(
        stack.api.config, notifications=NotificationRules(enabled=False)
    )
    code, answer, _ = await stack.post("/dpatia/imagenotification", stack.notification("slide-9"))
    assert (code, answer) == (200, {})
    assert stack.spool_files() == []


@pytest_twisted.ensureDeferred
async def test_access_log_keeps_refusals_only_by_default(stack: Stack) -> None:
    """With the default ``access_log = errors`` a refused request gets its access-log
    line and an accepted one does not (its "job accepted" line says it all)."""
    from twisted.logger import formatEvent, globalLogPublisher

    seen: list[str] = []

    def observer(event: dict[str, Any]) -> None:
        seen.append(formatEvent(event))

    globalLogPublisher.addObserver(observer)
    try:
        code, _, _ = await stack.post("/dpatia/imagenotification", stack.notification("slide-5"))
        assert code == 200
        code, _, _ = await stack.post("/dpatia/imagenotification", b"{not json")
        assert code == 400
    finally:
        globalLogPublisher.removeObserver(observer)
    access = [line for line in seen if '"POST /dpatia/imagenotification HTTP/1.1"' in line]
    assert len(access) == 1 and '" 400 ' in access[0], access
    assert [line for line in seen if "accepted: image notification for slide slide-5" in line]


@pytest.mark.parametrize(
    ("setting", "code", "logged"),
    [
        (AccessLog.ALL, 200, True),
        (AccessLog.ALL, 404, True),
        (AccessLog.ERRORS, 200, False),
        (AccessLog.ERRORS, 302, False),
        (AccessLog.ERRORS, 400, True),
        (AccessLog.ERRORS, 502, True),
        (AccessLog.OFF, 200, False),
        (AccessLog.OFF, 500, False),
    ],
)
def test_access_log_setting_decides_which_answers_are_logged(
    monkeypatch: pytest.MonkeyPatch, setting: AccessLog, code: int, logged: bool
) -> None:
    from types import SimpleNamespace

    from twisted.web.resource import Resource

    written: list[int] = []
    monkeypatch.setattr(Site, "log", lambda self, request: written.append(request.code))
    site = IASite(Resource(), access_log=setting)
    site.log(SimpleNamespace(code=code))
    assert written == ([code] if logged else [])


# --- region apps: one job and one result per region -------------------------------------


def _region(x: float, kind: str = "taggedPolygon") -> dict[str, Any]:
    """A small square region at ``x`` (width-normalised), as the SPS sends one."""
    from dpatia_daemon.simulator.driver import rectangle_input

    return rectangle_input(kind, (x, 0.1, x + 0.1, 0.2), ["Tumour"])


def _region_app(stack: Stack) -> None:
    from dpatia_daemon.models import InputType

    stack.api.config = attrs.evolve(
        stack.api.config,
        app=attrs.evolve(
            stack.api.config.app, input_type=InputType.TAGGED_POLYGON, tags=("Tumour",)
        ),
    )


def _outline(result: Any) -> list[Any]:
    """The polygons a stored frame draws."""
    return [p for item in result.data.result.content for p in item["polygons"]]


@pytest_twisted.ensureDeferred
async def test_each_region_create_is_its_own_job_and_result(stack: Stack) -> None:
    """Two regions on one slide: two queued jobs, two stored results (each frame outlining
    its region); a create of the same region again merges into its job and result."""
    _region_app(stack)
    _, first, _ = await stack.post(
        "/dpatia", stack.invocation(input=_region(0.1), cancellationToken="ct-a")
    )
    code, second, _ = await stack.post(
        "/dpatia", stack.invocation(input=_region(0.5), cancellationToken="ct-b")
    )
    assert code == 200, second
    assert first["id"] != second["id"]
    await stack.api.notes_written()
    jobs = await stack.spool.queued()
    assert len(jobs) == 2 and {j.result_id for j in jobs} == {first["id"], second["id"]}
    by_id = {r.id: r for r in stack.fake.results_for("slide-1")}
    assert len(by_id) == 2
    assert _outline(by_id[first["id"]])[0]["points"][0] == {"x": 0.1, "y": 0.1}
    assert _outline(by_id[second["id"]])[0]["points"][0] == {"x": 0.5, "y": 0.1}
    # The region's frame needs no slide info (only the whole slide's does).
    assert not [r for r in stack.fake.requests if r.path.endswith("/info")]
    _, again, _ = await stack.post(
        "/dpatia", stack.invocation(input=_region(0.1), cancellationToken="ct-c")
    )
    assert again["id"] == first["id"]
    assert len(await stack.spool.queued()) == 2
    assert len(stack.fake.results_for("slide-1")) == 2


@pytest_twisted.ensureDeferred
async def test_a_region_app_takes_either_region_type_but_not_the_whole_slide(
    stack: Stack,
) -> None:
    """A taggedPolygon app also takes a multiArea create (the SPS admin may configure
    either); a wholeSlide create is refused with 400 naming $.input.type."""
    _region_app(stack)
    code, answer, _ = await stack.post("/dpatia", stack.invocation(input=_region(0.3, "multiArea")))
    assert code == 200, answer
    (job,) = await stack.spool.queued()
    assert job.input["type"] == "multiArea" and job.is_region
    code, answer, _ = await stack.post("/dpatia", stack.invocation(slideId="slide-5"))
    assert (code, answer["field"]) == (400, "$.input.type")
    assert [j.slide_id for j in await stack.spool.queued()] == ["slide-1"]


@pytest_twisted.ensureDeferred
async def test_a_cancel_stops_only_the_job_of_its_token(stack: Stack) -> None:
    """Two region jobs: a cancel with the first create's token cancels that job and marks
    its result Cancelled; the other job stays queued and its result Queued."""
    _region_app(stack)
    _, first, _ = await stack.post(
        "/dpatia", stack.invocation(input=_region(0.1), cancellationToken="ct-a")
    )
    _, second, _ = await stack.post(
        "/dpatia", stack.invocation(input=_region(0.5), cancellationToken="ct-b")
    )
    code, answer, _ = await stack.post(
        "/dpatia", stack.invocation("cancel", input=None, cancellationToken="ct-a")
    )
    assert (code, answer) == (200, [])
    await stack.api.background.drain()
    (left,) = await stack.spool.queued()
    assert left.result_id == second["id"]
    (cancelled,) = await stack.spool.find(states=frozenset({JobState.CANCELLED}))
    assert cancelled.result_id == first["id"]
    by_id = {r.id: r for r in stack.fake.results_for("slide-1")}
    assert by_id[first["id"]].displayProperties["Status"] == "Cancelled"
    assert by_id[second["id"]].displayProperties["Status"] == "Queued"


@pytest.mark.parametrize("token", ["ct-unknown", None], ids=["other-token", "no-token"])
@pytest_twisted.ensureDeferred
async def test_a_cancel_matching_nothing_cancels_nothing_and_says_so(
    stack: Stack, token: str | None
) -> None:
    """A cancel whose token matches no job (or that carries none) cancels nothing, not
    every job of the slide; it answers [] and the log says nothing matched."""
    from twisted.logger import capturedLogs, formatEvent

    _, created, _ = await stack.post("/dpatia", stack.invocation())
    body = stack.invocation("cancel", input=None, cancellationToken=token)
    with capturedLogs() as events:
        code, answer, _ = await stack.post("/dpatia", body)
    assert (code, answer) == (200, [])
    await stack.api.background.drain()
    await stack.api.notes_written()
    (job,) = await stack.spool.queued()
    assert job.result_id == created["id"]
    (result,) = stack.fake.results_for("slide-1")
    assert result.displayProperties["Status"] == "Queued"
    lines = [formatEvent(e) for e in events]
    assert [line for line in lines if "matched no queued or running job" in line], lines


@pytest_twisted.ensureDeferred
async def test_a_slide_with_foreign_results_stays_writable(stack: Stack) -> None:
    """Items in the slide's results list dpatia cannot read (string ids, nulls, other
    shapes) are skipped: a create still stores its frame and answers it, and the next
    create finds and reuses that result."""
    stack.fake.foreign_results["slide-1"] = [
        {"id": "99", "slideId": "slide-1", "versionId": "v"},
        {"id": 98, "slideId": None},
        {"id": 97, "slideId": "slide-1", "displayProperties": {"x": {"y": 1}}},
        "just a string",
    ]
    code, first, _ = await stack.post("/dpatia", stack.invocation())
    assert code == 200, first
    assert isinstance(first["id"], int)
    # End that job, so the next create is a new job that must find the result by listing.
    await stack.post("/dpatia", stack.invocation("cancel", input=None))
    await stack.api.background.drain()
    assert await stack.spool.queued() == []
    code, second, _ = await stack.post("/dpatia", stack.invocation(cancellationToken="ct-2"))
    assert code == 200, second
    assert second["id"] == first["id"]
    assert len(stack.fake.results_for("slide-1")) == 1
