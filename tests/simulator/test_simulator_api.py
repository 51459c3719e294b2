"""The simulator's callback API over generated slides, in memory (StubTreq, task.Clock):
tiles from the real pyramid, downloads, results, tokens, PHI, labels, fault injection."""

from __future__ import annotations

import email
import email.policy
import io
import json
import random
from typing import Any

import numpy as np
import openslide
import pytest
import tifffile
from conftest import failure_result_of, no_result, success_result_of
from PIL import Image
from treq.testing import StubTreq
from twisted.internet.task import Clock

from dpatia_daemon.models import Result
from dpatia_daemon.pipeline.dzi import DZI
from dpatia_daemon.simulator.fake import BASE_PATH
from dpatia_daemon.simulator.faults import Faults
from dpatia_daemon.simulator.server import Simulator
from dpatia_daemon.simulator.slides import SlideSet
from dpatia_daemon.simulator.testing import memory_simulator, small_slide_set

URL = "http://sps.test" + BASE_PATH
APP = "dpatia"


@pytest.fixture(scope="session")
def slide_set(tmp_path_factory: pytest.TempPathFactory) -> SlideSet:
    """The small stock slides, generated once per session (later modules reuse them)."""
    return small_slide_set(tmp_path_factory.getbasetemp() / "sps-slides")


@pytest.fixture
def sim(slide_set: SlideSet) -> Any:
    simulator = memory_simulator(slide_set)
    yield simulator
    simulator.tiles.close()


def get(
    sim: Simulator, path: str, token: str | None = None, **kwargs: Any
) -> tuple[int, dict[str, list[str]], bytes]:
    """One GET through StubTreq; status, headers (lower-case), body."""
    stub = StubTreq(sim.resource())
    headers = dict(kwargs.pop("headers", {}))
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    d = stub.request(kwargs.pop("method", "GET"), URL + path, headers=headers, **kwargs)
    stub.flush()  # streamed answers (NOT_DONE_YET) need pumping
    response = success_result_of(d)
    content = stub.content(response)
    stub.flush()
    body = success_result_of(content)
    raw = {
        k.decode().lower(): [v.decode() for v in vs]
        for k, vs in response.headers.getAllRawHeaders()
    }
    if response.length is not None and response.length != -1 and "content-length" not in raw:
        raw["content-length"] = [str(response.length)]
    return response.code, raw, body


def size_of(slide_set: SlideSet, slide_id: str) -> tuple[int, int]:
    size = slide_set.get(slide_id).info["imageSize"]
    return size["width"], size["height"]


# --- tiles --------------------------------------------------------------------------------


