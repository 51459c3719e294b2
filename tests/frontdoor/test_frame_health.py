"""The front door's "queued" frames and the shared SPS health view: a frame the SPS
fails marks it failing for the workers too; while it is failing, no frame is tried.

Real HTTP on loopback to a fake SPS that can be taken down; a memory spool."""

from __future__ import annotations

import json
from typing import Any

import attrs
import pytest_twisted
import treq
from twisted.internet.task import Clock
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.server import Site

from dpatia_daemon import __version__
from dpatia_daemon.config import Config, SPSConfig, URLPrefix
from dpatia_daemon.frontdoor.background import reporting
from dpatia_daemon.frontdoor.routes import IAAPI
from dpatia_daemon.frontdoor.site import make_site
from dpatia_daemon.simulator.fake import BASE_PATH, FakeSPS
from dpatia_daemon.spool import MemorySpool
from dpatia_daemon.sps.client import SPSClient, make_http_client
from dpatia_daemon.sps.errors import SPSError, SPSUnavailable
from dpatia_daemon.sps.writer import ResultWriter
from dpatia_daemon.workers.health import SPSHealth


@pytest_twisted.ensureDeferred
async def test_reporting_marks_and_clears_the_sps() -> None:
    """A transient failure marks the SPS failing (with its Retry-After); a success
    clears it; a permanent error (a 400) says nothing of its health."""
    health = SPSHealth(Clock(), probe_interval=10)
    url = "http://127.0.0.1:1/sps"

    async def fails(error: SPSError) -> None:
        raise error

    async def works() -> str:
        return "ok"

    try:
        await reporting(health, url, fails(SPSUnavailable("down", endpoint="PUT results", status=503, retry_after=60)))
    except SPSUnavailable:
        pass
    assert list(health.failing()) == [url]
    assert await reporting(health, url, works()) == "ok"
    assert health.failing() == {}
    try:
        await reporting(health, url, fails(SPSError("bad request", endpoint="PUT results", status=400)))
    except SPSError:
        pass
    assert health.failing() == {}


@pytest_twisted.ensureDeferred
async def test_a_failing_sps_is_seen_by_the_front_door_and_the_workers(
    reactor: Any, tmp_path: Any
) -> None:
    """The SPS answers 503: the queued frame fails and the shared health view (the one
    the workers' dispatcher reads) says the SPS is failing; the next notification's
    frame is not tried at all; once the workers' probe finds it healthy, frames are
    written again."""
    fake = FakeSPS(clock=reactor)
    for slide in ("slide-1", "slide-2", "slide-3"):
        fake.add_slide(slide)
    token = fake.issue_token()
    sps_port = reactor.listenTCP(0, Site(fake.resource()), interface="127.0.0.1")
    callback = f"http://127.0.0.1:{sps_port.getHost().port}{BASE_PATH}"
    config = attrs.evolve(
        Config(),
        sps=SPSConfig(
            allowed_callback_urls=(URLPrefix.parse("http://127.0.0.1:*/"),), timeout=5.0, retries=0
        ),
    )
    spool = MemorySpool()
    spool.startService()
    http = make_http_client(reactor)
    sps = SPSClient(
        http=http.client, clock=reactor, software_version=__version__, timeout=5.0, retries=0
    )
    writer = ResultWriter(sps=sps, clock=reactor, display_name=config.app.display_name)
    health = SPSHealth(reactor, probe_interval=10)
    api = IAAPI(config=config, spool=spool, sps=sps, clock=reactor, writer=writer, health=health)
    api_port = reactor.listenTCP(0, make_site(api.resource(), config), interface="127.0.0.1")
    client = treq.client.HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, False)))
    url = f"http://127.0.0.1:{api_port.getHost().port}/dpatia/imagenotification"

    async def notify(slide: str) -> None:
        body = {
            "action": "newImageFiles",
            "applicationId": "dpatia",
            "slideId": slide,
            "callbackInfo": {"url": callback, "token": token},
            "context": {},
            "imageInfo": {"imageSize": {"width": 2000, "height": 1000}},
        }
        response = await client.post(
            url, json.dumps(body).encode(), headers={"Content-Type": ["application/json"]}
        )
        assert response.code == 200
        await response.content()
        await api.background.drain()

    try:
        fake.faults.go_down(reactor.seconds(), 3600)
        await notify("slide-1")
        assert health.down(callback)
        calls = len(fake.requests)
        await notify("slide-2")
        assert len(fake.requests) == calls  # no doomed frame while it is failing
        fake.faults.down_until = reactor.seconds()
        health.succeeded(callback)  # a worker's probe got through
        await notify("slide-3")
        assert [r.displayResult for r in fake.results_for("slide-3")] != []
        assert fake.results_for("slide-1") == fake.results_for("slide-2") == []
    finally:
        await api.background.close()
        await api_port.stopListening()
        await sps_port.stopListening()
        await http.close()
        await spool.stopService()
