"""Tests of the in-memory SPS (:mod:`dpatia_daemon.simulator.fake`) through StubTreq.

These pin the fake's own behaviour — the choices it makes where the IA-API sources
are silent and the knobs tests rely on — independently of the client.
"""

from __future__ import annotations

import base64
import email
import email.policy
import json
from typing import Any

import pytest
from conftest import no_result, success_result_of
from treq.testing import StubTreq
from twisted.internet.task import Clock

from dpatia_daemon.models import Result
from dpatia_daemon.simulator.fake import BASE_PATH, EXTENDED_FIELDS, PHI_FIELDS, FakeSPS

URL = "http://sps.test" + BASE_PATH
APP = "app-1"
SLIDE = "slide-1"


@pytest.fixture
def fake() -> FakeSPS:
    fake = FakeSPS(clock=Clock())
    fake.add_slide(SLIDE, label=b"\xff\xd8LABEL", tiles={(9, 1, 2): b"TILE"})
    return fake


@pytest.fixture
def token(fake: FakeSPS) -> str:
    return fake.issue_token()


def call(
    fake: FakeSPS,
    method: str,
    path: str,
    token: str | None = None,
    body: Any = None,
    **kwargs: Any,
) -> tuple[int, dict[str, list[str]], bytes]:
    """Make one request through StubTreq; return status, headers, body."""
    stub = StubTreq(fake.resource())
    headers = dict(kwargs.pop("headers", {}))
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if body is not None and not isinstance(body, bytes):
        body = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    d = stub.request(method, URL + path, headers=headers, data=body, **kwargs)
    response = success_result_of(d)
    content = success_result_of(stub.content(response))
    raw = {
        k.decode().lower(): [v.decode() for v in vs]
        for k, vs in response.headers.getAllRawHeaders()
    }
    return response.code, raw, content


def store(fake: FakeSPS, **kwargs: Any) -> Result:
    return fake.store_result(APP, Result(slideId=SLIDE, **kwargs))


def test_the_request_log_keeps_the_newest_max_requests(fake: FakeSPS, token: str) -> None:
    """Past max_requests the oldest records are dropped (and counted), never the newest:
    a simulator left running does not grow without bound."""
    fake.max_requests = 20
    for n in range(45):
        call(fake, "GET", f"/slides/{SLIDE}/info?n={n}", token=token)
    assert len(fake.requests) <= 20
    assert fake.requests_dropped + len(fake.requests) == 45
    assert fake.requests[-1].query == {"n": ["44"]}
    kept = [int(r.query["n"][0]) for r in fake.requests]
    assert kept == list(range(45 - len(kept), 45))


# --- tokens -----------------------------------------------------------------------------


def test_missing_token_is_401_json(fake: FakeSPS) -> None:
    """A request without a Bearer token gets a JSON 401."""
    status, headers, body = call(fake, "GET", "/info")
    assert status == 401
    assert headers["content-type"][0].startswith("application/json")
    assert "error" in json.loads(body)


def test_unknown_token_is_401_and_not_echoed(fake: FakeSPS) -> None:
    """An unknown token gets 401, and the error body does not quote it."""
    status, _, body = call(fake, "GET", "/info", token="guess-123")
    assert status == 401
    assert b"guess-123" not in body


def test_issued_token_is_accepted(fake: FakeSPS, token: str) -> None:
    """GET /info with an issued token answers the configured version."""
    status, _, body = call(fake, "GET", "/info", token=token)
    assert status == 200
    assert json.loads(body) == {"apiVersion": "1.10", "softwareVersion": "4.2.0.0"}


def test_token_expires_with_the_clock(fake: FakeSPS) -> None:
    """A token with a lifetime is refused once the injected clock reaches its expiry."""
    token = fake.issue_token(lifetime=10)
    assert call(fake, "GET", "/info", token=token)[0] == 200
    fake.clock.advance(10)  # type: ignore[attr-defined]
    status, _, body = call(fake, "GET", "/info", token=token)
    assert status == 401
    assert json.loads(body) == {"error": "token expired"}


def post_token(
    fake: FakeSPS, secret: str, grant: str, *, form: bool = False
) -> tuple[int, dict[str, list[str]], bytes]:
    """POST /token as client "svc" (whose real secret is "pw") with ``secret``."""
    fake.client_credentials["svc"] = "pw"
    headers = {"Authorization": "Basic " + base64.b64encode(f"svc:{secret}".encode()).decode()}
    if form:
        headers["Content-Type"] = "application/x-www-form-urlencoded"
    body = f"grant_type={grant}".encode()
    return call(fake, "POST", "/token?applicationId=app-1", body=body, headers=headers)


