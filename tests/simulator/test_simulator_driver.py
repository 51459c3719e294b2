"""The driver (what the SPS sends an app), result overlays, and the simulator's options,
all in memory."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from conftest import failure_result_of, success_result_of
from PIL import Image
from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.python import usage
from twisted.web.resource import Resource

from dpatia_daemon.models import result_from_json
from dpatia_daemon.simulator.driver import DriverError
from dpatia_daemon.simulator.fake import PHI_FIELDS
from dpatia_daemon.simulator.overlay import render_result_png, shapes_of
from dpatia_daemon.simulator.server import SimulatorConfig
from dpatia_daemon.simulator.slides import SlideSet
from dpatia_daemon.simulator.tap import Options
from dpatia_daemon.simulator.testing import memory_simulator, small_slide_set


@pytest.fixture(scope="session")
def slide_set(tmp_path_factory: pytest.TempPathFactory) -> SlideSet:
    """The small stock slides, generated once per session (later modules reuse them)."""
    return small_slide_set(tmp_path_factory.getbasetemp() / "sps-slides")


class FakeApp(Resource):
    """An IA-API app that records what it is sent and answers like dpatia."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.received: list[tuple[str, str, Any]] = []

    def render(self, request: Any) -> bytes:
        path = request.path.decode()
        body = request.content.read()
        self.received.append((request.method.decode(), path, json.loads(body) if body else None))
        request.setHeader(b"content-type", b"application/json")
        if request.method == b"GET":
            return json.dumps(
                {
                    "applicationId": "my-app",
                    "displayName": "Mine",
                    "manufacturer": "me",
                    "url": "http://app.test/registered",
                    "inputTemplate": {"type": "wholeSlide"},
                    "context": {"gallery": False},
                }
            ).encode()
        if path.endswith("/imagenotification"):
            return b"{}"
        action = json.loads(body)["action"]
        return b"[]" if action == "cancel" else json.dumps({"slideId": "x", "id": 1}).encode()


@pytest.fixture
def app() -> FakeApp:
    return FakeApp()


@pytest.fixture
def sim(slide_set: SlideSet, app: FakeApp) -> Any:
    simulator = memory_simulator(slide_set, http=StubTreq(app))
    yield simulator
    simulator.tiles.close()


def test_register_then_invocations_go_to_the_registered_url(sim: Any, app: FakeApp) -> None:
    """After registration, invocations go to its url with its applicationId and context,
    and carry a callback token the simulated SPS accepts."""
    registration = success_result_of(sim.driver.register("http://app.test/reg"))
    assert registration["applicationId"] == "my-app"
    answer = success_result_of(sim.driver.create("sim-colon-1"))
    assert answer.status == 200 and answer.ok
    method, path, body = app.received[-1]
    assert (method, path) == ("POST", "/registered")
    assert body["action"] == "create" and body["applicationId"] == "my-app"
    assert body["context"] == {"gallery": False}
    assert body["input"] == {"type": "wholeSlide"}
    assert body["callbackInfo"]["url"] == sim.driver.callback_url
    assert body["callbackInfo"]["token"] in sim.sps.tokens


def test_cancel_repeats_the_cancellation_token_of_the_create(sim: Any, app: FakeApp) -> None:
    """A cancel carries the cancellationToken its slide's create carried; the answer is []."""
    sim.driver.app_url = "http://app.test/dpatia"
    success_result_of(sim.driver.create("sim-colon-2"))
    created = app.received[-1][2]
    answer = success_result_of(sim.driver.cancel("sim-colon-2"))
    cancel = app.received[-1][2]
    assert answer.body == []
    assert cancel["action"] == "cancel" and "input" not in cancel
    assert cancel["cancellationToken"] == created["cancellationToken"]


def test_notification_carries_the_phi_free_slide_info(
    sim: Any, app: FakeApp, slide_set: SlideSet
) -> None:
    """newImageFiles goes to {url}/imagenotification with imageInfo = the slide's info
    without PHI, and the app's {} comes back."""
    sim.driver.app_url = "http://app.test/dpatia/"
    answer = success_result_of(sim.driver.notify("sim-breast-1"))
    method, path, body = app.received[-1]
    assert (answer.status, answer.body) == (200, {})
    assert path == "/dpatia/imagenotification"
    assert body["action"] == "newImageFiles"
    info = slide_set.get("sim-breast-1").info
    assert body["imageInfo"] == {k: v for k, v in info.items() if k not in PHI_FIELDS}
    assert body["imageInfo"]["staining"] == {"displayName": "Ki-67"}


