"""The daemon's service tree, built from a frozen Config.  Wiring only, no logic.

``build_service(config, reactor)`` returns a shallow, named ``MultiService``:

- ``spool``  the durable job spool (starts first, stops last);
- ``sps``    the outgoing HTTP connection pool to the SPS (closed at stop);
- ``workers`` the worker supervisor: runs the analyses, writes their results;
- ``api``    waits, at stop, for in-progress frames still being written;
- ``http``   the IA-API listener (stops first: no new requests while draining).

Children stop one after another, in reverse order: the listener closes, the front
door's frames finish, the workers drain (their jobs need the SPS pool and the spool),
then the SPS pool closes, and the spool stops last.
"""

from __future__ import annotations

import os
import socket
from functools import partial
from typing import Any

import attrs
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.internet import threads
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger

from ._version import __version__
from .config import Config, ConfigError
from .frontdoor.background import BackgroundQueue
from .frontdoor.processes import FrontDoors, ParentLink, ReusePortListener, reuseport_address
from .frontdoor.routes import IAAPI, make_site
from .pipeline.prepare import PipelineSettings
from .spool import DirectorySpool, ISpool, SpoolError
from .sps.client import SPSClient, make_http_client
from .sps.tokens import Credentials, TokenBook, callback_auth
from .sps.writer import ResultWriter
from .workers.cancels import PushCancels
from .workers.folders import WorkFolders
from .workers.supervisor import Supervisor

log = Logger()


class _Root(MultiService):
    """The tree's root: a child that cannot start (an unusable spool) stops the daemon
    with one line, not a traceback, and a non-zero exit status."""

    def startService(self) -> None:
        try:
            super().startService()
        except SpoolError as e:
            raise SystemExit(f"dpatia: cannot start: {e}") from None

    def stopService(self) -> Deferred[None]:
        """Stop the children one at a time, last started first.

        MultiService would stop them all at once; the workers' drain needs the SPS
        pool and the spool until it is over.
        """
        Service.stopService(self)
        return Deferred.fromCoroutine(self._stop_in_order())

    async def _stop_in_order(self) -> None:
        for service in reversed(list(self)):
            try:
                await maybeDeferred(service.stopService)
            except Exception:
                log.failure("stopping service {name} failed", name=service.name)


class _Ready(Service):
    """Logs "ready" once the reactor runs: only then are its signal handlers in place,
    so a SIGTERM from then on is a clean shutdown.  Harnesses wait for this line."""

    def __init__(self, reactor: Any, message: str) -> None:
        self.reactor = reactor
        self.message = message

    def startService(self) -> None:
        super().startService()
        self.reactor.callWhenRunning(log.info, self.message)


class _Stopper(Service):
    """A service whose only job is to wait for something at stop."""

    def __init__(self, on_stop: Any) -> None:
        self.on_stop = on_stop

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        return self.on_stop()  # type: ignore[no-any-return]


def _endpoint(reactor: Any, config: Config) -> Any:
    try:
        return serverFromString(reactor, config.server.listen)
    except IndexError:
        # The systemd: parser indexes LISTEN_FDS: no sockets were passed to us.
        raise ConfigError(
            config.source,
            "server",
            "listen",
            "systemd socket activation requested but systemd passed no sockets "
            "(start dpatia.socket, or listen on tcp:PORT)",
        ) from None
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise ConfigError(config.source, "server", "listen", str(e)) from None


def _in_thread(reactor: Any, f: Any, *args: Any) -> Deferred[Any]:
    """Run blocking file work (removing a job's work folder) in the reactor's pool."""
    return threads.deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)


def _analysis_settings(config: Config) -> dict[str, str]:
    """The config section a built-in analysis reads (passed to its workers)."""
    if config.app.analysis == "demo":
        return {"step_seconds": f"{config.demo.step_seconds:g}"}
    if config.app.analysis == "tissue":
        return config.tissue.settings()
    return {}


def _pipeline_settings(config: Config) -> PipelineSettings:
    """What workers need to fetch a slide (no secrets: tokens travel in job.json, client
    credentials in the workers' environment)."""
    return PipelineSettings(
        include_phi=config.app.include_phi,
        thumbnail_mpp=config.pipeline.thumbnail_mpp,
        tile_concurrency=config.pipeline.tile_concurrency,
        download_wsi=config.pipeline.download_wsi,
        download_idle_timeout=config.pipeline.download_idle_timeout,
        sps_timeout=config.sps.timeout,
        sps_retries=config.sps.retries,
        verify_tls=config.sps.verify_tls,
        ca_file=config.sps.ca_file.path if config.sps.ca_file else None,
        api_version=config.server.api_version,
        application_id=config.app.application_id,
    )


def _credentials(config: Config) -> Credentials | None:
    """``[sps] client_id``/``client_secret``, if configured."""
    if config.sps.client_id is None or config.sps.client_secret is None:
        return None
    return Credentials(config.sps.client_id, config.sps.client_secret)


async def _noticed(spool: DirectorySpool, tokens: TokenBook, job_id: str, key: str) -> None:
    """An extra front door queued a job: dispatch it now, and let running jobs of its
    slide use the token it brought (the copy's own TokenBook is not ours)."""
    job = await spool.notice(job_id, key)
    if job is not None:
        tokens.record(job.application_id, job.slide_id, job.callback, job.created)


