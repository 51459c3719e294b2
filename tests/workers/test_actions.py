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
import treq
from twisted.python.filepath import FilePath
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.server import Site

from dpatia_daemon import __version__
from dpatia_daemon.config import Config, SPSConfig, URLPrefix, WorkersConfig
from dpatia_daemon.frontdoor.routes import IAAPI
from dpatia_daemon.frontdoor.site import make_site
from dpatia_daemon.jobs import JobKind
from dpatia_daemon.models import Result, ResultData, ResultPayload, unstructure
from dpatia_daemon.simulator.fake import BASE_PATH, FakeSPS
from dpatia_daemon.spool import DirectorySpool
from dpatia_daemon.sps.client import SPSClient, make_http_client
from dpatia_daemon.sps.results import CONTEXT_KEY
from dpatia_daemon.sps.tokens import TokenBook
from dpatia_daemon.sps.writer import ResultWriter
from dpatia_daemon.workers.supervisor import Supervisor, SupervisorEvent

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
    fake = FakeSPS(clock=reactor)
    fake.add_slide(SLIDE, width=2000, height=1000)
    sps_port = reactor.listenTCP(0, Site(fake.resource()), interface="127.0.0.1")
    callback = f"http://127.0.0.1:{sps_port.getHost().port}{BASE_PATH}"
    spool = DirectorySpool(directory=FilePath(str(tmp_path / "spool")), reactor=reactor)
    spool.startService()
    http = make_http_client(reactor)
    sps = SPSClient(
        http=http.client, clock=reactor, software_version=__version__, timeout=5.0, retries=1
    )
    tokens = TokenBook()
    writer = ResultWriter(sps=sps, clock=reactor, display_name="dpatia", tokens=tokens)
    supervisor = Supervisor(
        reactor=reactor,
        spool=spool,
        writer=writer,
        config=WorkersConfig(
            count=1,
            work_directory=FilePath(str(tmp_path / "work")),
            kill_grace=2.0,
            heartbeat_interval=1.0,
            progress_interval=0.1,
            shutdown_grace=5.0,
        ),
        analysis="tests.analyses_for_tests:noop",
        tokens=tokens,
        restart_initial=0.1,
        cancel_poll_interval=0.2,
    )
    config = attrs.evolve(
        Config(),
        app=attrs.evolve(Config().app, on_action=on_action),
        sps=SPSConfig(
            allowed_callback_urls=(URLPrefix.parse("http://127.0.0.1:*/"),), timeout=5.0, retries=1
        ),
    )
    api = IAAPI(
        config=config,
        spool=spool,
        cancel_running=supervisor.cancel,
        sps=sps,
        clock=reactor,
        writer=writer,
        tokens=tokens,
    )
    api_port = reactor.listenTCP(0, make_site(api.resource(), config), interface="127.0.0.1")
    pool = HTTPConnectionPool(reactor, persistent=False)
    rig = Rig(
        reactor=reactor,
        url=f"http://127.0.0.1:{api_port.getHost().port}",
        callback=callback,
        fake=fake,
        spool=spool,
        client=treq.client.HTTPClient(Agent(reactor, pool=pool)),
    )
    supervisor.observe(rig.events.append)
    supervisor.startService()

    async def stop() -> None:
        await supervisor.stopService()
        await api.background.drain()
        await api_port.stopListening()
        await spool.stopService()
        await http.close()
        await sps_port.stopListening()

    return rig, supervisor, stop


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