def test_token_endpoint_issues_a_usable_token(fake: FakeSPS) -> None:
    """POST /token with the right client credentials returns a Bearer token that works."""
    status, _, body = post_token(fake, "pw", "client_credentials", form=True)
    answer = json.loads(body)
    assert status == 200
    assert answer["token_type"] == "Bearer" and answer["expires_in"] == 3600.0
    assert call(fake, "GET", "/info", token=answer["access_token"])[0] == 200


def test_token_endpoint_rejects_wrong_secret(fake: FakeSPS) -> None:
    """POST /token with a wrong secret is a 401."""
    status, _, _ = post_token(fake, "nope", "client_credentials")
    assert status == 401


def test_token_endpoint_requires_client_credentials_grant(fake: FakeSPS) -> None:
    """POST /token with another grant type is a 400."""
    status, _, body = post_token(fake, "pw", "password")
    assert status == 400
    assert json.loads(body) == {"error": "unsupported_grant_type"}


# --- slides -----------------------------------------------------------------------------


def test_slide_info_hides_phi_and_extended_fields_by_default(fake: FakeSPS, token: str) -> None:
    """Without parameters slide info has neither PHI nor extended fields."""
    status, _, body = call(fake, "GET", f"/slides/{SLIDE}/info", token=token)
    info = json.loads(body)
    assert status == 200
    assert info["id"] == SLIDE and "imageSize" in info
    assert not (set(info) & (PHI_FIELDS | EXTENDED_FIELDS))


def test_slide_info_phi_only_with_include_phi(fake: FakeSPS, token: str) -> None:
    """includePHI=true adds the PHI fields."""
    _, _, body = call(fake, "GET", f"/slides/{SLIDE}/info?includePHI=true", token=token)
    info = json.loads(body)
    assert PHI_FIELDS <= set(info)
    assert info["accessionNumber"] == "ACC-0001"


def test_slide_info_extended_scope(fake: FakeSPS, token: str) -> None:
    """scope=extended adds the extended fields but no PHI."""
    _, _, body = call(fake, "GET", f"/slides/{SLIDE}/info?scope=extended", token=token)
    info = json.loads(body)
    assert EXTENDED_FIELDS <= set(info)
    assert not (set(info) & PHI_FIELDS)


def test_unknown_slide_is_json_404(fake: FakeSPS, token: str) -> None:
    """An unknown slide id is a JSON 404."""
    status, _, body = call(fake, "GET", "/slides/nope/info", token=token)
    assert status == 404
    assert json.loads(body) == {"error": "unknown slide"}


def test_unknown_endpoint_is_json_404(fake: FakeSPS, token: str) -> None:
    """A path the SPS does not serve is a JSON 404 too."""
    status, _, body = call(fake, "GET", "/no/such/thing", token=token)
    assert status == 404
    assert "error" in json.loads(body)


def test_label_bytes(fake: FakeSPS, token: str) -> None:
    """A slide's label is served as image/jpeg."""
    status, headers, body = call(fake, "GET", f"/slides/{SLIDE}/label", token=token)
    assert status == 200
    assert headers["content-type"] == ["image/jpeg"]
    assert body == b"\xff\xd8LABEL"


def test_label_204_when_none(fake: FakeSPS, token: str) -> None:
    """A slide without a label answers 204 with no body."""
    fake.add_slide("bare")
    status, _, body = call(fake, "GET", "/slides/bare/label", token=token)
    assert (status, body) == (204, b"")


def test_tile_from_dict(fake: FakeSPS, token: str) -> None:
    """A tile is served from the slide's tile dict, with the focal-plane suffix accepted."""
    status, headers, body = call(fake, "GET", f"/images/{SLIDE}_files/9/1_2_0.jpg", token=token)
    assert (status, body) == (200, b"TILE")
    assert headers["content-type"] == ["image/jpeg"]


def test_tile_from_callable(fake: FakeSPS, token: str) -> None:
    """A callable tile source is asked for (level, col, row)."""
    fake.slides[SLIDE].tiles = lambda level, col, row: f"{level}/{col}/{row}".encode()
    _, _, body = call(fake, "GET", f"/images/{SLIDE}_files/3/4_5.png", token=token)
    assert body == b"3/4/5"


def test_missing_tile_is_404(fake: FakeSPS, token: str) -> None:
    """A tile the slide does not have is a 404."""
    status, _, _ = call(fake, "GET", f"/images/{SLIDE}_files/9/7_7.jpg", token=token)
    assert status == 404