def test_tiles_at_pyramid_levels_are_the_stored_pixels(sim: Simulator, slide_set: SlideSet) -> None:
    """A PNG tile of a DZI level that is a pyramid level equals the stored pixels exactly,
    and a JPEG tile matches OpenSlide's read of the same region within JPEG tolerance."""
    token = sim.sps.issue_token()
    for slide in slide_set.slides:
        width, height = size_of(slide_set, slide.slide_id)
        dzi = DZI(width, height)
        path = str(slide_set.path(slide.tiff))
        with tifffile.TiffFile(path) as tif, openslide.OpenSlide(path) as osr:
            for k in range(osr.level_count):
                level = dzi.max_level - k
                cols, rows = dzi.tile_grid(level)
                stored = tif.pages[k].asarray()
                for col, row in {(0, 0), (cols // 2, rows // 2), (cols - 1, rows - 1)}:
                    rect = dzi.tile_rect(level, col, row)
                    status, headers, body = get(
                        sim, f"/images/{slide.slide_id}_files/{level}/{col}_{row}_0.png", token
                    )
                    assert status == 200 and headers["content-type"] == ["image/png"]
                    png = np.asarray(Image.open(io.BytesIO(body)).convert("RGB"))
                    assert png.shape == (rect.height, rect.width, 3)
                    assert np.array_equal(png, stored[rect.y : rect.bottom, rect.x : rect.right])

                    status, headers, body = get(
                        sim, f"/images/{slide.slide_id}_files/{level}/{col}_{row}.jpg", token
                    )
                    assert status == 200 and headers["content-type"] == ["image/jpeg"]
                    jpeg = np.asarray(Image.open(io.BytesIO(body)).convert("RGB")).astype(int)
                    ds = osr.level_downsamples[k]
                    region = osr.read_region(
                        (round(rect.x * ds), round(rect.y * ds)), k, (rect.width, rect.height)
                    )
                    reference = np.asarray(region.convert("RGB")).astype(int)
                    assert jpeg.shape == reference.shape
                    assert np.abs(jpeg - reference).mean() < 4.0


def test_tiles_above_the_pyramid_are_downsampled(sim: Simulator, slide_set: SlideSet) -> None:
    """Levels coarser than the smallest pyramid level exist down to 1×1, and look like it."""
    token = sim.sps.issue_token()
    slide = slide_set.slides[0]
    width, height = size_of(slide_set, slide.slide_id)
    dzi = DZI(width, height)
    with openslide.OpenSlide(str(slide_set.path(slide.tiff))) as osr:
        smallest = np.asarray(
            osr.read_region((0, 0), osr.level_count - 1, osr.level_dimensions[-1]).convert("RGB")
        )
        coarse = dzi.max_level - osr.level_count  # one level above the pyramid
    status, _, body = get(sim, f"/images/{slide.slide_id}_files/{coarse}/0_0.png", token)
    tile = np.asarray(Image.open(io.BytesIO(body)).convert("RGB"))
    rect = dzi.tile_rect(coarse, 0, 0)
    assert status == 200 and (tile.shape[1], tile.shape[0]) == (rect.width, rect.height)
    reduced = np.asarray(Image.fromarray(smallest).reduce(2))
    assert reduced.shape[1::-1] == dzi.level_size(coarse)
    assert np.array_equal(tile, reduced[: rect.height, : rect.width])
    status, _, body = get(sim, f"/images/{slide.slide_id}_files/0/0_0.jpg", token)
    assert status == 200 and Image.open(io.BytesIO(body)).size == (1, 1)


def test_level_count_and_edge_tiles_follow_dzi(sim: Simulator, slide_set: SlideSet) -> None:
    """Every level of dzi.py is served with cropped edge tiles; one past the edge is 404."""
    token = sim.sps.issue_token()
    slide = next(s for s in slide_set.slides if s.info["imageSize"]["width"] % 256)
    width, height = size_of(slide_set, slide.slide_id)
    dzi = DZI(width, height)
    for level in range(dzi.level_count):
        cols, rows = dzi.tile_grid(level)
        rect = dzi.tile_rect(level, cols - 1, rows - 1)
        status, _, body = get(
            sim, f"/images/{slide.slide_id}_files/{level}/{cols - 1}_{rows - 1}.png", token
        )
        assert status == 200
        assert Image.open(io.BytesIO(body)).size == (rect.width, rect.height)
        assert get(sim, f"/images/{slide.slide_id}_files/{level}/{cols}_0.jpg", token)[0] == 404
        assert get(sim, f"/images/{slide.slide_id}_files/{level}/0_{rows}.jpg", token)[0] == 404
    assert get(sim, f"/images/{slide.slide_id}_files/{dzi.max_level + 1}/0_0.jpg", token)[0] == 404


def test_tile_options_outside_the_scanner_are_404(sim: Simulator, slide_set: SlideSet) -> None:
    """Another focal plane, optical path or extension is a JSON 404."""
    token = sim.sps.issue_token()
    slide_id = slide_set.slides[0].slide_id
    for path in (
        f"/images/{slide_id}_files/5/0_0_3.jpg",
        f"/images/{slide_id}_files/5/0_0.gif",
        f"/images/{slide_id}_files/5/0_0.jpg?opticalPath=2",
    ):
        status, _, body = get(sim, path, token)
        assert status == 404 and "error" in json.loads(body)


def test_tiles_are_cached(sim: Simulator, slide_set: SlideSet) -> None:
    """A tile asked twice is rendered once."""
    token = sim.sps.issue_token()
    slide_id = slide_set.slides[0].slide_id
    calls: list[Any] = []
    run = sim.tiles.run
    sim.tiles.run = lambda f, *a: (calls.append(f), run(f, *a))[1]
    first = get(sim, f"/images/{slide_id}_files/8/0_0.jpg", token)[2]
    second = get(sim, f"/images/{slide_id}_files/8/0_0.jpg", token)[2]
    assert first == second and len(calls) == 1


# --- files ---------------------------------------------------------------------------------


def test_single_file_download_headers_and_bytes(sim: Simulator, slide_set: SlideSet) -> None:
    """A single-file slide downloads as octet-stream with filename and Content-Length."""
    slide = next(s for s in slide_set.slides if s.layout == "single")
    on_disk = slide_set.path(slide.tiff).read_bytes()
    status, headers, body = get(sim, f"/slides/{slide.slide_id}/files", sim.sps.issue_token())
    assert status == 200
    assert headers["content-type"] == ["application/octet-stream"]
    assert headers["content-disposition"] == [f'attachment; filename="{slide.slide_id}.tif"']
    assert headers["content-length"] == [str(len(on_disk))]
    assert body == on_disk


def test_multipart_download_reassembles_to_the_files_on_disk(
    sim: Simulator, slide_set: SlideSet
) -> None:
    """A folder slide downloads as multipart/related whose parts are the files on disk."""
    slide = next(s for s in slide_set.slides if s.layout == "folder")
    status, headers, body = get(sim, f"/slides/{slide.slide_id}/files", sim.sps.issue_token())
    content_type = headers["content-type"][0]
    assert status == 200 and content_type.startswith("multipart/related; boundary=")
    assert headers["content-length"] == [str(len(body))]
    message = email.message_from_bytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body, policy=email.policy.HTTP
    )
    parts = [(p.get_filename(), p.get_payload(decode=True)) for p in message.iter_parts()]
    assert parts == [(name, slide_set.path(path).read_bytes()) for name, path in slide.files]
    assert len(parts) >= 3 and not message.defects


def test_dropped_download_ends_short(sim: Simulator, slide_set: SlideSet) -> None:
    """With drop_after_bytes the connection closes after that many bytes: the client
    gets a short body and an error; the next download (drop_count 1) is whole."""
    slide = next(s for s in slide_set.slides if s.layout == "single")
    size = slide_set.path(slide.tiff).stat().st_size
    sim.sps.faults.drop_after_bytes, sim.sps.faults.drop_count = 100_000, 1
    token = sim.sps.issue_token()
    stub = StubTreq(sim.resource())
    d = stub.get(
        URL + f"/slides/{slide.slide_id}/files", headers={"Authorization": f"Bearer {token}"}
    )
    stub.flush()
    response = success_result_of(d)
    assert response.code == 200 and response.length == size
    received: list[bytes] = []
    collected = stub.collect(response, received.append)
    stub.flush()
    failure_result_of(collected)
    assert len(b"".join(received)) == 100_000
    assert len(get(sim, f"/slides/{slide.slide_id}/files", token)[2]) == size


# --- info, label, results, tokens ----------------------------------------------------------


def test_phi_only_with_include_phi(sim: Simulator, slide_set: SlideSet) -> None:
    """Slide info carries the accession number and UIDs only with includePHI=true."""
    token = sim.sps.issue_token()
    slide_id = slide_set.slides[0].slide_id
    plain = json.loads(get(sim, f"/slides/{slide_id}/info", token)[2])
    assert "accessionNumber" not in plain and "seriesInstanceUid" not in plain
    assert plain["imageSize"] == slide_set.slides[0].info["imageSize"]
    full = json.loads(get(sim, f"/slides/{slide_id}/info?includePHI=true&scope=extended", token)[2])
    assert full["accessionNumber"] == slide_set.slides[0].info["accessionNumber"]
    assert full["seriesInstanceUid"].startswith("2.25.") and full["bodyPart"]


def test_label_bytes_and_204_without_label(sim: Simulator, slide_set: SlideSet) -> None:
    """A slide's label is its JPEG; a slide without one answers 204."""
    token = sim.sps.issue_token()
    with_label = next(s for s in slide_set.slides if s.label)
    assert with_label.label is not None
    status, headers, body = get(sim, f"/slides/{with_label.slide_id}/label", token)
    assert (status, headers["content-type"]) == (200, ["image/jpeg"])
    assert body == slide_set.path(with_label.label).read_bytes()
    bare = next(s for s in slide_set.slides if s.label is None)
    status, _, body = get(sim, f"/slides/{bare.slide_id}/label", token)
    assert (status, body) == (204, b"")


def test_stale_version_id_is_409(sim: Simulator, slide_set: SlideSet) -> None:
    """A result stored on a generated slide gets an id and versionId; a PUT with an old
    versionId is refused with 409 and the stored result is unchanged."""
    token = sim.sps.issue_token()
    slide_id = slide_set.slides[0].slide_id
    stub = StubTreq(sim.resource())
    auth = {"Authorization": f"Bearer {token}"}
    created = success_result_of(
        stub.post(URL + f"/applications/{APP}/results", json={"slideId": slide_id}, headers=auth)
    )
    stored = json.loads(success_result_of(stub.content(created)))
    assert created.code == 201 and isinstance(stored["id"], int)
    put = {**stored, "displayResult": "v2"}
    first = success_result_of(
        stub.put(URL + f"/applications/{APP}/results/{stored['id']}", json=put, headers=auth)
    )
    assert first.code == 200
    stale = success_result_of(
        stub.put(URL + f"/applications/{APP}/results/{stored['id']}", json=put, headers=auth)
    )
    assert stale.code == 409
    assert sim.sps.results[stored["id"]].displayResult == "v2"


def test_tokens_expire_after_token_lifetime(sim: Simulator, slide_set: SlideSet) -> None:
    """With faults.token_lifetime set, issued tokens stop working after that many seconds."""
    sim.sps.faults.token_lifetime = 30
    token = sim.sps.issue_token()
    slide_id = slide_set.slides[0].slide_id
    assert get(sim, f"/slides/{slide_id}/info", token)[0] == 200
    clock: Clock = sim.sps.clock  # type: ignore[assignment]
    clock.advance(30)
    status, headers, body = get(sim, f"/slides/{slide_id}/info", token)
    assert status == 401 and json.loads(body) == {"error": "token expired"}
    assert get(sim, f"/slides/{slide_id}/info")[0] == 401


# --- fault injection -----------------------------------------------------------------------


def test_error_rate_is_a_seeded_fraction_of_5xx(sim: Simulator) -> None:
    """error_rate 0.3 with a seeded RNG fails exactly the requests that RNG picks."""
    sim.sps.faults = Faults(error_rate=0.3, rng=random.Random(7))
    token = sim.sps.issue_token()
    statuses = [get(sim, "/info", token)[0] for _ in range(200)]
    replay = random.Random(7)
    expected = []
    for _ in range(200):
        expected.append(replay.choice((500, 502, 503, 504)) if replay.random() < 0.3 else 200)
    assert statuses == expected
    assert 40 <= sum(s != 200 for s in statuses) <= 80


def test_down_window_answers_503_with_retry_after_then_recovers(sim: Simulator) -> None:
    """During a down window every call is 503 with Retry-After; afterwards all is well."""
    clock: Clock = sim.sps.clock  # type: ignore[assignment]
    token = sim.sps.issue_token()
    sim.sps.faults.go_down(clock.seconds() + 5, 20)
    assert get(sim, "/info", token)[0] == 200
    clock.advance(5)
    status, headers, _ = get(sim, "/info", token)
    assert status == 503 and headers["retry-after"] == ["20"]
    clock.advance(19.5)
    assert get(sim, "/info", token)[1]["retry-after"] == ["1"]
    clock.advance(0.5)
    assert get(sim, "/info", token)[0] == 200


def test_down_window_can_refuse_connections(sim: Simulator) -> None:
    """In refuse mode the request gets no answer at all: the connection is dropped."""
    clock: Clock = sim.sps.clock  # type: ignore[assignment]
    sim.sps.faults.go_down(clock.seconds(), 10, "refuse")
    stub = StubTreq(sim.resource())
    d = stub.get(URL + "/info", headers={"Authorization": f"Bearer {sim.sps.issue_token()}"})
    stub.flush()
    failure_result_of(d)


def test_latency_delays_answers_on_the_clock(sim: Simulator) -> None:
    """With latency 2 s nothing is answered until the clock has moved 2 s."""
    sim.sps.faults.latency = 2.0
    clock: Clock = sim.sps.clock  # type: ignore[assignment]
    stub = StubTreq(sim.resource())
    d = stub.get(URL + "/info", headers={"Authorization": f"Bearer {sim.sps.issue_token()}"})
    stub.flush()
    no_result(d)
    clock.advance(1.9)
    stub.flush()
    no_result(d)
    clock.advance(0.1)
    stub.flush()
    assert success_result_of(d).code == 200


def test_faults_are_changed_through_the_control_api(sim: Simulator) -> None:
    """POST /ui/faults sets knobs (and starts a down window); bad values are a 400."""
    stub = StubTreq(sim.resource())
    response = success_result_of(
        stub.post(
            "http://sps.test/ui/faults", json={"latency": 0.5, "errorRate": 0.1, "downFor": 3}
        )
    )
    answer = json.loads(success_result_of(stub.content(response)))
    assert response.code == 200 and answer["latency"] == 0.5 and answer["down"] is True
    assert sim.sps.faults.error_rate == 0.1
    bad = success_result_of(stub.post("http://sps.test/ui/faults", json={"errorRate": 2}))
    assert bad.code == 400


def test_state_lists_slides_and_latest_result_shapes(sim: Simulator, slide_set: SlideSet) -> None:
    """GET /ui/state has every slide, and the latest result's shapes in both content forms."""
    slide_id = slide_set.slides[0].slide_id
    polygon = {"points": [{"x": 0.1, "y": 0.1}, {"x": 0.2, "y": 0.1}, {"x": 0.2, "y": 0.2}]}
    item = {
        "style": {"strokeStyle": "#00FF00"},
        "polygons": [polygon],
        "labels": [{"location": {"x": 0.1, "y": 0.1}, "label": "T"}],
    }
    for content in (item, [item]):
        sim.sps.store_result(APP, _result(slide_id, content))
        stub = StubTreq(sim.resource())
        response = success_result_of(stub.get("http://sps.test/ui/state"))
        state = json.loads(success_result_of(stub.content(response)))
        assert [s["id"] for s in state["slides"]] == [s.slide_id for s in slide_set.slides]
        latest = state["slides"][0]["latest"]
        assert [s["kind"] for s in latest["shapes"]] == ["polygon", "label"]
        assert latest["shapes"][0]["points"][1] == [0.2, 0.1]


def test_state_lists_every_result_of_the_slide_with_its_shapes(
    sim: Simulator, slide_set: SlideSet
) -> None:
    """A region app's results on one slide are all in the state, oldest first, each
    with its own shapes (the page draws them all); the latest is still the newest."""
    slide_id = slide_set.slides[0].slide_id

    def square(x: float) -> dict[str, Any]:
        points = [{"x": x, "y": 0.1}, {"x": x + 0.1, "y": 0.1}, {"x": x + 0.1, "y": 0.2}]
        return {"style": {"strokeStyle": "#00FF00"}, "polygons": [{"points": points}]}

    first = sim.sps.store_result(APP, _result(slide_id, [square(0.1)]))
    second = sim.sps.store_result(APP, _result(slide_id, [square(0.5)]))
    stub = StubTreq(sim.resource())
    response = success_result_of(stub.get("http://sps.test/ui/state"))
    state = json.loads(success_result_of(stub.content(response)))
    (slide,) = [s for s in state["slides"] if s["id"] == slide_id]
    assert [r["id"] for r in slide["results"]] == [first.id, second.id]
    assert [r["shapes"][0]["points"][0] for r in slide["results"]] == [[0.1, 0.1], [0.5, 0.1]]
    assert slide["latest"]["id"] == second.id and slide["resultCount"] == 2
    assert state["app"]["inputType"] == "wholeSlide"


def _result(slide_id: str, content: Any) -> Result:
    from dpatia_daemon.models import result_from_json

    return result_from_json(
        {
            "slideId": slide_id,
            "displayResult": "r",
            "data": {"result": {"type": "primitive", "content": content}},
        }
    )


def test_page_embeds_the_state(sim: Simulator) -> None:
    """GET / is the HTML page with the state embedded and no external resources."""
    stub = StubTreq(sim.resource())
    response = success_result_of(stub.get("http://sps.test/"))
    html = success_result_of(stub.content(response)).decode()
    assert response.code == 200 and "<svg" not in html.split("<script")[0]
    assert '"callbackUrl"' in html and "sim-colon-1" in html
    assert "<link" not in html and 'src="http' not in html and "@import" not in html
