"""Request bodies, large and hostile: the two size limits, the bounds of a body's JSON,
and large bodies parsed off the reactor thread (real HTTP on loopback, as in
test_routes.py, whose stack this reuses)."""

from __future__ import annotations

import json
from functools import partial
from typing import Any

import attrs
import pytest
import pytest_twisted
import test_routes
from test_routes import Stack
from twisted.internet.defer import Deferred
from twisted.web.test.requesthelper import DummyRequest

from dpatia_daemon.config import Config
from dpatia_daemon.frontdoor.offload import OFFLOAD_BYTES, ParseProcess
from dpatia_daemon.frontdoor.site import BodyLimits, json_answer, make_site, parse_json
from dpatia_daemon.lifecycle import in_thread
from dpatia_daemon.models import InvalidInput, RawJSON, unstructure
from dpatia_daemon.sps.results import Status, status_frame

MIB = 1024 * 1024
LIMITS = BodyLimits()

#: test_routes.py's stack, as a fixture of this module.
stack = test_routes.stack


@pytest.fixture
def child(reactor: Any) -> Any:
    """The child process the daemon parses its largest bodies in."""
    process = ParseProcess(reactor)
    process.startService()
    yield process
    process.stopService()


def _nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def _big_content(points: int) -> list[dict[str, Any]]:
    """A result's content with ``points`` points (about 36 bytes of JSON each)."""
    return [
        {
            "style": {"strokeStyle": "#FF0000"},
            "polygons": [
                {
                    "points": [
                        {"x": round(0.1 + i * 1e-6, 9), "y": round(0.2 + i * 1e-6, 9)}
                        for i in range(points)
                    ]
                }
            ],
        }
    ]


# --- parse_json: the bounds -----------------------------------------------------------

HOSTILE = [
    ("deep-100000", _nested(100_000), "nested deeper than 64 levels"),
    ("deep-65", _nested(65), "nested deeper than 64 levels"),
    ("deep-in-object", b'{"a":' * 70 + b"1" + b"}" * 70, "nested deeper than 64 levels"),
    ("long-string", json.dumps(["x" * (MIB + 1)]).encode(), f"longer than {MIB}"),
    ("long-key", json.dumps({"k" * (MIB + 1): 1}).encode(), f"longer than {MIB}"),
    ("huge-int", b"[" + b"9" * 5000 + b"]", "number of 5000 digits"),
    ("long-float", b"[0." + b"1" * 200 + b"]", "number of 202 characters"),
    ("float-overflow", b'{"x": 1e400}', "number out of range (1e400)"),
    ("nan", b'{"x": NaN}', "NaN, which is not a JSON number"),
    ("infinity", b"[-Infinity]", "-Infinity, which is not a JSON number"),
    ("not-utf8", b'{"x": "\xff"}', "not valid JSON"),
]


@pytest.mark.parametrize(
    ("raw", "problem"), [c[1:] for c in HOSTILE], ids=[c[0] for c in HOSTILE]
)
def test_hostile_json_is_refused_naming_the_problem(raw: bytes, problem: str) -> None:
    """Deep nesting, huge strings and keys, huge or non-finite numbers: InvalidInput
    (a 400) whose message names the problem, never a RecursionError."""
    with pytest.raises(InvalidInput) as raised:
        parse_json(raw, LIMITS)
    assert problem in raised.value.message
    assert raised.value.field == "$"


def test_an_answer_splices_a_result_content_kept_as_text() -> None:
    """A stored result read back from the SPS may carry its content as RawJSON (a large
    answer is skimmed): the front door answers with that text where it stands."""
    request = DummyRequest([b""])
    body = {"id": 1, "data": {"result": {"type": "primitive", "content": RawJSON("[1, 2]")}}}
    data = json_answer(request, body)
    assert json.loads(data) == {
        "id": 1,
        "data": {"result": {"type": "primitive", "content": [1, 2]}},
    }
    assert request.responseHeaders.getRawHeaders(b"content-length") == [b"%d" % len(data)]


def test_json_at_the_bounds_is_accepted() -> None:
    """Exactly max_depth levels and a string of exactly max_string characters parse."""
    limits = BodyLimits(max_depth=64, max_string=1000)
    assert parse_json(_nested(64), limits) == json.loads(_nested(64))
    assert parse_json(json.dumps({"s": "y" * 1000}).encode(), limits) == {"s": "y" * 1000}
    assert parse_json(b"[" + b"9" * 100 + b", 1.5e300]", limits) == [int("9" * 100), 1.5e300]