def test_unknown_slide_and_no_app_are_driver_errors(sim: Any) -> None:
    """Invocations need an app URL and a known slide."""
    failure_result_of(sim.driver.create("sim-colon-1"), DriverError)
    sim.driver.app_url = "http://app.test/dpatia"
    failure_result_of(sim.driver.create("no-such-slide"), DriverError)


def test_control_api_actions_use_the_driver(sim: Any, app: FakeApp) -> None:
    """POST /ui/slides/{id}/notify sends the notification and returns the app's answer."""
    sim.driver.app_url = "http://app.test/dpatia"
    stub = StubTreq(sim.resource())
    response = success_result_of(stub.post("http://sps.test/ui/slides/sim-colon-1/notify", json={}))
    assert response.code == 200
    assert json.loads(success_result_of(stub.content(response))) == {"status": 200, "body": {}}
    unknown = success_result_of(stub.post("http://sps.test/ui/slides/sim-colon-1/explode", json={}))
    assert unknown.code == 404
    events = json.loads(
        success_result_of(stub.content(success_result_of(stub.get("http://sps.test/ui/state"))))
    )["log"]
    assert [e["action"] for e in events] == ["notify"]


class RegionApp(FakeApp):
    """A taggedPolygon app: each create answers a new result id."""

    def render(self, request: Any) -> bytes:
        if request.method == b"GET":
            path = request.path.decode()
            self.received.append(("GET", path, None))
            request.setHeader(b"content-type", b"application/json")
            return json.dumps(
                {
                    "applicationId": "regions",
                    "displayName": "Regions",
                    "manufacturer": "me",
                    "url": "http://app.test/regions",
                    "inputTemplate": {"type": "taggedPolygon", "content": {"tags": ["Tumour"]}},
                }
            ).encode()
        answer = super().render(request)
        body = self.received[-1][2]
        if body and body.get("action") == "create":
            creates = sum(1 for r in self.received if r[2] and r[2].get("action") == "create")
            return json.dumps({"slideId": body["slideId"], "id": 100 + creates}).encode()
        return answer


def test_a_region_app_gets_region_creates_and_each_result_its_own_cancel(
    slide_set: SlideSet,
) -> None:
    """For a taggedPolygon registration a create sends the region given (or the slide's
    centre) as a taggedPolygon with the registration's tags; a cancel of a result
    carries the cancellationToken of the create that made it; the control API takes
    ``region`` and ``resultId`` and refuses malformed ones with 400."""
    app = RegionApp()
    sim = memory_simulator(slide_set, http=StubTreq(app))
    try:
        success_result_of(sim.driver.register("http://app.test/reg"))
        assert sim.driver.input_type == "taggedPolygon"
        first = success_result_of(sim.driver.create("sim-colon-1", region=(0.1, 0.1, 0.3, 0.2)))
        sent_first = app.received[-1][2]
        content = sent_first["input"]["content"]
        assert sent_first["input"]["type"] == "taggedPolygon"
        assert content["polygon"]["points"][0] == {"x": 0.1, "y": 0.1}
        assert content["polygon"]["points"][2] == {"x": 0.3, "y": 0.2}
        assert (content["tags"], content["tagIndex"]) == (["Tumour"], 0)
        stub = StubTreq(sim.resource())
        response = success_result_of(
            stub.post("http://sps.test/ui/slides/sim-colon-1/create", json={})
        )
        assert response.code == 200
        sent_second = app.received[-1][2]
        size = slide_set.get("sim-colon-1").info["imageSize"]
        centre = sent_second["input"]["content"]["polygon"]["points"][0]
        assert centre == {"x": 0.25, "y": 0.25 * size["height"] / size["width"]}
        assert sent_second["cancellationToken"] != sent_first["cancellationToken"]
        # A cancel of the first result carries the first create's token, not the last's.
        response = success_result_of(
            stub.post(
                "http://sps.test/ui/slides/sim-colon-1/cancel",
                json={"resultId": first.body["id"]},
            )
        )
        assert response.code == 200
        assert app.received[-1][2]["cancellationToken"] == sent_first["cancellationToken"]
        for bad in ({"region": [0.3, 0.1, 0.1, 0.2]}, {"region": "all"}, {"resultId": "1"}):
            action = "cancel" if "resultId" in bad else "create"
            response = success_result_of(
                stub.post(f"http://sps.test/ui/slides/sim-colon-1/{action}", json=bad)
            )
            assert response.code == 400, bad
    finally:
        sim.tiles.close()


