"""Unit tests of :mod:`dpatia_daemon.sps.client`: endpoints, retries, deadlines, errors, TLS.

Everything runs in memory: a real ``Agent`` talks to a real ``Site`` through
``treq.testing.RequestTraversalAgent`` (the agent behind ``StubTreq``), and a
``task.Clock`` drives deadlines and backoff.  No sockets, no sleeps.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable
from email.utils import formatdate
from typing import Any

import attrs
import pytest
import pytest_twisted
import treq
from attrs import define, field
from conftest import failure_result_of, no_result, success_result_of
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from treq.client import HTTPClient
from treq.testing import RequestTraversalAgent
from twisted.internet import error as ierror
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred, fail
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import PrivateCertificate
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs, formatEvent
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test import iosim
from twisted.web.client import BrowserLikePolicyForHTTPS
from twisted.web.iweb import IAgent
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Site
from zope.interface import implementer

from dpatia_daemon.jobs import Callback
from dpatia_daemon.models import RawJSON, Result, ResultData, ResultPayload, dumps
from dpatia_daemon.simulator.fake import BASE_PATH, FakeSPS
from dpatia_daemon.sps.client import (
    AccessToken,
    SPSClient,
    SPSConflict,
    SPSError,
    SPSHttp,
    SPSNotFound,
    SPSProtocolError,
    SPSTimeout,
    SPSUnauthorized,
    SPSUnavailable,
    UnverifiedTLSPolicy,
    make_http_client,
)
from dpatia_daemon.sps.http import Answer, DeadlineExceeded, within_deadline
from dpatia_daemon.sps.skim import SKIM_BYTES

APP = "dpatia-test"
BASE = "http://sps.test" + BASE_PATH
SLIDE = "slide-1"


# --- fixtures and helpers ---------------------------------------------------------------


@implementer(IAgent)
@define
class FlakyAgent:
    """Fails the first ``failures`` requests with ``error`` before reaching ``agent``."""

    agent: Any
    failures: int = 0
    error: Callable[[], Exception] = ierror.ConnectionRefusedError
    calls: int = 0

    def request(self, method: bytes, uri: bytes, headers: Any = None, bodyProducer: Any = None):
        self.calls += 1
        if self.failures > 0:
            self.failures -= 1
            return fail(self.error())
        return self.agent.request(method, uri, headers, bodyProducer)


@define
class Env:
    """One client wired to one fake SPS in memory."""

    fake: FakeSPS
    agent: RequestTraversalAgent
    flaky: FlakyAgent
    clock: Clock
    client: SPSClient
    callback: Callback


def make_env(resource: IResource | None = None, fake: FakeSPS | None = None, **kwargs: Any) -> Env:
    fake = fake or FakeSPS()
    agent = RequestTraversalAgent(resource if resource is not None else fake.resource())
    flaky = FlakyAgent(agent)
    clock = Clock()
    kwargs.setdefault("random", lambda: 0.5)
    client = SPSClient(http=HTTPClient(flaky), clock=clock, software_version="9.8.7", **kwargs)
    token = fake.issue_token()
    return Env(fake, agent, flaky, clock, client, Callback(url=BASE, token=token))


@pytest.fixture
def env() -> Env:
    e = make_env()
    e.fake.add_slide(SLIDE, label=b"\xff\xd8label", files=[("slide.svs", b"WSI-BYTES")])
    return e


def run(coro: Any) -> Deferred[Any]:
    return ensureDeferred(coro)


@define
class Scripted(Resource):
    """A leaf resource answering a script of ``(status, headers, body)`` in order.

    ``body`` may be a callable of the request (to echo headers back); ``None`` as a
    script entry hangs the request.  The last entry repeats.
    """

    script: list[tuple[int, dict[str, str], Any] | None]
    seen: list[Any] = field(factory=list)
    isLeaf = True

    def __attrs_post_init__(self) -> None:
        Resource.__init__(self)

    def render(self, request: Any) -> Any:
        self.seen.append(request)
        entry = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if entry is None:
            return NOT_DONE_YET
        status, headers, body = entry
        request.setResponseCode(status)
        for k, v in headers.items():
            request.setHeader(k, v)
        return body(request) if callable(body) else body


def result_json(**overrides: Any) -> bytes:
    data = {"slideId": SLIDE, "displayResult": "x", "id": 7, "versionId": "v7"}
    data.update(overrides)
    return json.dumps(data).encode()


# --- headers and URLs -------------------------------------------------------------------


def _calls(e: Env) -> dict[str, Callable[[], Any]]:
    stored = e.fake.store_result(APP, Result(slideId=SLIDE))
    e.fake.add_slide("case-slide", accessionNumber="ACC-0001")
    e.fake.slides[SLIDE].tiles = {(10, 0, 0): b"tile"}
    cb = e.callback
    qc_version = e.fake.slides[SLIDE].info["qualityControl"]["versionId"]
    return {
        "info": lambda: e.client.get_info(cb),
        "slide_info": lambda: e.client.slide_info(cb, SLIDE),
        "label": lambda: e.client.label(cb, SLIDE),
        "tile": lambda: e.client.tile(cb, SLIDE, 10, 0, 0),
        "files": lambda: e.client.open_files(cb, SLIDE),
        "list_results": lambda: e.client.list_results(cb, APP, SLIDE),
        "get_result": lambda: e.client.get_result(cb, APP, stored.id or 0),
        "create_result": lambda: e.client.create_result(cb, APP, Result(slideId=SLIDE)),
        "update_result": lambda: e.client.update_result(cb, APP, stored),
        "qc": lambda: e.client.set_quality_control(
            cb, SLIDE, status="QualityOk", version_id=qc_version, application_version="1"
        ),
        "slide_request_images": lambda: e.client.slide_request_images(cb, SLIDE),
        "request_images": lambda: e.client.request_images(cb, "ACC-0001"),
    }


ENDPOINTS = [
    "info",
    "slide_info",
    "label",
    "tile",
    "files",
    "list_results",
    "get_result",
    "create_result",
    "update_result",
    "qc",
    "slide_request_images",
    "request_images",
]


@pytest.mark.parametrize("name", ENDPOINTS)
def test_every_endpoint_sends_bearer_and_version_headers(env: Env, name: str) -> None:
    """Each endpoint sends the Bearer token and both X-Sectra version headers."""
    success_result_of(run(_calls(env)[name]()))
    sent = env.fake.requests[-1]
    assert sent.header("Authorization") == f"Bearer {env.callback.token}"
    assert sent.header("X-Sectra-ApiVersion") == "1.5"
    assert sent.header("X-Sectra-SoftwareVersion") == "9.8.7"


@pytest.mark.parametrize("base", [BASE, BASE + "/"])
def test_base_url_with_or_without_trailing_slash(env: Env, base: str) -> None:
    """The callback URL joins paths correctly with and without a trailing slash."""
    cb = attrs.evolve(env.callback, url=base)
    success_result_of(run(env.client.slide_info(cb, SLIDE)))
    assert env.fake.requests[-1].path == BASE_PATH + f"/slides/{SLIDE}/info"


def test_ids_are_path_escaped(env: Env) -> None:
    """Slide and application ids are percent-escaped as single path segments."""
    env.fake.add_slide("a b+c")
    success_result_of(run(env.client.list_results(env.callback, "my app", "a b+c")))
    assert env.fake.requests[-1].path == (
        BASE_PATH + "/applications/my%20app/results/slide/a%20b%2Bc"
    )


# --- happy paths ------------------------------------------------------------------------


def test_get_info(env: Env) -> None:
    """get_info parses the SPS's version pair."""
    info = success_result_of(run(env.client.get_info(env.callback)))
    assert (info.apiVersion, info.softwareVersion) == ("1.10", "4.2.0.0")