def _check_processes(config: Config) -> None:
    if config.server.processes == 1:
        return
    try:
        reuseport_address(config.server.listen)
    except ValueError:
        raise ConfigError(
            config.source,
            "server",
            "processes",
            "more than one process needs a plain tcp: listener (not ssl: or systemd:); "
            "terminate TLS in front of dpatia, or set processes = 1",
        ) from None
    if not os.path.isfile(config.source):
        raise ConfigError(
            config.source, "server", "processes", "extra processes need a config file"
        )


def build_service(config: Config, reactor: Any, *, front_door: int | None = None) -> MultiService:
    """Build the named service tree for ``config`` on ``reactor``; nothing starts yet.

    With ``front_door`` set, the tree of an extra front-door process (see
    ``front_doors.py``): the spool, the SPS client and the IA-API on the shared port
    (SO_REUSEPORT), no workers and no sweeps.
    """
    if front_door is None:
        _check_processes(config)
    root = _Root()

    spool = DirectorySpool(
        directory=config.spool.directory,
        reactor=reactor,
        sweep_interval=config.spool.sweep_interval,
        owner=f"{socket.gethostname()}:{os.getpid()}",
        sweeps=front_door is None,
    )
    spool.setName("spool")
    spool.setServiceParent(root)

    http = make_http_client(
        reactor,
        verify_tls=config.sps.verify_tls,
        ca_file=config.sps.ca_file.path if config.sps.ca_file else None,
        connect_timeout=min(10.0, config.sps.timeout),
    )
    sps = SPSClient(
        http=http.client,
        clock=reactor,
        api_version=config.server.api_version,
        software_version=__version__,
        timeout=config.sps.timeout,
        retries=config.sps.retries,
    )
    credentials = _credentials(config)
    if credentials is not None:
        log.info(
            "SPS client credentials configured (client id {client_id}): callback tokens "
            "the SPS rejects are replaced by tokens from POST /token",
            client_id=credentials.client_id,
        )
    sps = attrs.evolve(
        sps,
        auth=callback_auth(sps.fetch_token, reactor, config.app.application_id, credentials),
    )
    # The newest callback of each slide, from the front door to the job runners.
    tokens = TokenBook()
    sps_service = _Stopper(http.close)
    sps_service.setName("sps")
    sps_service.setServiceParent(root)

    writer = ResultWriter(
        sps=sps, clock=reactor, display_name=config.app.display_name, tokens=tokens
    )
    # The spool as the front door sees it: with workers here, their running jobs hear
    # of a cancellation at once (see workers/cancels.py).
    api_spool: ISpool = spool
    if config.workers.count and front_door is None:
        workers = Supervisor(
            reactor=reactor,
            spool=spool,
            writer=writer,
            config=config.workers,
            analysis=config.app.analysis,
            settings=_analysis_settings(config),
            pipeline=_pipeline_settings(config),
            folders=WorkFolders(
                config.workers.work_directory,
                run_blocking=partial(_in_thread, reactor),
                keep_wsi=config.spool.keep_wsi,
                retention_days=config.spool.retention_days,
            ),
            sweep_interval=config.spool.sweep_interval,
            tokens=tokens,
            credentials=credentials,
        )
        workers.setName("workers")
        workers.setServiceParent(root)
        api_spool = PushCancels(spool, workers.cancel)
    elif front_door is None:
        # A front door only: it accepts and spools jobs; daemons sharing the spool run them.
        log.info("no workers ([workers] count = 0): jobs are accepted, others run them")

    api = IAAPI(
        config=config,
        spool=api_spool,
        sps=sps,
        clock=reactor,
        writer=writer,
        background=BackgroundQueue(
            concurrency=config.sps.background_concurrency,
            max_delay=config.sps.background_max_delay,
            clock=reactor,
        ),
        tokens=tokens,
    )
    api_service = _Stopper(api.background.close)
    api_service.setName("api")
    api_service.setServiceParent(root)

    site = make_site(api.resource(), config)
    if front_door is not None:
        door = ReusePortListener(reactor, config.server.listen, site)
        door.setName("http")
        door.setServiceParent(root)
        link = ParentLink(reactor, spool.watch)
        link.setName("link")
        link.setServiceParent(root)
        ready = _Ready(reactor, f"dpatia front door {front_door} ready")
        ready.setName("ready")
        ready.setServiceParent(root)
        return root

    if config.server.processes > 1:
        shared = ReusePortListener(reactor, config.server.listen, site)
        shared.setName("http")
        shared.setServiceParent(root)
        doors = FrontDoors(
            reactor=reactor,
            count=config.server.processes - 1,
            port=shared.port,
            listen=config.server.listen,
            argv=["--config", config.source, "--spool", config.spool.directory.path],
            notice=partial(_noticed, spool, tokens),
        )
        doors.setName("front doors")
        doors.setServiceParent(root)
    else:
        listener = StreamServerEndpointService(_endpoint(reactor, config), site)
        # Fail the start (exit code != 0) when the port cannot be bound, instead of
        # logging and running deaf.
        listener._raiseSynchronously = True
        listener.setName("http")
        listener.setServiceParent(root)

    ready = _Ready(reactor, "dpatia ready")
    ready.setName("ready")
    ready.setServiceParent(root)

    log.info(
        "dpatia {version}: IA-API on {listen} at {route} ({processes} front-door "
        "processes), spool {spool}, {count} workers running {analysis!r}",
        version=__version__,
        processes=config.server.processes,
        listen=config.server.listen,
        route=config.server.route,
        spool=config.spool.directory.path,
        count=config.workers.count,
        analysis=config.app.analysis,
    )
    return root