def test_token_endpoint_of_the_control_api(sim: Any) -> None:
    """POST /ui/token issues a token the callback API accepts."""
    stub = StubTreq(sim.resource())
    answer = json.loads(
        success_result_of(
            stub.content(
                success_result_of(stub.post("http://sps.test/ui/token", json={"lifetime": 5}))
            )
        )
    )
    assert answer["token"] in sim.sps.tokens
    clock: Clock = sim.sps.clock
    clock.advance(5)
    info = success_result_of(
        stub.get(
            sim.driver.callback_url.replace("http://sps.test", "http://sps.test") + "/info",
            headers={"Authorization": f"Bearer {answer['token']}"},
        )
    )
    assert info.code == 401


# --- overlays --------------------------------------------------------------------------


def primitive(content: Any) -> dict[str, Any]:
    return {
        "slideId": "s",
        "displayResult": "r",
        "data": {"result": {"type": "primitive", "content": content}},
    }


def test_shapes_accept_both_primitive_forms() -> None:
    """A list of items and a single item object give the same shapes."""
    item = {
        "style": {"strokeStyle": "#FF0000", "fillStyle": "#00FF00", "size": 3},
        "polygons": [{"points": [{"x": 0, "y": 0}, {"x": 1, "y": 0}, {"x": 1, "y": 0.5}]}],
        "polylines": [{"points": [{"x": 0.1, "y": 0.1}, {"x": 0.2, "y": 0.2}]}],
        "labels": [{"location": {"x": 0.5, "y": 0.25}, "label": "hello"}],
    }
    listed, single = shapes_of(primitive([item])), shapes_of(primitive(item))
    assert listed == single
    assert [s.kind for s in listed] == ["polygon", "polyline", "label"]
    assert listed[0].fill == "#00FF00" and listed[0].width == 3 and listed[1].fill is None
    assert listed[2].text == "hello" and listed[2].points == [(0.5, 0.25)]


def test_shapes_skip_malformed_parts_and_unsafe_colours() -> None:
    """Bad points, unknown types and markup in colours are ignored, not fatal."""
    item = {
        "style": {"strokeStyle": '"><script>', "fillStyle": "url(javascript:1)"},
        "polygons": [
            {"points": [{"x": "a", "y": 0}, {"x": 0, "y": 0}, {"x": 1, "y": 1}]},
            {"points": "nope"},
        ],
        "labels": ["x", {"location": None, "label": "y"}],
    }
    (shape,) = shapes_of(primitive([item, 5]))
    assert shape.points == [(0.0, 0.0), (1.0, 1.0)]
    assert shape.stroke == "#00FF00" and shape.fill is None
    assert shapes_of({"data": {"result": {"type": "heatmap"}}}) == []
    assert shapes_of(None) == [] and shapes_of({"slideId": "s"}) == []


def test_patch_collection_patches_become_squares_by_tag() -> None:
    """patchCollection polygons and patches (sized by patchSize in pixels) are drawn."""
    result = {
        "data": {
            "result": {
                "type": "patchCollection",
                "content": {
                    "polygons": [
                        {"points": [{"x": 0, "y": 0}, {"x": 0.5, "y": 0}, {"x": 0.5, "y": 0.5}]}
                    ],
                    "patches": [{"tag": 1, "position": {"x": 0.25, "y": 0.25}}],
                    "patchSize": 100,
                    "tags": ["a", "b"],
                },
            }
        }
    }
    polygon, patch = shapes_of(result, image_width=1000)
    assert polygon.kind == "polygon" and patch.kind == "patch"
    assert patch.points[0] == pytest.approx((0.2, 0.2)) and patch.points[2] == pytest.approx(
        (0.3, 0.3)
    )


