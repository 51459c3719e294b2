"""The daemon's service tree, built from a frozen Config.  Wiring only, no logic.

``build_service(config, reactor)`` returns a shallow, named ``MultiService``:

- ``spool``  the durable job spool (starts first, stops last);
- ``retention`` the periodic prune of ended jobs' records (:mod:`.spool.retention`);
- ``sps``    the outgoing HTTP connection pool to the SPS (closed at stop);
- ``workers`` the worker supervisor: runs the analyses, writes their results;
- ``api``    waits, at stop, for in-progress frames still being written;
- ``http``   the IA-API listener (stops first: no new requests while draining);
- ``admin``  with ``[admin] listen``: ``/metrics`` and the status page (:mod:`.ops.admin`);
  an extra front door then has ``counts`` instead, sending its totals to the main process;
- under systemd, ``watchdog`` (first: it pings until the drain is over) and
  ``systemd`` (last: STOPPING=1 before anything else stops), see :mod:`.ops.systemd`.

Children stop one after another, in reverse order (:class:`~.lifecycle.OrderedRoot`):
the listener closes, the front door's frames finish, the workers drain (their jobs need
the SPS pool and the spool), then the SPS pool closes, and the spool stops last.

What the tree's parts do lives with them: the ordered stop, the "ready" line and the
stop-only services in :mod:`.lifecycle`, the listening endpoint and its checks in
:mod:`.frontdoor.listening`.
"""

from __future__ import annotations

import os
import socket
import time
from functools import partial
from typing import Any, cast

import attrs
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.logger import Logger

from ._version import __version__
from .config import Config
from .frontdoor.background import BackgroundQueue
from .frontdoor.listening import check_processes, endpoint, noticed
from .frontdoor.offload import ParseProcess
from .frontdoor.processes import COUNTS_PREFIX, FrontDoors, ParentLink, ReusePortListener
from .frontdoor.routes import IAAPI, no_tally
from .frontdoor.site import make_site
from .lifecycle import OrderedRoot, Ready, Stopper, in_thread
from .ops.admin import admin_listener
from .ops.metrics import CountsReporter, Metrics, SpoolView
from .ops.systemd import Notifier, Readiness, SystemdEnvironment, Watchdog
from .spool import DirectorySpool
from .spool.retention import Retention
from .sps.client import SPSClient, make_http_client
from .sps.info import SPSVersions
from .sps.tokens import TokenBook, callback_auth
from .sps.writer import ResultWriter
from .twistedcompat import raise_synchronously
from .workers.folders import WorkFolders
from .workers.health import SPSHealth
from .workers.interpreter import check_workers_python
from .workers.supervisor import Supervisor

log = Logger()