def test_slide_info_defaults_to_extended_without_phi(env: Env) -> None:
    """slide_info asks for scope=extended and no PHI by default."""
    info = success_result_of(run(env.client.slide_info(env.callback, SLIDE)))
    assert env.fake.requests[-1].query == {"scope": ["extended"]}
    assert info["bodyPart"] == "COLON"
    assert "accessionNumber" not in info


def test_slide_info_with_phi(env: Env) -> None:
    """include_phi=True adds includePHI=true and the PHI fields come back."""
    info = success_result_of(run(env.client.slide_info(env.callback, SLIDE, include_phi=True)))
    assert env.fake.requests[-1].query["includePHI"] == ["true"]
    assert info["accessionNumber"] == "ACC-0001"


def test_slide_info_basic_scope(env: Env) -> None:
    """extended=False sends no scope parameter."""
    info = success_result_of(run(env.client.slide_info(env.callback, SLIDE, extended=False)))
    assert env.fake.requests[-1].query == {}
    assert "bodyPart" not in info


def test_label_bytes(env: Env) -> None:
    """label returns the image bytes."""
    assert success_result_of(run(env.client.label(env.callback, SLIDE))) == b"\xff\xd8label"


def test_label_204_is_none(env: Env) -> None:
    """A 204 from the label endpoint means no label: None."""
    env.fake.add_slide("nolabel")
    assert success_result_of(run(env.client.label(env.callback, "nolabel"))) is None


def test_tile_path(env: Env) -> None:
    """tile builds images/{id}_files/{level}/{col}_{row}.{ext}."""
    env.fake.slides[SLIDE].tiles = {(12, 3, 4): b"T"}
    assert success_result_of(run(env.client.tile(env.callback, SLIDE, 12, 3, 4))) == b"T"
    assert env.fake.requests[-1].path == BASE_PATH + f"/images/{SLIDE}_files/12/3_4.jpg"


def test_tile_focal_plane_and_optical_path(env: Env) -> None:
    """A focal plane adds a _{fp} suffix; an optical path becomes ?opticalPath=."""
    env.fake.slides[SLIDE].tiles = lambda level, col, row: b"P"
    d = run(
        env.client.tile(env.callback, SLIDE, 1, 0, 2, ext="png", focal_plane=0, optical_path="fl 1")
    )
    assert success_result_of(d) == b"P"
    sent = env.fake.requests[-1]
    assert sent.path == BASE_PATH + f"/images/{SLIDE}_files/1/0_2_0.png"
    assert sent.query == {"opticalPath": ["fl 1"]}


def test_open_files_returns_streamable_response(env: Env) -> None:
    """open_files answers after the headers; the caller streams the body."""
    response = success_result_of(run(env.client.open_files(env.callback, SLIDE)))
    assert response.code == 200
    assert response.headers.getRawHeaders(b"content-disposition") == [
        b'attachment; filename="slide.svs"'
    ]
    chunks: list[bytes] = []
    success_result_of(treq.collect(response, chunks.append))
    assert b"".join(chunks) == b"WSI-BYTES"


def test_list_results_oldest_first(env: Env) -> None:
    """list_results returns this app's results on the slide, parsed, oldest first."""
    first = env.fake.store_result(APP, Result(slideId=SLIDE, displayResult="one"))
    second = env.fake.store_result(APP, Result(slideId=SLIDE, displayResult="two"))
    env.fake.store_result("other-app", Result(slideId=SLIDE))
    results = success_result_of(run(env.client.list_results(env.callback, APP, SLIDE)))
    assert results == [first, second]