def test_render_result_png_draws_the_polygon_where_it_belongs(tmp_path: Any) -> None:
    """The PNG has the filled polygon at its width-normalised place and a caption."""
    base = Image.new("RGB", (400, 200), (255, 255, 255))
    square = [
        {"x": x, "y": y} for x, y in ((0.25, 0.125), (0.75, 0.125), (0.75, 0.375), (0.25, 0.375))
    ]
    result = result_from_json(
        {
            **primitive(
                [
                    {
                        "style": {"strokeStyle": "#0000FF", "fillStyle": "#0000FF"},
                        "polygons": [{"points": square}],
                    }
                ]
            ),
            "displayProperties": {"Area": "1 mm²"},
        }
    )
    out = render_result_png(base, result, tmp_path / "o.png", title="slide")
    pixels = np.asarray(Image.open(tmp_path / "o.png").convert("RGB")).astype(int)
    assert out.size[0] == 400 and out.size[1] > 200  # caption strip below
    assert pixels[100, 200, 2] > pixels[100, 200, 0] + 60  # inside: blue
    assert tuple(pixels[20, 20]) == (255, 255, 255)  # outside: untouched
    assert pixels[50, 200, 2] > 200 and pixels[50, 200, 0] < 60  # the outline at y = 0.125 * 400


def test_render_result_png_draws_the_other_regions_too() -> None:
    """With ``others`` (the other regions' results) every result is drawn."""
    base = Image.new("RGB", (400, 200), (255, 255, 255))

    def square(x: float, colour: str) -> Any:
        corners = ((0, 0), (0.1, 0), (0.1, 0.1), (0, 0.1))
        points = [{"x": x + dx, "y": 0.1 + dy} for dx, dy in corners]
        style = {"strokeStyle": colour, "fillStyle": colour}
        return result_from_json(primitive([{"style": style, "polygons": [{"points": points}]}]))

    out = render_result_png(base, square(0.1, "#0000FF"), others=[square(0.6, "#FF0000")])
    pixels = np.asarray(out.convert("RGB")).astype(int)
    assert pixels[60, 60, 2] > pixels[60, 60, 0] + 60  # the latest: blue at x 0.15
    assert pixels[60, 260, 0] > pixels[60, 260, 2] + 60  # the other region: red at x 0.65


# --- options -----------------------------------------------------------------------------


def test_options_build_the_whole_config() -> None:
    """Every option lands in the frozen config."""
    options = Options()
    options.parseOptions(
        [
            "--listen", "tcp:0", "--data", "/d", "--scale", "0.5", "--app-url", "http://a/dpatia",
            "--latency", "0.2", "--error-rate", "0.1", "--seed", "3", "--drop-download-after", "1000",
            "--drop-downloads", "2", "--token-lifetime", "60", "--down-after", "5", "--down-for", "10",
            "--down-mode", "refuse", "--public-url", "http://sps.example:8086",
        ]
    )  # fmt: skip
    assert options.config == SimulatorConfig(
        listen="tcp:0",
        data="/d",
        scale=0.5,
        public_url="http://sps.example:8086",
        app_url="http://a/dpatia",
        latency=0.2,
        error_rate=0.1,
        seed=3,
        drop_after_bytes=1000,
        drop_count=2,
        token_lifetime=60.0,
        down_after=5.0,
        down_for=10.0,
        down_mode="refuse",
    )
    faults = options.config.faults()
    assert (faults.latency, faults.error_rate, faults.drop_after_bytes) == (0.2, 0.1, 1000)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--error-rate", "2"], "--error-rate: must be between 0 and 1"),
        (["--latency", "soon"], "--latency: 'soon' is not a number"),
        (["--down-mode", "sulk"], "--down-mode: use one of 503, refuse"),
        (["--drop-download-after", "1.5"], "--drop-download-after: '1.5' is not a whole number"),
    ],
)
def test_bad_options_are_usage_errors(args: list[str], message: str) -> None:
    """A bad value is a UsageError naming the option."""
    with pytest.raises(usage.UsageError, match=message):
        Options().parseOptions(args)


def test_cli_help_and_bad_usage() -> None:
    """The command line rejects unknown commands with status 2."""
    from dpatia_daemon.simulator.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        main(["frobnicate"])
    assert exit_info.value.code == 2
    assert main(["serve", "--error-rate", "7"]) == 2
