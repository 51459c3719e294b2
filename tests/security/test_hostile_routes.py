"""Every IA-API route under hostile input: any method, path, headers and body get a 2xx
or a 4xx, never a 5xx nor a traceback, and never a file outside the spool and work
folders; a refused request (4xx) changes nothing in the spool either.

One real front door (the daemon's site, a real directory spool, a fake SPS on
loopback) serves every example of a test; the bytes go to its HTTP channel in memory
(see ``harness.py``).  Where an example names things the SPS owns (a slide, a token),
the fake SPS is told of them first, so that an answer reflects dpatia's handling of
the body, not the fake's refusal of an unknown slide.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import ensureDeferred

from .conftest import PROFILE
from .harness import Answer, FrontDoor, request, start_front_door

ROUTES = [b"/", b"/dpatia", b"/dpatia/info", b"/dpatia/imagenotification"]
METHODS = [b"GET", b"POST", b"PUT", b"DELETE", b"PATCH", b"HEAD", b"OPTIONS"]

#: Strings that have broken parsers, paths and encoders before.
NASTY = [
    "",
    ".",
    "..",
    "../../../../etc/passwd",
    "..\\..\\windows\\win.ini",
    "/etc/passwd",
    "%2e%2e%2f%2e%2e%2f",
    "\x00",
    "a\x00b",
    "\r\nX-Injected: 1",
    "\ud800",
    "\udfff\ud800",
    "\u202egpj.exe",
    "\ufeff",
    "CON",
    "nul.txt",
    "e\u0301",
    "\u00e9",
    "\uff0e\uff0e\uff0f",
    "x" * 5000,
    "🙂" * 50,
    "${jndi:ldap://127.0.0.1/a}",
    "'; DROP TABLE results; --",
    "http://127.0.0.1:1@evil.example/",
]

text = st.sampled_from(NASTY) | st.text(max_size=40)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | text
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
    max_leaves=12,
)


@pytest.fixture(scope="module")
def door(reactor: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FrontDoor]:
    root = tmp_path_factory.mktemp("hostile")
    front = pytest_twisted.blockon(ensureDeferred(start_front_door(reactor, root)))
    yield front
    pytest_twisted.blockon(ensureDeferred(front.close()))


async def _exchange(door: FrontDoor, raw: bytes) -> Answer:
    """Send ``raw``; check the properties every answer has; return the answer."""
    cwd = sorted(os.listdir(os.getcwd()))
    outside, spool = door.outside(), door.spool_files()
    answer = await door.send(raw)
    await door.settle()
    assert 200 <= answer.status < 500, (answer.status, answer.body[:500])
    assert b"Traceback" not in answer.body and b'File "' not in answer.body, answer.body
    assert door.outside() == outside, "a file appeared outside the spool and work folders"
    assert sorted(os.listdir(os.getcwd())) == cwd
    if answer.status >= 400:
        assert door.spool_files() == spool, "a refused request changed the spool"
        if answer.body and answer.headers.get(b"content-type") == b"application/json":
            assert isinstance(answer.json().get("error"), str) and answer.json()["error"]
    return answer


def _tell_the_sps(door: FrontDoor, body: Any) -> None:
    """Let the fake SPS know the slide and token ``body`` names (see the docstring)."""
    if not isinstance(body, dict):
        return
    slide = body.get("slideId")
    if isinstance(slide, str) and slide and slide not in door.fake.slides:
        door.fake.add_slide(slide)
    callback = body.get("callbackInfo")
    token = callback.get("token") if isinstance(callback, dict) else None
    if isinstance(token, str):
        door.fake.tokens.add(token)


@settings(PROFILE, max_examples=120)
@given(
    method=st.sampled_from(METHODS),
    path=st.sampled_from(ROUTES),
    content_type=st.sampled_from(
        [
            None,
            b"application/json",
            b"application/json; charset=utf-16",
            b"application/problem+json",
            b"text/plain",
            b"multipart/form-data; boundary=x",
            b"application/x-www-form-urlencoded",
            b"\xff\xfe",
        ]
    ),
    body=st.binary(max_size=600)
    | st.builds(lambda v: json.dumps(v).encode(), json_values)
    | st.sampled_from([b"{", b"[" * 200, b'{"a":' * 70 + b"1" + b"}" * 70, b"9" * 5000]),
)
@pytest_twisted.ensureDeferred
async def test_any_body_to_any_route(
    door: FrontDoor, method: bytes, path: bytes, content_type: bytes | None, body: bytes
) -> None:
    """Any bytes as the body of any method on any route: 2xx or 4xx, JSON errors."""
    await _exchange(door, request(method, path, body, content_type=content_type))


segment = st.sampled_from(
    [
        b"dpatia",
        b"info",
        b"imagenotification",
        b"..",
        b".",
        b"",
        b"%2e%2e",
        b"%00",
        b"%2F",
        b"%ff",
        b"\xc3\xa9",
        b"%c0%ae",
        b"~",
        b";x=1",
        b"?a=1",
        b"#f",
        b"..%5c",
        b"*",
    ]
) | st.binary(min_size=1, max_size=8).filter(lambda b: not set(b) & set(b" \r\n\t\x0b\x0c"))


@settings(PROFILE, max_examples=120)
@given(
    method=st.sampled_from(METHODS),
    segments=st.lists(segment, max_size=6),
    absolute=st.booleans(),
)
@pytest_twisted.ensureDeferred
async def test_any_path(
    door: FrontDoor, method: bytes, segments: list[bytes], absolute: bool
) -> None:
    """Dot segments, encoded NULs and slashes, raw bytes, queries: never a 5xx, and no
    path ever leads to a file outside the spool."""
    path = b"/".join(segments)
    path = (b"/" + path) if absolute or not path else path
    body = json.dumps(door.notification()).encode()
    await _exchange(door, request(method, path, body))


header_name = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.!#$%&'*+^`|~",
    min_size=1,
    max_size=20,
).filter(lambda n: n.lower() not in {"content-length", "transfer-encoding", "connection", "expect"})
header_value = st.binary(max_size=200).map(
    lambda b: bytes(c for c in b if c not in b"\r\n\x00")
) | st.sampled_from(
    [b"127.0.0.1", b"10.0.0.1, 127.0.0.1", b"\xff" * 10, b"gzip", b"application/json", b"x" * 8000]
)


@settings(PROFILE, max_examples=80)
@given(
    path=st.sampled_from(ROUTES),
    method=st.sampled_from([b"GET", b"POST"]),
    headers=st.lists(
        st.tuples(
            header_name.map(str.encode)
            | st.sampled_from(
                [
                    b"Host",
                    b"Content-Type",
                    b"X-Forwarded-For",
                    b"Accept",
                    b"Authorization",
                    b"X-Sectra-ApiVersion",
                    b"Content-Encoding",
                    b"Cookie",
                ]
            ),
            header_value,
        ),
        max_size=6,
    ),
)
@pytest_twisted.ensureDeferred
async def test_any_headers(
    door: FrontDoor, path: bytes, method: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    """Odd, repeated and oversized headers (Host, Content-Type, X-Forwarded-For...):
    never a 5xx."""
    body = json.dumps(door.notification()).encode()
    await _exchange(door, request(method, path, body, headers=headers))


def _paths(value: Any, here: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path into a JSON value (keys and indexes), the root included."""
    found = [here]
    if isinstance(value, dict):
        for key, child in value.items():
            found += _paths(child, (*here, key))
    elif isinstance(value, list):
        for i, child in enumerate(value):
            found += _paths(child, (*here, i))
    return found