def test_get_result(env: Env) -> None:
    """get_result returns the stored result with id and versionId."""
    stored = env.fake.store_result(APP, Result(slideId=SLIDE, displayResult="r"))
    got = success_result_of(run(env.client.get_result(env.callback, APP, stored.id)))
    assert got == stored


def test_create_result(env: Env) -> None:
    """create_result POSTs JSON without ids and returns the stored result (201)."""
    created = success_result_of(
        run(env.client.create_result(env.callback, APP, Result(slideId=SLIDE, displayResult="q")))
    )
    assert created.id is not None and created.versionId is not None
    assert env.fake.results_for(SLIDE, APP) == [created]
    sent = env.fake.requests[-1]
    assert sent.header("Content-Type") == "application/json"
    assert "id" not in json.loads(sent.body)


def test_create_result_accepts_200() -> None:
    """An old SPS answering 200 instead of 201 is fine."""
    e = make_env(Scripted([(200, {}, result_json())]))
    created = success_result_of(run(e.client.create_result(e.callback, APP, Result(slideId=SLIDE))))
    assert created.id == 7


def test_update_result(env: Env) -> None:
    """update_result PUTs the full result with its versionId and returns the new version."""
    stored = env.fake.store_result(APP, Result(slideId=SLIDE, displayResult="old"))
    updated = success_result_of(
        run(env.client.update_result(env.callback, APP, attrs.evolve(stored, displayResult="new")))
    )
    assert updated.displayResult == "new"
    assert updated.versionId != stored.versionId
    assert json.loads(env.fake.requests[-1].body)["versionId"] == stored.versionId


def test_update_result_sends_raw_content_as_it_is(env: Env) -> None:
    """A result whose content is RawJSON (a worker's serialised shapes) is PUT with that
    text spliced in unchanged, and the SPS stores the content it says."""
    stored = env.fake.store_result(APP, Result(slideId=SLIDE, displayResult="old"))
    text = '[{"polygons": [{"points": [{"x": 0.1, "y": 0.2}]}], "labels": ["\\"q\\""]}]'
    new = attrs.evolve(
        stored,
        displayResult="new",
        data=ResultData(context={}, result=ResultPayload(type="primitive", content=RawJSON(text))),
    )
    updated = success_result_of(run(env.client.update_result(env.callback, APP, new)))
    assert text.encode() in env.fake.requests[-1].body
    assert updated.data.result is not None
    assert updated.data.result.content == json.loads(text)


def test_a_large_stored_result_comes_back_with_its_content_as_text(env: Env) -> None:
    """The SPS echoes a stored result whole: above SKIM_BYTES the daemon keeps the echo's
    content as text (RawJSON) instead of building MiB of objects from it, in the PUT's
    answer, a GET's and a listing's alike; everything else is parsed."""
    shapes = [{"polygons": [{"points": [{"x": i / 7, "y": 0.5}] * 5} for i in range(25_000)]}]
    text = json.dumps(shapes)
    assert len(text) > SKIM_BYTES
    stored = env.fake.store_result(APP, Result(slideId=SLIDE, displayResult="old"))
    new = attrs.evolve(
        stored,
        displayResult="new",
        data=ResultData(
            context={"k": 1}, result=ResultPayload(type="primitive", content=RawJSON(text))
        ),
    )
    updated = success_result_of(run(env.client.update_result(env.callback, APP, new)))
    got = success_result_of(run(env.client.get_result(env.callback, APP, stored.id)))
    listed = success_result_of(run(env.client.list_results(env.callback, APP, SLIDE)))
    for result in (updated, got, *listed):
        assert result.displayResult == "new" and result.data.context == {"k": 1}
        assert result.versionId == env.fake.results[stored.id].versionId != stored.versionId
        assert result.data.result is not None and isinstance(result.data.result.content, RawJSON)
        assert json.loads(result.data.result.content.text) == shapes


def test_dumps_splices_raw_json_and_nothing_that_looks_like_it() -> None:
    """dumps puts each RawJSON's text where it stands; a string of the value that has
    the placeholder's shape stays a string; other objects are still refused."""
    raw = RawJSON('{"a": [1, 2]}')
    value = {"s": ":0", "x": [raw, "0:0"], "y": RawJSON("[]")}
    assert json.loads(dumps(value)) == {"s": ":0", "x": [{"a": [1, 2]}, "0:0"], "y": []}
    assert dumps({"plain": 1.5}) == json.dumps({"plain": 1.5}).encode()
    with pytest.raises(TypeError):
        dumps({"x": object()})


def test_set_quality_control(env: Env) -> None:
    """set_quality_control PUTs applicationVersion and qualityControl{status, versionId}."""
    version = env.fake.slides[SLIDE].info["qualityControl"]["versionId"]
    d = run(
        env.client.set_quality_control(
            env.callback, SLIDE, status="Rejected", version_id=version, application_version="2.0"
        )
    )
    assert success_result_of(d) is None
    assert json.loads(env.fake.requests[-1].body) == {
        "applicationVersion": "2.0",
        "qualityControl": {"status": "Rejected", "versionId": version},
    }
    assert env.fake.slides[SLIDE].info["qualityControl"]["status"] == "Rejected"


def test_set_quality_control_rejects_unknown_status(env: Env) -> None:
    """An unknown QC status is a programming error, caught before any request."""
    with pytest.raises(ValueError):
        success_result_of(
            run(
                env.client.set_quality_control(
                    env.callback, SLIDE, status="Good", version_id=None, application_version="1"
                )
            )
        )
    assert env.fake.requests == []