def test_single_file_download(fake: FakeSPS, token: str) -> None:
    """One file is an octet-stream with Content-Disposition and Content-Length."""
    fake.slides[SLIDE].files = [("slide.svs", b"SVS-DATA")]
    stub = StubTreq(fake.resource())
    response = success_result_of(
        stub.get(URL + f"/slides/{SLIDE}/files", headers={"Authorization": f"Bearer {token}"})
    )
    headers = response.headers
    assert response.code == 200
    assert headers.getRawHeaders(b"content-type") == [b"application/octet-stream"]
    assert headers.getRawHeaders(b"content-disposition") == [b'attachment; filename="slide.svs"']
    # The client's parser keeps Content-Length out of .headers and exposes .length.
    assert response.length == 8
    assert success_result_of(stub.content(response)) == b"SVS-DATA"


def test_multipart_download_parses_back(fake: FakeSPS, token: str) -> None:
    """Three files come as multipart/related whose parts parse back byte for byte."""
    files = [("a.dcm", b"\x00\xff\r\n--x\r\n"), ("b.dcm", b"B" * 1000), ("c.dcm", b"")]
    fake.slides[SLIDE].files = files
    status, headers, body = call(fake, "GET", f"/slides/{SLIDE}/files", token=token)
    content_type = headers["content-type"][0]
    assert status == 200 and content_type.startswith("multipart/related; boundary=")
    message = email.message_from_bytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body, policy=email.policy.HTTP
    )
    parts = [(p.get_filename(), p.get_payload(decode=True)) for p in message.iter_parts()]
    assert parts == files
    assert not message.defects


# --- results ----------------------------------------------------------------------------


def test_create_result_assigns_int_id_and_version(fake: FakeSPS, token: str) -> None:
    """POST results answers 201 with an integer id and a string versionId."""
    status, _, body = call(
        fake, "POST", f"/applications/{APP}/results", token=token, body={"slideId": SLIDE}
    )
    created = json.loads(body)
    assert status == 201
    assert isinstance(created["id"], int) and isinstance(created["versionId"], str)
    assert fake.results_for(SLIDE, APP)[0].id == created["id"]


def test_create_result_accepts_trailing_slash(fake: FakeSPS, token: str) -> None:
    """POST results/ (with a trailing slash, as [SDK-ws] sends it) works too."""
    status, _, _ = call(
        fake, "POST", f"/applications/{APP}/results/", token=token, body={"slideId": SLIDE}
    )
    assert status == 201


def test_create_invalid_result_is_400(fake: FakeSPS, token: str) -> None:
    """A result body that does not parse is a 400 naming the field."""
    status, _, body = call(
        fake, "POST", f"/applications/{APP}/results", token=token, body={"slideId": 5}
    )
    assert status == 400
    assert "slideId" in json.loads(body)["error"]


def test_put_with_current_version_gets_new_version(fake: FakeSPS, token: str) -> None:
    """PUT with the current versionId stores the result under a new versionId."""
    stored = store(fake)
    payload = {
        "slideId": SLIDE,
        "displayResult": "new",
        "id": stored.id,
        "versionId": stored.versionId,
    }
    status, _, body = call(
        fake, "PUT", f"/applications/{APP}/results/{stored.id}", token=token, body=payload
    )
    answer = json.loads(body)
    assert status == 200
    assert answer["displayResult"] == "new" and answer["versionId"] != stored.versionId
    assert fake.results[stored.id or 0].versionId == answer["versionId"]


def test_put_with_stale_version_is_409(fake: FakeSPS, token: str) -> None:
    """PUT with a stale versionId is a 409 with a JSON error naming versionId."""
    stored = store(fake)
    payload = {"slideId": SLIDE, "id": stored.id, "versionId": "stale"}
    status, _, body = call(
        fake, "PUT", f"/applications/{APP}/results/{stored.id}", token=token, body=payload
    )
    assert status == 409
    assert json.loads(body)["error"].startswith("versionId conflict: ")
    assert fake.results[stored.id or 0] == stored


def test_put_without_version_is_409(fake: FakeSPS, token: str) -> None:
    """PUT without a versionId is a conflict too."""
    stored = store(fake)
    status, _, _ = call(
        fake,
        "PUT",
        f"/applications/{APP}/results/{stored.id}",
        token=token,
        body={"slideId": SLIDE},
    )
    assert status == 409


def test_put_unknown_result_is_404(fake: FakeSPS, token: str) -> None:
    """PUT of a result id that does not exist is a 404."""
    status, _, _ = call(
        fake,
        "PUT",
        f"/applications/{APP}/results/999",
        token=token,
        body={"slideId": SLIDE, "versionId": "v"},
    )
    assert status == 404


def test_results_are_per_application(fake: FakeSPS, token: str) -> None:
    """Another application's result is invisible (404)."""
    other = fake.store_result("other-app", Result(slideId=SLIDE))
    status, _, _ = call(fake, "GET", f"/applications/{APP}/results/{other.id}", token=token)
    assert status == 404


