"""``[app] on_action``: a patchCollection button press runs a callable in a worker.

The front door's routes on loopback, a real directory spool, one real worker process
and a fake SPS on loopback.  A modify whose result has an action with ``state == 1``
is answered at once (the state reset to 0, nothing stored); with ``on_action`` it also
becomes a job whose answer replaces the pressed result at the SPS.  Waits are on
supervisor events with a bounded timeout.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
from live_stack import start_live_stack

from dpatia_daemon.config import Config
from dpatia_daemon.jobs import JobKind
from dpatia_daemon.models import Result, ResultData, ResultPayload, unstructure
from dpatia_daemon.simulator.fake import FakeSPS
from dpatia_daemon.spool import DirectorySpool
from dpatia_daemon.sps.results import CONTEXT_KEY
from dpatia_daemon.workers.supervisor import SupervisorEvent

pytestmark = pytest.mark.integration

SLIDE = "slide-buttons"


@attrs.define
class Rig:
    reactor: Any
    url: str
    callback: str
    fake: FakeSPS
    spool: DirectorySpool
    client: Any
    events: list[SupervisorEvent] = attrs.field(factory=list)

    async def modify(self, result: Result) -> tuple[int, Any]:
        body = {
            "action": "modify",
            "applicationId": "dpatia",
            "slideId": SLIDE,
            "callbackInfo": {"url": self.callback, "token": self.fake.issue_token()},
            "context": {},
            "cancellationToken": "ct-press",
            "input": unstructure(result),
        }
        response = await self.client.post(
            self.url + "/dpatia",
            json.dumps(body).encode(),
            headers={"Content-Type": ["application/json"]},
        )
        return response.code, json.loads(await response.content())


def _gallery(fake: FakeSPS) -> Result:
    """A stored patchCollection whose 'retag' button was just pressed (state 1)."""
    content = {
        "description": "",
        "polygons": [],
        "patches": [
            {"tag": 0, "position": {"x": 0.1 * i, "y": 0.05}, "sortKeyValue": 0.0}
            for i in range(1, 4)
        ],
        "tags": ["tumour", "stroma"],
        "patchSize": 256,
        "magnification": 20.0,
        "statuses": {"allowVerify": {"value": True, "message": ""}},
        "actions": [{"id": "retag", "state": 0, "name": "Re-tag", "tooltip": "all as stroma"}],
    }
    stored = fake.store_result(
        "dpatia",
        Result(
            slideId=SLIDE,
            displayResult="3 patches",
            data=ResultData(
                context={CONTEXT_KEY: {"jobId": "j0", "status": "Done", "key": "k" * 64}},
                result=ResultPayload(type="patchCollection", content=content),
            ),
        ),
    )
    assert stored.data.result is not None
    pressed = json.loads(json.dumps(unstructure(stored)))
    pressed["data"]["result"]["content"]["actions"][0]["state"] = 1
    from dpatia_daemon.models import result_from_json

    return result_from_json(pressed)


async def _rig(reactor: Any, tmp_path: Path, on_action: str) -> Any:
    app = attrs.evolve(Config().app, on_action=on_action)
    stack = start_live_stack(
        reactor, tmp_path, SLIDE, count=1, analysis="tests.analyses_for_tests:noop", app=app
    )
    rig = Rig(
        reactor=reactor,
        url=stack.url,
        callback=stack.callback,
        fake=stack.fake,
        spool=stack.spool,
        client=stack.client,
    )
    stack.supervisor.observe(rig.events.append)
    stack.supervisor.startService()
    return rig, stack.supervisor, stack.stop


@pytest_twisted.ensureDeferred
async def test_a_button_press_runs_on_action_and_stores_its_updated_result(
    reactor: Any, tmp_path: Path
) -> None:
    """Round trip: the press is acknowledged at once (state back to 0, nothing stored),
    becomes an action job, and the callable's answer replaces the pressed result (same
    id, new content, the callable's applicationVersion, the original key kept)."""
    rig, supervisor, stop = await _rig(reactor, tmp_path, "tests.actions_for_tests:press")
    try:
        pressed = _gallery(rig.fake)
        assert pressed.id is not None
        done = rig.fake.next_stored(
            lambda r: r.id == pressed.id and r.displayResult == "pressed retag"
        )
        code, answer = await rig.modify(pressed)
        assert code == 200, answer
        assert answer["data"]["result"]["content"]["actions"][0]["state"] == 0
        (job,) = await rig.spool.find(slide_id=SLIDE)
        assert job.kind is JobKind.ACTION and job.result_id == pressed.id
        stored = await done.addTimeout(30, reactor)
        assert stored.applicationVersion == "press-1"
        content = stored.data.result.content  # type: ignore[union-attr]
        assert [p["tag"] for p in content["patches"]] == [1, 1, 1]
        assert [a["state"] for a in content["actions"]] == [0]
        assert stored.data.context[CONTEXT_KEY]["key"] == "k" * 64  # type: ignore[index]
        assert [r.id for r in rig.fake.results_for(SLIDE)] == [pressed.id]
    finally:
        await stop()


@pytest_twisted.ensureDeferred
async def test_without_on_action_a_press_is_only_acknowledged(reactor: Any, tmp_path: Path) -> None:
    """No on_action: the press is answered with the state reset, and no job exists."""
    rig, supervisor, stop = await _rig(reactor, tmp_path, "")
    try:
        pressed = _gallery(rig.fake)
        code, answer = await rig.modify(pressed)
        assert code == 200
        assert answer["data"]["result"]["content"]["actions"][0]["state"] == 0
        assert await rig.spool.find(slide_id=SLIDE) == []
        assert rig.fake.results[pressed.id or 0].displayResult == "3 patches"
    finally:
        await stop()
