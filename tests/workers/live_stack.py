"""A front door and a supervisor with real worker processes, in the test's reactor,
against a loopback fake SPS: the rig of the live region and button tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import treq
from twisted.python.filepath import FilePath
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.server import Site

from dpatia_daemon import __version__
from dpatia_daemon.config import AppConfig, Config, SPSConfig, URLPrefix, WorkersConfig
from dpatia_daemon.frontdoor.routes import IAAPI
from dpatia_daemon.frontdoor.site import make_site
from dpatia_daemon.simulator.fake import BASE_PATH, FakeSPS
from dpatia_daemon.spool import DirectorySpool
from dpatia_daemon.sps.client import SPSClient, make_http_client
from dpatia_daemon.sps.tokens import TokenBook
from dpatia_daemon.sps.writer import ResultWriter
from dpatia_daemon.workers.supervisor import Supervisor


@attrs.define
class LiveStack:
    """What a test talks to: the API's ``url``, the fake SPS and its ``callback`` URL,
    the spool, the supervisor, and an HTTP ``client``; ``stop()`` ends it all."""

    url: str
    callback: str
    fake: FakeSPS
    spool: DirectorySpool
    supervisor: Supervisor
    client: Any
    _stoppers: list[Any] = attrs.field(repr=False)

    async def stop(self) -> None:
        for stop in self._stoppers:
            await stop()


def start_live_stack(
    reactor: Any, tmp_path: Path, slide: str, *, count: int, analysis: str, app: AppConfig
) -> LiveStack:
    """Serve ``app`` with ``count`` workers running ``analysis``; the fake SPS has
    ``slide`` (2000 x 1000 px).  The supervisor is started by the caller, after it has
    subscribed to its events."""
    fake = FakeSPS(clock=reactor)
    fake.add_slide(slide, width=2000, height=1000)
    sps_port = reactor.listenTCP(0, Site(fake.resource()), interface="127.0.0.1")
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
            count=count,
            work_directory=FilePath(str(tmp_path / "work")),
            kill_grace=2.0,
            heartbeat_interval=1.0,
            progress_interval=0.1,
            shutdown_grace=5.0,
        ),
        analysis=analysis,
        tokens=tokens,
        restart_initial=0.1,
        cancel_poll_interval=0.2,
    )
    config = attrs.evolve(
        Config(),
        app=app,
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
    return LiveStack(
        url=f"http://127.0.0.1:{api_port.getHost().port}",
        callback=f"http://127.0.0.1:{sps_port.getHost().port}{BASE_PATH}",
        fake=fake,
        spool=spool,
        supervisor=supervisor,
        client=treq.client.HTTPClient(Agent(reactor, pool=pool)),
        stoppers=[
            supervisor.stopService,
            api.background.drain,
            api_port.stopListening,
            spool.stopService,
            http.close,
            sps_port.stopListening,
        ],
    )