def _mutated(body: Any, path: tuple[Any, ...], how: str, new: Any) -> Any:
    """``body`` with the value at ``path`` replaced, removed, or given an extra key."""
    if not path:
        return new if how != "add" or not isinstance(body, dict) else {**body, "extra": new}
    parent = body
    for step in path[:-1]:
        parent = parent[step]
    last = path[-1]
    if how == "drop":
        del parent[last]
    elif how == "add" and isinstance(parent[last], dict):
        parent[last]["extra"] = new
    else:
        parent[last] = new
    return body


def _valid_bodies(door: FrontDoor) -> list[tuple[bytes, dict[str, Any]]]:
    points = [{"x": 0.1, "y": 0.2}, {"x": 0.3, "y": 0.4}, {"x": 0.5, "y": 0.1}]
    stored = {
        "id": 7,
        "versionId": "v1",
        "slideId": "slide-1",
        "displayResult": "done",
        "applicationVersion": "1",
        "data": {
            "context": {},
            "result": {"type": "polygons", "content": [{"polygons": [{"points": points}]}]},
        },
        "attachments": [],
    }
    return [
        (b"/dpatia", door.invocation()),
        (
            b"/dpatia",
            door.invocation(
                input={"type": "multiArea", "content": {"polygons": [{"points": points}]}}
            ),
        ),
        (b"/dpatia", door.invocation("modify", input=stored)),
        (b"/dpatia", door.invocation("delete", input=stored)),
        (b"/dpatia", door.invocation("cancel")),
        (b"/dpatia/imagenotification", door.notification()),
    ]