def _sps_bodies() -> list[tuple[str, Any]]:
    """Bodies the SPS sends (IA-API.md §1.3, §1.4) and results dpatia writes."""
    callback = {"url": "http://127.0.0.1:1/x", "token": "t"}
    base = {"applicationId": "dpatia", "slideId": "s", "callbackInfo": callback}
    points = [{"x": 0.1, "y": 0.2}, {"x": 0.3, "y": 0.4}, {"x": 0.5, "y": 0.1}]
    stored = unstructure(
        status_frame(
            slide_id="s",
            status=Status.DONE,
            text="done",
            job_id="ab" * 16,
            application_version="1",
            image_size=(100_000, 80_000),
            progress=100,
        )
    )
    stored.update(id=7, versionId="v1", attachments=[{"name": "a", "state": "stored"}])
    return [
        ("create-whole", {**base, "action": "create", "input": {"type": "wholeSlide"}}),
        (
            "create-tagged",
            {
                **base,
                "action": "create",
                "context": None,
                "cancellationToken": "c",
                "input": {
                    "type": "taggedPolygon",
                    "content": {"polygon": {"points": points}, "tags": ["T"], "tagIndex": 0},
                },
            },
        ),
        (
            "create-multi",
            {
                **base,
                "action": "create",
                "input": {"type": "multiArea", "content": {"polygons": [{"points": points}]}},
            },
        ),
        ("modify", {**base, "action": "modify", "input": stored}),
        ("delete", {**base, "action": "delete", "input": stored}),
        ("cancel", {**base, "action": "cancel", "cancellationToken": "c"}),
        (
            "notification",
            {
                **base,
                "action": "newImageFiles",
                "imageInfo": {"imageSize": {"width": 2, "height": 1}, "micronsPerPixel": 0.25},
            },
        ),
        ("written-result", stored),
        (
            "big-result",
            dict(stored, data={"result": {"type": "primitive", "content": _big_content(20_000)}}),
        ),
    ]


@pytest.mark.parametrize("body", [c[1] for c in _sps_bodies()], ids=[c[0] for c in _sps_bodies()])
def test_bodies_of_the_ia_api_stay_valid(body: Any) -> None:
    """What the SPS sends and what dpatia writes parse unchanged within the defaults."""
    raw = json.dumps(body).encode()
    assert parse_json(raw, BodyLimits.of(Config())) == body


# --- over HTTP -------------------------------------------------------------------------


async def _post_raw(stack: Stack, path: str, raw: bytes) -> tuple[int, Any, Any]:
    response = await stack.client.post(
        stack.url + path, raw, headers={"Content-Type": ["application/json"]}
    )
    return response.code, json.loads(await response.content()), response.headers


@pytest.mark.parametrize(
    ("path", "raw", "problem"),
    [
        ("/dpatia", _nested(100_000), "nested deeper than 64 levels"),
        ("/dpatia/imagenotification", _nested(2000), "nested deeper than 64 levels"),
        ("/dpatia/imagenotification", b'{"a": [' + b"1" * 3000 + b"]}", "3000 digits"),
        ("/dpatia", json.dumps({"s": "x" * (MIB + 10)}).encode(), "string of"),
        ("/dpatia", b'{"action": "create", "x": 1e999}', "out of range"),
    ],
    ids=["deep-invoke", "deep-notification", "huge-number", "huge-string", "inf"],
)
@pytest_twisted.ensureDeferred
async def test_hostile_bodies_are_a_400_naming_the_problem(
    reactor: Any, stack: Stack, path: str, raw: bytes, problem: str
) -> None:
    """Over HTTP: 400, a JSON error naming the problem, nothing spooled, no SPS call."""
    stack.api.run_blocking = partial(in_thread, reactor)
    before = len(stack.fake.requests)
    code, answer, _ = await _post_raw(stack, path, raw)
    assert code == 400, answer
    assert problem in answer["error"] and answer["field"] == "$"
    assert stack.spool_files() == []
    assert len(stack.fake.requests) == before