def test_slide_request_images(env: Env) -> None:
    """slide_request_images lists the slides of the same case."""
    env.fake.add_slide("sibling", accessionNumber="ACC-0001")
    images = success_result_of(
        run(env.client.slide_request_images(env.callback, SLIDE, include_phi=True))
    )
    assert [i["id"] for i in images] == [SLIDE, "sibling"]
    assert env.fake.requests[-1].query == {"includePHI": ["true"]}


def test_request_images_sends_issuer_as_accessionNumberIssuer(env: Env) -> None:
    """request_images names the issuer parameter accessionNumberIssuer."""
    images = success_result_of(
        run(env.client.request_images(env.callback, "ACC-0001", issuer="LIS"))
    )
    assert [i["id"] for i in images] == [SLIDE]
    assert env.fake.requests[-1].query == {"accessionNumberIssuer": ["LIS"]}


def test_fetch_token(env: Env) -> None:
    """fetch_token POSTs client credentials with Basic auth and returns a usable token."""
    env.fake.client_credentials["svc"] = "s3cret"
    token = success_result_of(run(env.client.fetch_token(BASE, APP, "svc", "s3cret")))
    assert isinstance(token, AccessToken)
    assert token.token_type == "Bearer" and token.expires_in == 3600.0
    assert token.access_token in env.fake.tokens
    sent = env.fake.requests[-1]
    assert sent.query == {"applicationId": [APP]}
    assert sent.body == b"grant_type=client_credentials"
    assert sent.header("Authorization").startswith("Basic ")


def test_access_token_repr_redacts() -> None:
    """The repr of an AccessToken does not show the token."""
    assert "tok-123" not in repr(AccessToken("tok-123", "Bearer", 60.0))


# --- retries ----------------------------------------------------------------------------


def test_retry_on_503_after_jittered_backoff(env: Env) -> None:
    """A 503 is retried after min(cap, base * 2**0) * random() = 0.25 s."""
    env.fake.fail_next = [503]
    d = run(env.client.slide_info(env.callback, SLIDE))
    env.clock.advance(0.249)
    no_result(d)
    env.clock.advance(0.001)
    assert success_result_of(d)["id"] == SLIDE
    assert len(env.fake.requests) == 2


def test_backoff_doubles_per_attempt(env: Env) -> None:
    """Successive delays double: 0.25, 0.5, 1.0 (random() = 0.5)."""
    env.fake.fail_next = [502, 500, 504]
    d = run(env.client.get_info(env.callback))
    for delay in (0.25, 0.5, 1.0):
        count = len(env.fake.requests)
        env.clock.advance(delay - 0.001)
        assert len(env.fake.requests) == count
        env.clock.advance(0.001)
    success_result_of(d)
    assert len(env.fake.requests) == 4


def test_backoff_is_capped() -> None:
    """The exponential part never exceeds backoff_cap."""
    e = make_env(backoff_base=10.0, backoff_cap=4.0)
    e.fake.fail_next = [503]
    d = run(e.client.get_info(e.callback))
    e.clock.advance(1.999)
    no_result(d)
    e.clock.advance(0.001)
    success_result_of(d)


def test_retry_after_honoured_on_429(env: Env) -> None:
    """A 429 with Retry-After: 7 waits 7 s, not the jittered backoff."""
    env.fake.fail_next = [429]
    env.fake.retry_after = "7"
    d = run(env.client.get_info(env.callback))
    env.clock.advance(6.9)
    no_result(d)
    env.clock.advance(0.1)
    success_result_of(d)


def test_retry_after_is_capped(env: Env) -> None:
    """A huge Retry-After is capped at backoff_cap."""
    env.fake.fail_next = [503]
    env.fake.retry_after = "3600"
    d = run(env.client.get_info(env.callback))
    env.clock.advance(30.0)
    success_result_of(d)


def test_retry_after_http_date() -> None:
    """The HTTP-date form of Retry-After is measured against the clock."""
    e = make_env(
        Scripted(
            [
                (429, {"Retry-After": formatdate(1005, usegmt=True)}, b""),
                (200, {}, b'{"apiVersion": "1", "softwareVersion": "2"}'),
            ]
        )
    )
    e.clock.advance(1000)
    d = run(e.client.get_info(e.callback))
    e.clock.advance(4.9)
    no_result(d)
    e.clock.advance(0.1)
    success_result_of(d)


@pytest.mark.parametrize(
    ("status", "error"), [(400, SPSError), (404, SPSNotFound), (422, SPSError)]
)
def test_no_retry_on_client_errors(env: Env, status: int, error: type[SPSError]) -> None:
    """4xx answers other than 429 are not retried."""
    env.fake.fail_next = [status]
    f = failure_result_of(run(env.client.slide_info(env.callback, SLIDE)), error)
    assert f.value.status == status
    assert len(env.fake.requests) == 1


def test_unknown_token_is_unauthorized(env: Env) -> None:
    """A 401 raises SPSUnauthorized without retrying."""
    cb = Callback(url=BASE, token="not-a-token")
    f = failure_result_of(run(env.client.get_info(cb)), SPSUnauthorized)
    assert f.value.status == 401
    assert len(env.fake.requests) == 1


def test_forbidden_is_unauthorized() -> None:
    """A 403 raises SPSUnauthorized too."""
    e = make_env(Scripted([(403, {}, b"{}")]))
    failure_result_of(run(e.client.get_info(e.callback)), SPSUnauthorized)