@settings(PROFILE, max_examples=200)
@given(data=st.data())
@pytest_twisted.ensureDeferred
async def test_mutated_invocations_and_notifications(door: FrontDoor, data: st.DataObject) -> None:
    """A valid create, modify, delete, cancel or notification with one value anywhere in
    it replaced, removed or added: a 2xx or a 4xx naming the problem.

    The one 5xx allowed is a modify the SPS itself refused (502: the result it names
    does not exist there), which dpatia must report as the SPS's refusal."""
    path, body = data.draw(st.sampled_from(_valid_bodies(door)), label="valid")
    where = data.draw(st.sampled_from(_paths(body)), label="path")
    how = data.draw(st.sampled_from(["set", "drop", "add"]), label="how")
    new = data.draw(json_values, label="value")
    if not where and how == "drop":
        how = "set"
    body = _mutated(body, where, how, new)
    _tell_the_sps(door, body)
    raw = json.dumps(body).encode()
    if isinstance(body, dict) and body.get("action") == "modify":
        answer = await door.send(request(b"POST", path, raw))
        await door.settle()
        if answer.status == 502:
            assert answer.json()["error"].startswith("the Sectra Pathology Server could not")
            return
        assert 200 <= answer.status < 500, (answer.status, answer.body[:500])
        return
    await _exchange(door, request(b"POST", path, raw))


@pytest_twisted.ensureDeferred
async def test_the_valid_bodies_are_accepted(door: FrontDoor) -> None:
    """The unmutated bodies above are answered 200 (the mutations start from valid)."""
    for path, body in _valid_bodies(door):
        if body["action"] in ("modify", "delete"):
            continue  # need a stored result: covered by the frontdoor tests
        answer = await _exchange(door, request(b"POST", path, json.dumps(body).encode()))
        if body.get("input", {}).get("type") == "multiArea":
            assert answer.status == 400  # a wholeSlide app refuses region creates
        else:
            assert answer.status == 200, answer.body


def test_the_tree_outside_the_folders_is_watched(door: FrontDoor, tmp_path: Path) -> None:
    """The "nothing outside" check sees a file that appears beside the spool."""
    before = door.outside()
    stray = door.root / "stray.txt"
    stray.write_text("x")
    try:
        assert door.outside() != before
    finally:
        stray.unlink()


#: The strings of a request that travel on: into job keys, file names, SPS calls.
STRING_FIELDS = [
    ("slideId",),
    ("applicationId",),
    ("cancellationToken",),
    ("callbackInfo", "token"),
    ("callbackInfo", "url"),
    ("context", "key"),
]


@settings(PROFILE, max_examples=150)
@given(
    kind=st.sampled_from(["create", "cancel", "notification"]),
    where=st.sampled_from(STRING_FIELDS),
    value=text,
)
@pytest_twisted.ensureDeferred
async def test_hostile_strings_in_the_fields_that_travel(
    door: FrontDoor, kind: str, where: tuple[str, ...], value: str
) -> None:
    """Lone surrogates, NULs, line breaks, dot segments, huge and bidi strings in the
    slide id, application id, tokens, callback URL or context: a 2xx or a 4xx."""
    if kind == "notification":
        path, body = b"/dpatia/imagenotification", door.notification()
    else:
        path, body = b"/dpatia", door.invocation(kind)
    parent = body
    for step in where[:-1]:
        parent = parent[step]
    parent[where[-1]] = value
    _tell_the_sps(door, body)
    await _exchange(door, request(b"POST", path, json.dumps(body).encode()))


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        ("slideId", "\ud800", "unpaired surrogate"),
        ("slideId", "..", "slideId must not be . or .."),
        ("token", "t\u20ac", "printable ASCII"),
        ("token", "a\r\nX-Injected: 1", "printable ASCII"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_strings_that_were_a_500_or_an_escape_are_refused(
    door: FrontDoor, field: str, value: str, problem: str
) -> None:
    """Regression: these were a 500 (a job key or a header could not be encoded) or a
    dot segment in the SPS call's path; now a 400 naming the problem, nothing written."""
    body = door.invocation()
    if field == "token":
        body["callbackInfo"]["token"] = value
    else:
        body[field] = value
    _tell_the_sps(door, body)
    answer = await _exchange(door, request(b"POST", b"/dpatia", json.dumps(body).encode()))
    assert answer.status == 400
    assert problem in answer.json()["error"]


@pytest.mark.parametrize(
    ("path", "headers", "problem"),
    [
        (b"/dpatia/%ff", [], "the request path is not UTF-8"),
        (b"/%c0%ae%c0%ae/x", [], "the request path is not UTF-8"),
        (b"/dpatia", [(b"Host", b"\xff.example")], "the Host header is not UTF-8"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_a_path_or_host_that_is_not_utf8_is_a_json_400(
    door: FrontDoor, path: bytes, headers: list[tuple[bytes, bytes]], problem: str
) -> None:
    """Regression: Klein logged a traceback and answered in plain text; now a JSON
    400 naming the problem, before any route runs."""
    raw = request(b"GET", path, content_type=None, headers=headers)
    answer = await _exchange(door, raw.replace(b"Host: dpatia.test\r\n", b"") if headers else raw)
    assert answer.status == 400
    assert answer.json()["error"].startswith(problem)