@pytest.mark.parametrize("outside", [False, True], ids=["thread", "child-process"])
@pytest_twisted.ensureDeferred
async def test_modify_and_delete_with_a_5_mib_result(
    reactor: Any, stack: Stack, outside: bool, request: pytest.FixtureRequest
) -> None:
    """A modify carrying a 5 MiB stored result is stored and answered; a delete of it
    cancels the job: both bodies are far over max_body_bytes (4096 here).  Parsed in a
    thread, or (as the daemon does from OFFLOAD_BYTES up) in the child process."""
    stack.api.run_blocking = partial(in_thread, reactor)
    if outside:
        stack.api.parse_outside = request.getfixturevalue("child")
    _, created, _ = await stack.post("/dpatia", stack.invocation())
    result = {"type": "primitive", "content": _big_content(180_000)}
    big = dict(created, data=dict(created["data"], result=result))
    raw = json.dumps(stack.invocation("modify", input=big)).encode()
    assert len(raw) > 5 * MIB
    code, answer, _ = await stack.post("/dpatia", raw)
    assert code == 200, answer
    assert answer["data"]["result"] == big["data"]["result"]
    (stored,) = stack.fake.results_for("slide-1")
    assert unstructure(stored.data)["result"] == big["data"]["result"]
    code, answer, _ = await stack.post("/dpatia", stack.invocation("delete", input=dict(answer)))
    assert (code, answer) == (200, {})
    assert await stack.spool.queued() == []
    if outside:
        assert stack.api.parse_outside.started_pool  # type: ignore[union-attr]


@pytest_twisted.ensureDeferred
async def test_a_hostile_body_parsed_in_the_child_process_is_the_same_400(
    stack: Stack, child: ParseProcess
) -> None:
    """A body over OFFLOAD_BYTES nested too deep: the child's InvalidInput comes back as
    the same 400, naming the problem and its field; nothing is spooled."""
    stack.api.parse_outside = child
    raw = _nested(OFFLOAD_BYTES)
    code, answer, _ = await _post_raw(stack, "/dpatia", raw)
    assert code == 400, answer
    assert "nested deeper than 64 levels" in answer["error"] and answer["field"] == "$"
    assert stack.spool_files() == []
    assert child.started_pool  # it went through the child


@pytest_twisted.ensureDeferred
async def test_too_large_create_and_notification_are_413(stack: Stack) -> None:
    """Only modify and delete may exceed max_body_bytes: a large create or notification
    is 413 naming max_body_bytes, and nothing is written."""
    create = stack.invocation(context={"pad": "x" * 5000})
    code, answer, _ = await stack.post("/dpatia", create)
    assert code == 413 and "max_body_bytes" in answer["error"] and "create" in answer["error"]
    note = stack.notification("slide-5", context={"pad": "x" * 5000})
    code, answer, _ = await stack.post("/dpatia/imagenotification", note)
    assert code == 413 and "[server] max_body_bytes" in answer["error"]
    assert stack.spool_files() == []


@pytest_twisted.ensureDeferred
async def test_a_modify_over_the_result_limit_is_413(reactor: Any, stack: Stack) -> None:
    """A modify larger than max_result_body_bytes is 413 naming that key."""
    config = attrs.evolve(
        stack.api.config,
        server=attrs.evolve(stack.api.config.server, max_result_body_bytes=20_000),
    )
    stack.api.config = config
    site = make_site(stack.api.resource(), config)
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    try:
        stored = {"id": 1, "slideId": "slide-1", "displayResult": "x" * 30_000}
        body = stack.invocation("modify", input=stored)
        response = await stack.client.post(
            f"http://127.0.0.1:{port.getHost().port}/dpatia",
            json.dumps(body).encode(),
            headers={"Content-Type": ["application/json"]},
        )
        answer = json.loads(await response.content())
    finally:
        await port.stopListening()
    assert response.code == 413 and "max_result_body_bytes" in answer["error"]


@pytest_twisted.ensureDeferred
async def test_notifications_are_answered_while_a_large_body_is_parsed(
    reactor: Any, stack: Stack
) -> None:
    """A large modify is parsed through run_blocking (small bodies at once); while that
    parse is pending, notifications are accepted and answered."""
    calls: list[tuple[Any, tuple[Any, ...]]] = []
    entered: Deferred[None] = Deferred()
    release: Deferred[None] = Deferred()

    def run_blocking(f: Any, *args: Any) -> Deferred[Any]:
        calls.append((f, args))
        entered.callback(None)
        return release.addCallback(lambda _: in_thread(reactor, f, *args))

    stack.api.run_blocking = run_blocking
    _, created, _ = await stack.post("/dpatia", stack.invocation())
    assert calls == []  # small bodies are parsed inline
    big = dict(created, displayResult="x" * 200_000)
    modify = Deferred.fromCoroutine(stack.post("/dpatia", stack.invocation("modify", input=big)))
    await entered
    code, answer, _ = await stack.post("/dpatia/imagenotification", stack.notification("slide-9"))
    assert (code, answer) == (200, {})
    assert len(calls) == 1
    release.callback(None)
    code, answer, _ = await modify
    assert code == 200 and answer["displayResult"] == big["displayResult"]