def test_retries_exhausted_raise_unavailable(env: Env) -> None:
    """After 1 + retries attempts of 503, SPSUnavailable carries status, endpoint, excerpt."""
    env.fake.fail_next = [503] * 5
    d = run(env.client.slide_info(env.callback, SLIDE, include_phi=True))
    env.clock.pump([30.0] * 5)
    f = failure_result_of(d, SPSUnavailable)
    assert f.value.status == 503
    assert f.value.endpoint == "GET slides/{id}/info"
    assert "injected failure" in f.value.body_excerpt
    assert len(env.fake.requests) == 5
    assert "includePHI" not in str(f.value)


def test_connection_refused_is_retried(env: Env) -> None:
    """A refused connection is retried with backoff, then succeeds."""
    env.flaky.failures = 2
    d = run(env.client.get_info(env.callback))
    env.clock.advance(0.25)
    no_result(d)
    env.clock.advance(0.5)
    success_result_of(d)
    assert env.flaky.calls == 3


def test_connection_errors_exhausted(env: Env) -> None:
    """Connection errors on every attempt end in SPSUnavailable without a status."""
    env.flaky.failures = 99
    env.flaky.error = lambda: ierror.DNSLookupError("sps.test")
    d = run(env.client.get_info(env.callback))
    env.clock.pump([30.0] * 5)
    f = failure_result_of(d, SPSUnavailable)
    assert f.value.status is None
    assert "DNSLookupError" in str(f.value)
    assert env.flaky.calls == 5


def test_hung_request_is_cancelled_at_deadline_and_retried(env: Env) -> None:
    """A request that never answers is cancelled at `timeout` and retried."""
    env.fake.hang_next = 1
    d = run(env.client.get_info(env.callback))
    env.clock.advance(29.9)
    no_result(d)
    env.clock.advance(0.1)  # the deadline
    no_result(d)
    env.clock.advance(0.25)  # the backoff
    success_result_of(d)
    assert len(env.fake.requests) == 2


def test_deadline_covers_the_body() -> None:
    """A body that stops arriving is cut at the deadline and the call retried."""

    def partial(request: Any) -> Any:
        request.setHeader(b"content-length", b"100")
        request.write(b'{"apiVersion"')
        return NOT_DONE_YET

    e = make_env(
        Scripted([(200, {}, partial), (200, {}, b'{"apiVersion": "1", "softwareVersion": "2"}')])
    )
    d = run(e.client.get_info(e.callback))
    e.agent.flush()
    no_result(d)
    e.clock.advance(30.0)
    e.clock.advance(0.25)
    e.agent.flush()
    assert success_result_of(d).apiVersion == "1"


def test_deadline_exhausted_raises_timeout(env: Env) -> None:
    """Deadlines on every attempt end in SPSTimeout (an SPSUnavailable)."""
    env.fake.hang_next = 5
    d = run(env.client.get_info(env.callback))
    env.clock.pump([30.0] * 10)
    f = failure_result_of(d, SPSTimeout)
    assert isinstance(f.value, SPSUnavailable)
    assert len(env.fake.requests) == 5


def test_create_result_not_retried_after_read_timeout(env: Env) -> None:
    """A POST that got no answer may have been stored: it is not repeated."""
    env.fake.hang_next = 1
    d = run(env.client.create_result(env.callback, APP, Result(slideId=SLIDE)))
    env.clock.pump([30.0] * 5)
    failure_result_of(d, SPSTimeout)
    assert len(env.fake.requests) == 1


def test_create_result_retried_after_connection_refused(env: Env) -> None:
    """A refused POST surely was not received: it is retried, storing one result."""
    env.flaky.failures = 1
    d = run(env.client.create_result(env.callback, APP, Result(slideId=SLIDE)))
    env.clock.advance(0.25)
    success_result_of(d)
    assert len(env.fake.results_for(SLIDE)) == 1


def test_create_result_retried_on_503(env: Env) -> None:
    """A 503 to a POST is retried (the SPS says it did not process it)."""
    env.fake.fail_next = [503]
    d = run(env.client.create_result(env.callback, APP, Result(slideId=SLIDE)))
    env.clock.advance(0.25)
    success_result_of(d)
    assert len(env.fake.results_for(SLIDE)) == 1


def test_create_result_not_retried_on_500(env: Env) -> None:
    """A 500 to a POST is not retried: the result may have been stored."""
    env.fake.fail_next = [500]
    f = failure_result_of(run(env.client.create_result(env.callback, APP, Result(slideId=SLIDE))))
    assert f.check(SPSUnavailable) and f.value.status == 500
    assert len(env.fake.requests) == 1


def test_tls_failure_is_not_retried() -> None:
    """A TLS handshake failure is reported at once: retrying cannot fix a certificate."""
    from OpenSSL import SSL
    from twisted.python.failure import Failure
    from twisted.web._newclient import ResponseNeverReceived

    e = make_env()
    e.flaky.failures = 5
    e.flaky.error = lambda: ResponseNeverReceived([Failure(SSL.Error("certificate verify failed"))])
    f = failure_result_of(run(e.client.get_info(e.callback)), SPSUnavailable)
    assert "TLS" in str(f.value)
    assert e.flaky.calls == 1


def test_cancel_during_backoff_stops_the_call(env: Env) -> None:
    """Cancelling the call while it waits to retry ends it; nothing more is sent."""
    env.fake.fail_next = [503] * 5
    d = run(env.client.get_info(env.callback))
    d.cancel()
    failure_result_of(d, CancelledError)
    env.clock.pump([30.0] * 5)
    assert len(env.fake.requests) == 1


