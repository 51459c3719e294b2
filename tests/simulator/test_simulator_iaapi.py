"""The simulator's IA-API extras: its /info version, a multichannel slide, button presses."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
from conftest import success_result_of
from PIL import Image
from treq.testing import StubTreq
from twisted.internet.defer import ensureDeferred
from twisted.python import usage

from dpatia_daemon.models import Result, ResultData, ResultPayload
from dpatia_daemon.simulator.buttons import actions_of, pressed
from dpatia_daemon.simulator.channels import SLIDE_ID, add_multichannel
from dpatia_daemon.simulator.fake import BASE_PATH
from dpatia_daemon.simulator.slides import SlideSet
from dpatia_daemon.simulator.tap import Options
from dpatia_daemon.simulator.testing import memory_simulator, small_slide_set

BASE = "http://sps.test" + BASE_PATH


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> SlideSet:
    return small_slide_set(tmp_path_factory.getbasetemp() / "sps-slides")


def _get(sim: Any, path: str) -> tuple[int, bytes]:
    client = StubTreq(sim.sps.resource())
    token = sim.sps.issue_token()
    response = success_result_of(
        client.get(BASE + path, headers={"Authorization": [f"Bearer {token}"]})
    )
    return response.code, success_result_of(response.content())


def test_api_version_option_and_its_check() -> None:
    """--api-version sets the version /info reports; junk is a usage error."""
    options = Options()
    options.parseOptions(["--api-version", "1.9"])
    assert options.config.api_version == "1.9"
    with pytest.raises(usage.UsageError, match="api-version"):
        Options().parseOptions(["--api-version", "new"])


def test_the_multichannel_slide_serves_one_image_per_optical_path(slides: SlideSet) -> None:
    """sim-fluo-1 lists three optical paths; each serves its own tile; others are 404."""
    sim = memory_simulator(slides)
    assert add_multichannel(sim, slides) == SLIDE_ID
    info = sim.sps.slides[SLIDE_ID].info
    paths = [p["id"] for p in info["opticalPaths"]]
    assert paths == ["DAPI", "FITC", "TRITC"]
    level = 9
    images = []
    for path in paths:
        code, body = _get(sim, f"/images/{SLIDE_ID}_files/{level}/0_0_0.jpg?opticalPath={path}")
        assert code == 200
        images.append(np.asarray(Image.open(io.BytesIO(body)).convert("L")).astype(int))
    assert images[0].shape == images[1].shape
    assert np.abs(images[0] - images[1]).mean() > 1  # the channels differ
    code, body = _get(sim, f"/images/{SLIDE_ID}_files/{level}/0_0_0.jpg")
    assert code == 200  # no path named: the first
    code, _ = _get(sim, f"/images/{SLIDE_ID}_files/{level}/0_0_0.jpg?opticalPath=Cy5")
    assert code == 404


def test_a_press_sets_only_that_buttons_state() -> None:
    """pressed() is the modify input: the named action's state 1, the others 0."""
    result = Result(
        slideId="s",
        id=4,
        versionId="v",
        data=ResultData(
            result=ResultPayload(
                type="patchCollection",
                content={
                    "patches": [],
                    "tags": ["a"],
                    "actions": [
                        {"id": "ok", "state": 0, "name": "OK", "tooltip": ""},
                        {"id": "redo", "state": 0, "name": "Redo", "tooltip": "again"},
                    ],
                },
            )
        ),
    )
    assert [a["id"] for a in actions_of(result)] == ["ok", "redo"]
    body = pressed(result, "redo")
    assert [a["state"] for a in body["data"]["result"]["content"]["actions"]] == [0, 1]
    with pytest.raises(KeyError):
        pressed(result, "nope")
    assert actions_of(Result(slideId="s")) == []


def test_the_driver_sends_a_press_as_a_modify(slides: SlideSet) -> None:
    """driver.press: POST {app} with action modify and the pressed result as input."""
    seen: list[Any] = []

    from klein import Klein

    app = Klein()

    @app.route("/app", methods=["POST"])
    def invoked(request: Any) -> bytes:
        import json

        seen.append(json.loads(request.content.read()))
        request.setHeader(b"content-type", b"application/json")
        return b"{}"

    sim = memory_simulator(slides, http=StubTreq(app.resource()))
    sim.driver.app_url = "http://app.test/app"
    slide = slides.slides[0].slide_id
    stored = sim.sps.store_result(
        "dpatia",
        Result(
            slideId=slide,
            data=ResultData(
                result=ResultPayload(
                    type="patchCollection",
                    content={"actions": [{"id": "go", "state": 0, "name": "Go", "tooltip": ""}]},
                )
            ),
        ),
    )
    answer = success_result_of(ensureDeferred(sim.driver.press(slide, stored.id or 0, "go")))
    assert answer.ok
    [body] = seen
    assert body["action"] == "modify" and body["input"]["id"] == stored.id
    assert body["input"]["data"]["result"]["content"]["actions"][0]["state"] == 1
    state = sim.state()
    [listed] = [s for s in state["slides"] if s["id"] == slide]
    assert listed["results"][0]["actions"] == [{"id": "go", "name": "Go", "tooltip": ""}]
