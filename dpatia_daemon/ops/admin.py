"""The admin listener (``[admin] listen``): ``/metrics``, ``/status`` and ``/status.json``.

A second HTTP listener, apart from the IA-API's, so that neither the SPS nor anyone
who can reach the IA-API sees it: a ``tcp:`` listener that names no interface binds
loopback only (:func:`~dpatia_daemon.config._admin_listen`).  It has no token: put it
behind a reverse proxy with authentication to show it to more than this host.

* ``/metrics``: the Prometheus text format of :class:`~.metrics.Metrics`' registry.
  Not ``prometheus_client.twisted.MetricsResource``: that is a WSGI app on the global
  reactor's thread pool, which would call our collector from another thread, and the
  spool's figures must be read (in the spool's own threads) before the collector
  runs.  So this resource refreshes the :class:`~.metrics.SpoolView` first, then
  renders with prometheus_client's own exposition (``generate_latest``) in the reactor
  thread.
* ``/status``: the live page (:data:`~.status.PAGE`); ``/status.json`` its document.

Anything else is a 404 with a JSON body naming the paths that exist; an error while
reading the spool is a 503 with a JSON body, logged once per scrape.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import Service
from twisted.internet.defer import ensureDeferred
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from ..config import Config, ConfigError
from ..twistedcompat import raise_synchronously
from .metrics import Metrics
from .status import PAGE, StatusBoard

log = Logger()

#: The paths the admin listener answers.
PATHS = ("/metrics", "/status", "/status.json")


def _json(request: Request, code: int, body: Any) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(body, sort_keys=True).encode("utf-8")


class _Async(Resource):
    """A leaf answering GET with ``produce(request)``'s bytes (a coroutine)."""

    isLeaf = True

    def __init__(self, produce: Callable[[Request], Coroutine[Any, Any, bytes]], what: str) -> None:
        super().__init__()
        self.produce = produce
        self.what = what

    def render_GET(self, request: Request) -> Any:
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))

        def answer(body: bytes) -> None:
            if not gone:
                request.write(body)
                request.finish()

        def failed(failure: Failure) -> None:
            log.failure("admin {what} failed", failure, what=self.what)
            answer(_json(request, 503, {"error": f"cannot read the {self.what} now"}))

        ensureDeferred(self.produce(request)).addCallbacks(answer, failed)
        return NOT_DONE_YET


class _Page(Resource):
    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        # The page loads nothing from elsewhere, and nothing may frame it.
        request.setHeader(
            b"content-security-policy",
            b"default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
            b"connect-src 'self'; frame-ancestors 'none'",
        )
        return PAGE.encode("utf-8")


class _Root(Resource):
    """``/``: a JSON index of the paths; unknown paths are a JSON 404."""

    def getChild(self, path: bytes, request: Request) -> Resource:
        return _NotFound()

    def render_GET(self, request: Request) -> bytes:
        return _json(request, 200, {"service": "dpatia admin", "paths": list(PATHS)})


class _NotFound(Resource):
    isLeaf = True

    def render(self, request: Request) -> bytes:
        return _json(request, 404, {"error": "no such admin path", "paths": list(PATHS)})


def admin_resource(metrics: Metrics | None, board: StatusBoard) -> Resource:
    """The admin listener's resource tree (``/metrics`` only with ``metrics``)."""

    async def scrape(request: Request) -> bytes:
        assert metrics is not None
        if metrics.view is not None:
            await metrics.view.refresh()
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        return generate_latest(metrics.registry)

    async def status(request: Request) -> bytes:
        return _json(request, 200, await board.document())

    root = _Root()
    if metrics is not None:
        root.putChild(b"metrics", _Async(scrape, "metrics"))
    root.putChild(b"status", _Page())
    root.putChild(b"status.json", _Async(status, "status"))
    return root


class _AdminSite(Site):
    """No access-log line for a scrape or a poll (every few seconds); errors keep theirs."""

    def log(self, request: Any) -> None:
        if request.code >= 400:
            super().log(request)


class AdminListener(StreamServerEndpointService):
    """The listener; logs the address it got once bound (``tcp:0`` picks a port).

    It binds in ``startService``, not before the other services start as Twisted's
    does: so it always binds after the IA-API's listener (which, with ``[server]
    processes`` > 1, binds in its own ``startService``), and the first "starting on"
    line of the log stays the IA-API's.
    """

    def privilegedStartService(self) -> None:
        Service.privilegedStartService(self)

    def startService(self) -> None:
        Service.startService(self)
        StreamServerEndpointService.privilegedStartService(self)
        # Twisted keeps the listening Deferred private; it fires with the port.
        waiting = getattr(self, "_waitingForPort", None)
        if waiting is not None:
            waiting.addCallback(self._listening)

    def _listening(self, port: Any) -> Any:
        host = port.getHost()
        log.info(
            "admin listener on http://{host}:{port}/status (metrics at /metrics)",
            host=getattr(host, "host", "?"),
            port=getattr(host, "port", "?"),
        )
        return port


def admin_listener(
    reactor: Any,
    config: Config,
    metrics: Metrics,
    workers: Any = None,
    failing: Callable[[], dict[str, str]] | None = None,
) -> AdminListener:
    """The ``admin`` service: ``[admin] listen`` serving :func:`admin_resource`.

    ``workers`` is the supervisor (its events and snapshot; None without workers),
    ``failing`` the SPS health view's ``failing``; the metrics and a
    :class:`StatusBoard` observe the workers from now on.  A description Twisted cannot
    parse is a :class:`ConfigError` naming ``[admin] listen``; a port that cannot be
    bound fails the start, as the IA-API's does.
    """
    try:
        endpoint = serverFromString(reactor, config.admin.listen)
    except (ValueError, KeyError, TypeError, IndexError, OSError) as e:
        raise ConfigError(config.source, "admin", "listen", str(e) or type(e).__name__) from None
    assert metrics.view is not None
    board = StatusBoard(
        clock=reactor,
        view=metrics.view,
        workers=workers,
        failing=failing if workers is not None else None,
        metrics=metrics,
        started=reactor.seconds(),
    )
    if workers is not None:
        metrics.workers, metrics.failing = workers, failing
        workers.observe(metrics.event)
        workers.observe(board.event)
    site = _AdminSite(admin_resource(metrics, board))
    site.displayTracebacks = False
    service = AdminListener(endpoint, site)
    raise_synchronously(service)
    return service


__all__ = ["PATHS", "AdminListener", "admin_listener", "admin_resource"]