def test_cancel_during_attempt_is_not_retried(env: Env) -> None:
    """Cancelling a call whose request is in flight is not mistaken for a failure."""
    env.fake.hang_next = 1
    d = run(env.client.get_info(env.callback))
    d.cancel()
    failure_result_of(d, CancelledError)
    env.clock.pump([30.0] * 5)
    assert len(env.fake.requests) == 1


def _exchange(cancelled_with: BaseException | None) -> Deferred[Answer]:
    """An exchange that never answers; cancelling it fails it with ``cancelled_with``
    (as the agent's canceller does: ``ConnectingCancelledError`` while connecting), or
    leaves it unsettled when None."""

    def cancel(d: Deferred[Answer]) -> None:
        if cancelled_with is not None:
            d.errback(cancelled_with)

    return Deferred(cancel)


def test_deadline_tells_a_request_still_connecting() -> None:
    """At the deadline an exchange cancelled while connecting surely was not sent."""
    clock = Clock()
    d = ensureDeferred(within_deadline(_exchange(_connecting()), 5.0, clock))
    clock.advance(4.9)
    no_result(d)
    clock.advance(0.1)
    assert failure_result_of(d, DeadlineExceeded).value.surely_not_sent is True


def test_deadline_holds_when_the_canceller_does_not_settle() -> None:
    """An exchange whose canceller does nothing still ends at the deadline."""
    clock = Clock()
    d = ensureDeferred(within_deadline(_exchange(None), 5.0, clock))
    clock.advance(5.0)
    assert failure_result_of(d, DeadlineExceeded).value.surely_not_sent is False


def test_callers_cancel_is_a_cancel_whatever_the_exchange_fails_with() -> None:
    """A caller's cancel is CancelledError, not the transport error the canceller chose
    (which would look like a failure worth a retry); no timer is left behind."""
    clock = Clock()
    d = ensureDeferred(within_deadline(_exchange(_connecting()), 5.0, clock))
    d.cancel()
    failure_result_of(d, CancelledError)
    assert clock.getDelayedCalls() == []


def _connecting() -> BaseException:
    return ierror.ConnectingCancelledError(object())  # type: ignore[arg-type]


# --- version conflicts ------------------------------------------------------------------


def _race(env: Env, stored: Result, **changes: Any) -> Result:
    """Another writer updates the stored result, giving it a new versionId."""
    theirs = attrs.evolve(stored, versionId=env.fake.new_version_id(), **changes)
    env.fake.results[stored.id or 0] = theirs
    return theirs


def test_update_conflict_rereads_and_reapplies(env: Env) -> None:
    """On 409 the client GETs the current result, applies `reapply`, and PUTs again."""
    stored = env.fake.store_result(APP, Result(slideId=SLIDE, displayProperties={"a": 1}))
    _race(env, stored, displayProperties={"a": 1, "theirs": 2})

    def reapply(current: Result) -> Result:
        return attrs.evolve(current, displayProperties={**current.displayProperties, "ours": 3})

    ours = attrs.evolve(stored, displayProperties={"a": 1, "ours": 3})
    updated = success_result_of(
        run(env.client.update_result(env.callback, APP, ours, reapply=reapply))
    )
    assert updated.displayProperties == {"a": 1, "theirs": 2, "ours": 3}
    assert [r.method for r in env.fake.requests] == ["PUT", "GET", "PUT"]


def test_update_conflict_default_reapply_is_ours_with_current_version(env: Env) -> None:
    """Without `reapply`, our result is re-sent with the current versionId."""
    stored = env.fake.store_result(APP, Result(slideId=SLIDE, displayResult="old"))
    theirs = _race(env, stored, displayResult="theirs")
    ours = attrs.evolve(stored, displayResult="ours")
    updated = success_result_of(run(env.client.update_result(env.callback, APP, ours)))
    assert updated.displayResult == "ours"
    assert json.loads(env.fake.requests[-1].body)["versionId"] == theirs.versionId


def test_update_double_conflict_raises(env: Env) -> None:
    """A second conflict after the re-read raises SPSConflict."""
    stored = env.fake.store_result(APP, Result(slideId=SLIDE))
    _race(env, stored)

    def reapply(current: Result) -> Result:
        _race(env, current)  # someone writes again between our GET and PUT
        return current

    d = run(env.client.update_result(env.callback, APP, stored, reapply=reapply))
    f = failure_result_of(d, SPSConflict)
    assert f.value.status == 409
    assert [r.method for r in env.fake.requests] == ["PUT", "GET", "PUT"]


@pytest.mark.parametrize(("status", "body"), [(412, b"{}"), (400, b'{"error": "stale versionId"}')])
def test_conflict_recognised_by_412_or_versionid_body(status: int, body: bytes) -> None:
    """412, or a 4xx naming versionId, is a version conflict on PUT."""
    e = make_env(Scripted([(status, {}, body), (200, {}, result_json()), (status, {}, body)]))
    d = run(e.client.update_result(e.callback, APP, Result(slideId=SLIDE, id=7, versionId="v1")))
    failure_result_of(d, SPSConflict)


def test_update_without_id_is_refused(env: Env) -> None:
    """update_result needs a stored result."""
    with pytest.raises(ValueError):
        success_result_of(run(env.client.update_result(env.callback, APP, Result(slideId=SLIDE))))


# --- malformed answers ------------------------------------------------------------------


def test_non_json_answer_is_protocol_error() -> None:
    """A 200 whose body is not JSON raises SPSProtocolError."""
    e = make_env(Scripted([(200, {}, b"<html>proxy login</html>")]))
    f = failure_result_of(run(e.client.get_info(e.callback)), SPSProtocolError)
    assert "proxy login" in f.value.body_excerpt