def test_list_results_oldest_first(fake: FakeSPS, token: str) -> None:
    """The results list holds this app's results on the slide, oldest first."""
    ids = [store(fake, displayResult=str(i)).id for i in range(3)]
    fake.store_result("other-app", Result(slideId=SLIDE))
    _, _, body = call(fake, "GET", f"/applications/{APP}/results/slide/{SLIDE}", token=token)
    assert [r["id"] for r in json.loads(body)] == ids


# --- quality control and case lists -----------------------------------------------------


def test_quality_control_is_stored_with_a_new_version(fake: FakeSPS, token: str) -> None:
    """PUT qualityControl with the current versionId stores the status (200)."""
    version = fake.slides[SLIDE].info["qualityControl"]["versionId"]
    payload = {
        "applicationVersion": "1",
        "qualityControl": {"status": "QualityOk", "versionId": version},
    }
    status, _, _ = call(fake, "PUT", f"/slides/{SLIDE}/qualityControl", token=token, body=payload)
    qc = fake.slides[SLIDE].info["qualityControl"]
    assert status == 200
    assert qc["status"] == "QualityOk" and qc["versionId"] != version


def test_quality_control_with_stale_version_is_409(fake: FakeSPS, token: str) -> None:
    """PUT qualityControl with a stale versionId is a 409."""
    payload = {
        "applicationVersion": "1",
        "qualityControl": {"status": "Rejected", "versionId": "old"},
    }
    status, _, _ = call(fake, "PUT", f"/slides/{SLIDE}/qualityControl", token=token, body=payload)
    assert status == 409


def test_slide_request_images_lists_the_case(fake: FakeSPS, token: str) -> None:
    """slides/{id}/request/images/info lists the case's slides; PHI ids only on request."""
    fake.add_slide("sibling", accessionNumber="ACC-0001")
    fake.add_slide("stranger", accessionNumber="ACC-0002")
    _, _, body = call(fake, "GET", f"/slides/{SLIDE}/request/images/info", token=token)
    images = json.loads(body)
    assert [i["id"] for i in images] == [SLIDE, "sibling"]
    assert "lisSlideId" not in images[0]
    _, _, body = call(
        fake, "GET", f"/slides/{SLIDE}/request/images/info?includePHI=true", token=token
    )
    assert "lisSlideId" in json.loads(body)[0]


@pytest.mark.parametrize("param", ["accessionNumberIssuer", "accessionNumberIssuerId"])
def test_request_images_accepts_either_issuer_name(fake: FakeSPS, token: str, param: str) -> None:
    """requests/{acc}/images/info filters by issuer under either parameter name."""
    _, _, body = call(fake, "GET", f"/requests/ACC-0001/images/info?{param}=LIS", token=token)
    assert [i["id"] for i in json.loads(body)] == [SLIDE]
    status, _, _ = call(fake, "GET", f"/requests/ACC-0001/images/info?{param}=OTHER", token=token)
    assert status == 404


# --- knobs and recording ----------------------------------------------------------------


def test_requests_are_recorded(fake: FakeSPS, token: str) -> None:
    """Each request is recorded with method, path, query, headers and body."""
    call(fake, "POST", f"/applications/{APP}/results?x=1", token=token, body={"slideId": SLIDE})
    (recorded,) = fake.requests
    assert recorded.method == "POST"
    assert recorded.path == BASE_PATH + f"/applications/{APP}/results"
    assert recorded.query == {"x": ["1"]}
    assert recorded.headers["authorization"] == f"Bearer {token}"
    assert recorded.header("Content-Type") == "application/json"
    assert json.loads(recorded.body) == {"slideId": SLIDE}


def test_fail_next_answers_injected_statuses_then_recovers(fake: FakeSPS, token: str) -> None:
    """fail_next answers the next requests with its statuses, in order, then serves normally."""
    fake.fail_next = [503, 500]
    assert [call(fake, "GET", "/info", token=token)[0] for _ in range(3)] == [503, 500, 200]


def test_fail_next_429_carries_retry_after(fake: FakeSPS, token: str) -> None:
    """An injected 429 carries Retry-After when retry_after is set."""
    fake.fail_next = [429]
    fake.retry_after = "12"
    status, headers, _ = call(fake, "GET", "/info", token=token)
    assert status == 429
    assert headers["retry-after"] == ["12"]


def test_hang_next_never_answers(fake: FakeSPS, token: str) -> None:
    """hang_next leaves the request unanswered (but recorded)."""
    fake.hang_next = 1
    stub = StubTreq(fake.resource())
    d = stub.get(URL + "/info", headers={"Authorization": f"Bearer {token}"})
    no_result(d)
    assert len(fake.requests) == 1 and len(fake.hanging) == 1