def build_service(
    config: Config,
    reactor: Any,
    *,
    front_door: int | None = None,
    systemd: SystemdEnvironment | None = None,
) -> MultiService:
    """Build the named service tree for ``config`` on ``reactor``; nothing starts yet.

    ``reactor`` provides time, TCP, threads and processes (IReactorTime, IReactorTCP,
    IReactorThreads, IReactorProcess, IReactorCore: the global reactor in the daemon, a
    ``MemoryReactorClock`` in tests); zope interfaces have no intersection type, so it
    is ``Any`` here and each part declares the one it uses.

    With ``front_door`` set, the tree of an extra front-door process (see
    :mod:`.frontdoor.processes`): the spool, the SPS client and the IA-API on the shared port
    (SO_REUSEPORT), no workers and no sweeps.

    ``systemd`` is what systemd told the process (``NOTIFY_SOCKET``, the watchdog):
    the main process then has a ``watchdog`` service (first, so it stops last) and a
    ``systemd`` one (last: READY, STATUS, STOPPING; see :mod:`.ops.systemd`).
    """
    if front_door is None:
        check_processes(config)
        check_workers_python(config)
    root = OrderedRoot()
    notifier = None
    if systemd is not None and systemd.notify_socket and front_door is None:
        notifier = Notifier(systemd.notify_socket)
        if systemd.watchdog_interval:
            watchdog = Watchdog(reactor, notifier, systemd.watchdog_interval)
            watchdog.setName("watchdog")
            watchdog.setServiceParent(root)

    spool = DirectorySpool(
        directory=config.spool.directory,
        reactor=reactor,
        sweep_interval=config.spool.sweep_interval,
        owner=f"{socket.gethostname()}:{os.getpid()}",
        sweeps=front_door is None,
        check_locks=front_door is None,
    )
    spool.setName("spool")
    spool.setServiceParent(root)
    if front_door is None:
        # Ended jobs' records go after [spool] retention_days (the extra doors leave it
        # to the main process), in steps off the reactor thread.
        retention = Retention(
            store=spool.store,
            clock=reactor,
            retention_days=config.spool.retention_days,
            wall_clock=time.time,
            run_blocking=partial(in_thread, reactor),
            interval=config.spool.prune_interval,
        )
        retention.setName("retention")
        retention.setServiceParent(root)
    # Counted only with an admin listener to read them (see ops/metrics.py).
    metrics = None
    if config.admin.listen:
        metrics = Metrics(reactor, SpoolView(spool, reactor, partial(in_thread, reactor)))

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
        on_answer=None if metrics is None else metrics.sps_answered,
    )
    credentials = config.sps.credentials()
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
    # One view of each SPS's health, fed by the workers' calls and the front door's.
    health = SPSHealth(reactor, config.workers.sps_probe_interval)
    sps_service = Stopper(http.close)
    sps_service.setName("sps")
    sps_service.setServiceParent(root)

    writer = ResultWriter(
        sps=sps, clock=reactor, display_name=config.app.display_name, tokens=tokens
    )
    writer.versions = SPSVersions(sps=sps, clock=reactor)
    # With workers here, a cancellation reaches their running job at once.
    cancel_running = None
    if config.workers.count and front_door is None:
        workers = Supervisor(
            reactor=reactor,
            spool=spool,
            writer=writer,
            config=config.workers,
            analysis=config.app.analysis,
            settings=config.analysis_settings(),
            pipeline=config.pipeline_settings(),
            folders=WorkFolders(
                config.workers.work_directory,
                run_blocking=partial(in_thread, reactor),
                keep_wsi=config.spool.keep_wsi,
                retention_days=config.spool.retention_days,
            ),
            sweep_interval=config.spool.sweep_interval,
            tokens=tokens,
            health=health,
            credentials=credentials,
        )
        workers.setName("workers")
        workers.setServiceParent(root)
        cancel_running = workers.cancel
    elif front_door is None:
        # A front door only: it accepts and spools jobs; daemons sharing the spool run them.
        log.info("no workers ([workers] count = 0): jobs are accepted, others run them")

    parse_process = ParseProcess(reactor)
    parse_process.setName("parse-process")
    parse_process.setServiceParent(root)
    api = IAAPI(
        config=config,
        spool=spool,
        cancel_running=cancel_running,
        sps=sps,
        clock=reactor,
        writer=writer,
        background=BackgroundQueue(
            concurrency=config.sps.background_concurrency,
            max_delay=config.sps.background_max_delay,
            clock=reactor,
        ),
        tokens=tokens,
        health=health,
        # Large bodies (a modify carrying a big result) are parsed off the reactor thread,
        # the largest in a child process (see frontdoor/offload.py).
        run_blocking=partial(in_thread, reactor),
        parse_outside=parse_process,
        tally=no_tally if metrics is None else metrics.count,
    )
    # At stop: the background SPS writes, then the result notes still in flight.
    api_service = Stopper(lambda: api.background.close().addCallback(lambda _: api.notes_written()))
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
        if metrics is not None:
            # After the link, so it stops first: its last totals still reach the parent.
            counts = CountsReporter(reactor, metrics, link.send, COUNTS_PREFIX)
            counts.setName("counts")
            counts.setServiceParent(root)
        ready = Ready(reactor, f"dpatia front door {front_door} ready")
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
            notice=partial(noticed, spool, tokens),
            on_counts=None if metrics is None else metrics.counted,
        )
        doors.setName("front doors")
        doors.setServiceParent(root)
    else:
        listener = StreamServerEndpointService(endpoint(reactor, config), site)
        # Fail the start (exit code != 0) when the port cannot be bound, instead of
        # logging and running deaf.
        raise_synchronously(listener)
        listener.setName("http")
        listener.setServiceParent(root)

    if metrics is not None:
        workers_here = root.namedServices.get("workers")
        admin = admin_listener(reactor, config, metrics, workers_here, health.failing)
        admin.setName("admin")
        admin.setServiceParent(root)

    ready = Ready(reactor, "dpatia ready")
    ready.setName("ready")
    ready.setServiceParent(root)
    if notifier is not None:
        supervisor = cast(Supervisor | None, root.namedServices.get("workers"))
        readiness = Readiness(reactor, notifier, spool, supervisor)
        readiness.setName("systemd")
        readiness.setServiceParent(root)

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