def test_malformed_result_is_protocol_error() -> None:
    """A result without slideId raises SPSProtocolError naming the field."""
    e = make_env(Scripted([(200, {}, b'{"id": 1, "versionId": "v"}')]))
    f = failure_result_of(run(e.client.get_result(e.callback, APP, 1)), SPSProtocolError)
    assert "slideId" in str(f.value)


#: What another tool (or another version) may have stored for the app: nothing dpatia
#: can read as a result, one item each.
FOREIGN_RESULTS: list[Any] = [
    {"id": "12", "slideId": SLIDE, "versionId": "v"},  # a string id
    {"id": 13, "slideId": None, "versionId": "v"},  # a null required field
    {"id": 14, "slideId": SLIDE, "displayProperties": {"Cells": [1, 2]}},  # another shape
    {"id": 15, "slideId": SLIDE, "data": {"result": {"type": None}}},
    ["not", "an", "object"],
    None,
]


def test_a_results_list_with_foreign_items_skips_them_with_one_warning() -> None:
    """list_results keeps every item it can read (nulls of fields with a default read as
    absent) and skips the others, with one warning naming each by index, without
    their content."""
    readable = {
        "id": 16,
        "slideId": SLIDE,
        "versionId": "v16",
        "displayResult": None,
        "displayProperties": None,
        "data": None,
        "attachments": None,
    }
    body = json.dumps([*FOREIGN_RESULTS[:3], readable, *FOREIGN_RESULTS[3:]]).encode()
    e = make_env(Scripted([(200, {"content-type": "application/json"}, body)]))
    with capturedLogs() as events:
        results = success_result_of(run(e.client.list_results(e.callback, APP, SLIDE)))
    assert [(r.id, r.displayResult, r.displayProperties) for r in results] == [(16, "", {})]
    warnings = [formatEvent(ev) for ev in events if "cannot read" in formatEvent(ev)]
    assert len(warnings) == 1, warnings
    (warning,) = warnings
    assert "skipped 6 of 7 results" in warning
    assert "item 0: expected an integer, got str at $.id" in warning
    assert "Cells" not in warning


def test_a_results_list_of_only_foreign_items_is_empty() -> None:
    """No readable item at all: an empty list (the caller then creates its own)."""
    body = json.dumps(FOREIGN_RESULTS).encode()
    e = make_env(Scripted([(200, {}, body)]))
    assert success_result_of(run(e.client.list_results(e.callback, APP, SLIDE))) == []


def test_redirect_is_not_followed() -> None:
    """A 3xx is an error: following it could hand the token to another host."""
    scripted = Scripted([(302, {"Location": "http://elsewhere/"}, b""), (200, {}, b"{}")])
    e = make_env(scripted)
    f = failure_result_of(run(e.client.get_info(e.callback)), SPSError)
    assert f.value.status == 302
    assert len(scripted.seen) == 1


# --- secrets ----------------------------------------------------------------------------

SECRET = "TOKEN-d1st1nct1ve-7f3a9c"


def _echo_auth(request: Any) -> bytes:
    """A hostile error page that quotes the request's Authorization header."""
    auth = request.getHeader(b"authorization") or b""
    return b'{"error": "bad ' + auth + b'", "versionId": "x"}'


def _error_cases() -> dict[str, Callable[[Env], Deferred[Any]]]:
    def status(code: int) -> Callable[[Env], Deferred[Any]]:
        return lambda e: run(e.client.slide_info(e.callback, SLIDE))

    return {
        "401": status(401),
        "403": status(403),
        "404": status(404),
        "400": status(400),
        "409": lambda e: run(
            e.client.update_result(e.callback, APP, Result(slideId=SLIDE, id=1, versionId="v"))
        ),
        "503": status(503),
        "429": status(429),
        "protocol": lambda e: run(e.client.get_result(e.callback, APP, 1)),
        "connection": status(0),
        "timeout": status(-1),
    }


@pytest.mark.parametrize("case", list(_error_cases()))
def test_token_never_in_errors_or_logs(case: str) -> None:
    """The callback token appears in no exception str/repr and no log event."""
    if case == "connection":
        e = make_env(Scripted([(200, {}, b"{}")]))
        e.flaky.failures = 99
    elif case == "timeout":
        e = make_env(Scripted([None]))
    elif case == "protocol":
        e = make_env(Scripted([(200, {}, _echo_auth)]))
        # slideId is missing from the echo: get_result raises SPSProtocolError.
    else:
        e = make_env(Scripted([(int(case), {}, _echo_auth)]))
    e = attrs.evolve(e, callback=Callback(url=BASE, token=SECRET))
    with capturedLogs() as events:
        d = _error_cases()[case](e)
        e.clock.pump([30.0] * 12)
        f = failure_result_of(d, SPSError)
    texts = [str(f.value), repr(f.value), repr(f.value.__cause__), f.getTraceback()]
    texts += [formatEvent(ev) + repr(ev) for ev in events]
    assert not any(SECRET in t for t in texts)
    if case not in ("connection", "timeout"):
        assert "<redacted>" in f.value.body_excerpt or case == "protocol"


def test_token_redacted_even_when_cut_at_the_excerpt_edge() -> None:
    """A token straddling the 300-character excerpt limit leaves no prefix behind."""
    e = make_env(Scripted([(400, {}, lambda r: b"x" * 290 + _echo_auth(r))]))
    e = attrs.evolve(e, callback=Callback(url=BASE, token=SECRET))
    f = failure_result_of(run(e.client.get_info(e.callback)), SPSError)
    assert SECRET[:8] not in f.value.body_excerpt


def test_client_secret_never_in_token_errors(env: Env) -> None:
    """Wrong client credentials raise SPSUnauthorized without the secret or its Basic form."""
    env.fake.client_credentials["svc"] = "right"
    f = failure_result_of(
        run(env.client.fetch_token(BASE, APP, "svc", "WRONG-s3cret")), SPSUnauthorized
    )
    assert "WRONG-s3cret" not in str(f.value) + repr(f.value)
    assert "Basic" not in str(f.value)


def test_retry_is_logged_with_fields_and_no_url(env: Env) -> None:
    """Each retry logs endpoint, attempt, delay and status, but no URL or query."""
    env.fake.fail_next = [503]
    with capturedLogs() as events:
        d = run(env.client.slide_info(env.callback, SLIDE, include_phi=True))
        env.clock.advance(0.25)
        success_result_of(d)
    (event,) = [ev for ev in events if "endpoint" in ev]
    assert event["endpoint"] == "GET slides/{id}/info"
    assert (event["attempt"], event["delay"], event["status"]) == (1, 0.25, 503)
    text = formatEvent(event) + repr(event)
    assert "includePHI" not in text and "sps.test" not in text


# --- make_http_client -------------------------------------------------------------------


# Twisted's own certificate code still hands pyOpenSSL X509/PKey objects around.
_TWISTED_TLS_DEPRECATIONS = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _self_signed(hostname: str) -> tuple[bytes, PrivateCertificate]:
    """A self-signed certificate for `hostname` (PEM) and its server-side pair."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert_pem, PrivateCertificate.loadPEM(key_pem + cert_pem)


@implementer(IHandshakeListener)
class _Probe(Protocol):
    """Notes whether the TLS handshake completed."""

    handshook = False

    def handshakeCompleted(self) -> None:
        self.handshook = True


def _handshake(http: SPSHttp, server: PrivateCertificate, hostname: str = "sps.test") -> bool:
    """Run a TLS handshake in memory between the client's policy and `server`."""
    creator = http.tls_policy.creatorForNetloc(hostname.encode(), 443)
    probe = _Probe()
    client_factory = TLSMemoryBIOFactory(creator, True, Factory.forProtocol(lambda: probe))
    server_factory = TLSMemoryBIOFactory(server.options(), False, Factory.forProtocol(Protocol))
    client = client_factory.buildProtocol(None)
    srv = server_factory.buildProtocol(None)
    pump = iosim.connect(
        srv,
        iosim.FakeTransport(srv, isServer=True),
        client,
        iosim.FakeTransport(client, isServer=False),
    )
    pump.flush()
    return probe.handshook


@_TWISTED_TLS_DEPRECATIONS
def test_make_http_client_default_policy() -> None:
    """By default the client verifies like a browser: a self-signed SPS is refused."""
    http = make_http_client(MemoryReactorClock(), pool_size=3)
    _, server = _self_signed("sps.test")
    assert isinstance(http.tls_policy, BrowserLikePolicyForHTTPS)
    assert http.pool.maxPersistentPerHost == 3 and http.pool.persistent
    assert not _handshake(http, server)


@_TWISTED_TLS_DEPRECATIONS
def test_make_http_client_with_ca_file(tmp_path: Any) -> None:
    """With ca_file the client trusts that bundle's certificates (and checks the host)."""
    pem, server = _self_signed("sps.test")
    other_pem, _ = _self_signed("other.test")
    bundle = tmp_path / "ca.pem"
    bundle.write_bytes(other_pem + pem)
    http = make_http_client(MemoryReactorClock(), ca_file=str(bundle))
    assert _handshake(http, server)
    assert not _handshake(http, server, hostname="wrong.test")


@_TWISTED_TLS_DEPRECATIONS
def test_make_http_client_without_verification_warns(tmp_path: Any) -> None:
    """verify_tls=False accepts any certificate and logs a warning at construction."""
    with capturedLogs() as events:
        http = make_http_client(MemoryReactorClock(), verify_tls=False)
    _, server = _self_signed("sps.test")
    assert isinstance(http.tls_policy, UnverifiedTLSPolicy)
    assert _handshake(http, server, hostname="any.host")
    assert any(ev.get("log_level").name == "warn" for ev in events)


def test_make_http_client_close_fires() -> None:
    """SPSHttp.close() closes the pool's cached connections and fires."""
    http = make_http_client(MemoryReactorClock())
    assert success_result_of(http.close()) is None


# --- over a real socket -----------------------------------------------------------------


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_round_trip_over_loopback(reactor: Any) -> None:
    """make_http_client + SPSClient against FakeSPS served by a Site on a loopback port."""
    fake = FakeSPS(clock=reactor)
    fake.add_slide(SLIDE, files=[("a.svs", b"A" * 100_000)])
    port = reactor.listenTCP(0, Site(fake.resource()), interface="127.0.0.1")
    http = make_http_client(reactor)
    client = SPSClient(http=http.client, clock=reactor, software_version="1", timeout=10)
    callback = Callback(f"http://127.0.0.1:{port.getHost().port}{BASE_PATH}", fake.issue_token())
    try:
        created = await client.create_result(callback, APP, Result(slideId=SLIDE))
        stale = attrs.evolve(created, displayResult="first")
        await client.update_result(callback, APP, stale)
        # `stale` still carries the old versionId: this exercises the conflict path.
        final = await client.update_result(
            callback, APP, attrs.evolve(stale, displayResult="second")
        )
        assert await client.list_results(callback, APP, SLIDE) == [final]
        response = await client.open_files(callback, SLIDE)
        assert len(await treq.content(response)) == 100_000
    finally:
        await http.close()
        await port.stopListening()
