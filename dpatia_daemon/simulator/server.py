"""The SPS simulator: generated slides served through the fake SPS, a web page, a driver.

- :class:`SimulatorConfig` — frozen options (the CLI and the twistd plugin build it).
- :class:`Simulator` — the parts wired together: :class:`~.fake.FakeSPS` (the callback
  API under ``BASE_PATH``), :class:`~.tiles.TileServer` (tiles and thumbnails from the
  pyramids), :class:`~.driver.AppDriver` (calls the app), and the page and control API
  at ``/`` and ``/ui/...``.  :meth:`Simulator.resource` is the root resource.
- :class:`SimulatorService` — the lifecycle: generate or reuse slides (in a thread),
  listen, log the callback URL and a token for curl, register with the app, stop.
- :func:`start_simulator` — start one in process and wait until it is ready (tests, demo).

Control API (JSON; what the page's buttons and the command line use)::

    GET  /ui/state                    slides, every result of the app as shapes, app, faults, log
    POST /ui/register                 {"url": app URL (optional)} → the registration
    POST /ui/slides/{id}/create       a user invocation   → the app's status and answer
                                      ({"region": [x0, y0, x1, y1]} for a region app)
    POST /ui/slides/{id}/notify       an image notification
    POST /ui/slides/{id}/cancel       a cancellation ({"resultId": n}: that result's job)
    GET  /ui/results[?slide=ID]       stored results, oldest first
    GET  /ui/faults, POST /ui/faults  the fault knobs (see Faults.update)
    POST /ui/token                    {"lifetime": s (optional)} → a fresh Bearer token
    GET  /ui/slides/{id}/thumbnail.jpg, overlay.png, label.jpg
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from attrs import define, field, frozen
from klein import Klein
from treq.client import HTTPClient
from twisted.application.service import Service
from twisted.internet.defer import Deferred, ensureDeferred, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from twisted.web.server import Site
from werkzeug.exceptions import MethodNotAllowed, NotFound

from ..models import Result
from ..pipeline.dzi import DZI
from ..sps.results import latest
from .buttons import actions_of
from .channels import add_multichannel
from .driver import DEFAULT_APP_URL, AppDriver, DriverError
from .fake import BASE_PATH, FakeSlide, FakeSPS
from .faults import DownMode, Faults
from .overlay import render_result_png, shapes_of
from .page import render_page
from .slides import SlideSet, default_specs, load_or_generate
from .tiles import Runner, TileServer, thread_runner
from .versions import version_info

log = Logger()

DEFAULT_LISTEN = "tcp:8086:interface=127.0.0.1"
DEFAULT_DATA = "var/sps"
THUMBNAIL_SIDE = 512
#: How many of a slide's results (the newest) the page draws and lists.
PAGE_RESULTS = 50


@frozen
class SimulatorConfig:
    """Everything a simulator run is configured with (all optional)."""

    listen: str = DEFAULT_LISTEN
    data: str = DEFAULT_DATA
    scale: float = 1.0
    public_url: str | None = None
    app_url: str | None = None
    register_attempts: int = 30
    register_interval: float = 1.0
    latency: float = 0.0
    error_rate: float = 0.0
    seed: int = 0
    drop_after_bytes: int | None = None
    drop_count: int | None = None
    token_lifetime: float | None = None
    down_after: float | None = None
    down_for: float | None = None
    down_mode: DownMode = "503"
    #: The IA-API version the simulated SPS has (``GET /info``; QC from 1.10, case
    #: lists from 1.9).
    api_version: str = "1.10"

    def faults(self) -> Faults:
        """The initial fault knobs (the down window is placed when the service starts)."""
        import random

        return Faults(
            latency=self.latency,
            error_rate=self.error_rate,
            rng=random.Random(self.seed),
            drop_after_bytes=self.drop_after_bytes,
            drop_count=self.drop_count,
            token_lifetime=self.token_lifetime,
            down_mode=self.down_mode,
        )


class UIError(Exception):
    """Answer the control API request with ``status`` and ``{"error": message}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _json(request: IRequest, payload: Any, status: int = 200) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json; charset=utf-8")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(payload).encode("utf-8")


def _read_json(request: IRequest) -> dict[str, Any]:
    raw = request.content.read() if request.content is not None else b""
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        raise UIError(400, "the body is not JSON") from None
    if not isinstance(data, dict):
        raise UIError(400, "the body must be a JSON object")
    return data


def _region(value: Any) -> tuple[float, float, float, float] | None:
    """A ``region`` of the control API: ``[x0, y0, x1, y1]``, width-normalised."""
    if value is None:
        return None
    if (
        not isinstance(value, list)
        or len(value) != 4
        or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
    ):
        raise UIError(400, "region must be [x0, y0, x1, y1] (numbers, width-normalised)")
    x0, y0, x1, y1 = (float(v) for v in value)
    if not (x0 < x1 and y0 < y1 and x0 >= 0 and y0 >= 0):
        raise UIError(400, "region must have x0 < x1 and y0 < y1, all >= 0")
    return (x0, y0, x1, y1)


class _Dispatch(Resource):
    """The root: the callback API under its base path, the page and control API elsewhere."""

    isLeaf = True

    def __init__(self, sps: IResource, ui: IResource) -> None:
        super().__init__()
        self.sps = sps
        self.ui = ui
        self.prefix = [s.encode() for s in BASE_PATH.strip("/").split("/")][:1]

    def render(self, request: IRequest) -> Any:  # type: ignore[override]
        """Hand the request to the part that owns its path."""
        postpath = request.postpath or []  # type: ignore[attr-defined]
        target = self.sps if postpath[:1] == self.prefix else self.ui
        return target.render(request)


@define
class Simulator:
    """The wired parts of the simulator (see the module docstring).

    Collaborators: ``sps`` (the fake SPS, its clock the reactor), ``tiles``, ``driver``;
    ``slide_set`` once :meth:`load` has run.
    """

    sps: FakeSPS
    tiles: TileServer
    driver: AppDriver
    slide_set: SlideSet | None = None
    app: Klein = field(init=False)

    def __attrs_post_init__(self) -> None:
        app = self.app = Klein()
        app.route("/", methods=["GET"])(self.page)
        app.route("/ui/state", methods=["GET"])(self.state_route)
        app.route("/ui/register", methods=["POST"])(self.register_route)
        app.route("/ui/slides/<slide_id>/<action>", methods=["POST"])(self.action_route)
        app.route("/ui/results", methods=["GET"])(self.results_route)
        app.route("/ui/faults", methods=["GET", "POST"])(self.faults_route)
        app.route("/ui/token", methods=["POST"])(self.token_route)
        app.route("/ui/slides/<slide_id>/thumbnail.jpg", methods=["GET"])(self.thumbnail_route)
        app.route("/ui/slides/<slide_id>/overlay.png", methods=["GET"])(self.overlay_route)
        app.route("/ui/slides/<slide_id>/label.jpg", methods=["GET"])(self.label_route)
        app.handle_errors(UIError)(self._ui_error)
        app.handle_errors(DriverError)(self._driver_error)
        app.handle_errors(NotFound)(self._not_found)
        app.handle_errors(MethodNotAllowed)(self._not_allowed)
        app.handle_errors(Exception)(self._unexpected)

    @classmethod
    def create(
        cls,
        reactor: Any,
        *,
        faults: Faults | None = None,
        run: Runner | None = None,
        http: HTTPClient | None = None,
        app_url: str | None = None,
    ) -> Simulator:
        """A simulator on ``reactor`` (clock, thread pool, HTTP client to the app)."""
        sps = FakeSPS(clock=reactor, faults=faults or Faults())
        if http is None:
            pool = HTTPConnectionPool(reactor, persistent=True)
            http = HTTPClient(Agent(reactor, pool=pool))
        return cls(
            sps=sps,
            tiles=TileServer(run=run or thread_runner(reactor)),
            driver=AppDriver(http=http, sps=sps, clock=reactor, app_url=app_url),
        )

    def load(self, slide_set: SlideSet) -> None:
        """Serve the generated slides: info, label, tiles from the pyramid, files from disk."""
        self.slide_set = slide_set
        for generated in slide_set.slides:
            info = json.loads(json.dumps(generated.info))  # the fake mutates QC state
            size = info["imageSize"]
            dzi = DZI(
                size["width"],
                size["height"],
                info["tileSize"]["width"],
                microns_per_pixel=info["micronsPerPixel"],
            )
            self.tiles.add(generated.slide_id, slide_set.path(generated.tiff), dzi)
            label = slide_set.path(generated.label).read_bytes() if generated.label else None
            self.sps.slides[generated.slide_id] = FakeSlide(
                slide_id=generated.slide_id,
                info=info,
                label=label,
                tile_renderer=self.tiles.renderer(generated.slide_id),
                file_paths=[(name, slide_set.path(path)) for name, path in generated.files],
            )

    def resource(self) -> IResource:
        """The root resource: callback API, page and control API."""
        return _Dispatch(self.sps.resource(), self.app.resource())

    # --- state ---

    def latest_result(self, slide_id: str) -> Result | None:
        """The registered app's latest result on a slide (highest id)."""
        app = self.driver.application_id if self.driver.registration else None
        return latest(self.sps.results_for(slide_id, app))

    def state(self) -> dict[str, Any]:
        """What the page shows."""
        slides = []
        for slide_id, slide in self.sps.slides.items():
            size = slide.info.get("imageSize") or {}
            width, height = int(size.get("width", 1)), int(size.get("height", 1))
            scale = THUMBNAIL_SIDE / max(width, height)
            current = self.latest_result(slide_id)
            app = self.driver.application_id if self.driver.registration else None
            stored = self.sps.results_for(slide_id, app)
            slides.append(
                {
                    "id": slide_id,
                    "summary": " · ".join(
                        [
                            f"{width}×{height} px",
                            f"{slide.info.get('micronsPerPixel')} µm/px",
                            str((slide.info.get("staining") or {}).get("displayName", "")),
                            f"block {(slide.info.get('block') or {}).get('displayName', '')}",
                            str(slide.info.get("accessionNumber", "")),
                            "multipart files" if len(slide.file_paths) > 1 else "single file",
                        ]
                    ),
                    "thumbnail": {
                        "url": f"/ui/slides/{slide_id}/thumbnail.jpg",
                        "width": max(1, round(width * scale)),
                        "height": max(1, round(height * scale)),
                    },
                    "label": f"/ui/slides/{slide_id}/label.jpg" if slide.label else None,
                    "resultCount": len(stored),
                    # Every result of the app (the newest PAGE_RESULTS), drawn together
                    # as the viewer shows them: a region app has one per region.
                    "results": [
                        {
                            "id": r.id,
                            "versionId": r.versionId,
                            "displayResult": r.displayResult,
                            "displayProperties": r.displayProperties,
                            "shapes": [s.to_json() for s in shapes_of(r, width)],
                            "cancellable": r.id in self.driver.result_tokens,
                            "actions": actions_of(r),
                        }
                        for r in stored[-PAGE_RESULTS:]
                    ],
                    "latest": None
                    if current is None
                    else {
                        "id": current.id,
                        "versionId": current.versionId,
                        "displayResult": current.displayResult,
                        "displayProperties": current.displayProperties,
                        "shapes": [s.to_json() for s in shapes_of(current, width)],
                    },
                }
            )
        return {
            "sps": {
                "callbackUrl": self.driver.callback_url,
                "faults": self.sps.faults.to_json(self.sps.clock.seconds()),
            },
            "app": {
                "url": self.driver.app_url,
                "inputType": self.driver.input_type,
                "registration": self.driver.registration,
                "lastError": self.driver.last_error,
            },
            "slides": slides,
            "log": [e.to_json() for e in self.driver.events],
        }

    async def overlay_png(self, slide_id: str, path: str | Path | None = None) -> bytes:
        """The slide's thumbnail with the app's results drawn over it (every region's;
        the latest one captioned), as PNG bytes (also written to ``path`` if given)."""
        import io

        slide = self._slide(slide_id)
        image = await self.tiles.thumbnail_image(slide_id, THUMBNAIL_SIDE)
        width = int(slide.info["imageSize"]["width"])
        current = self.latest_result(slide_id)
        app = self.driver.application_id if self.driver.registration else None
        stored = self.sps.results_for(slide_id, app)[-PAGE_RESULTS:]
        others = [r for r in stored if r is not current]
        canvas = render_result_png(
            image, current, path, image_width=width, title=slide_id, others=others
        )
        out = io.BytesIO()
        canvas.save(out, "PNG")
        return out.getvalue()

    def _slide(self, slide_id: str) -> FakeSlide:
        slide = self.sps.slides.get(slide_id)
        if slide is None:
            raise UIError(404, f"unknown slide {slide_id!r}")
        return slide

    # --- routes ---

    def page(self, request: IRequest) -> bytes:
        """``GET /``: the page, with the current state embedded."""
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        return render_page(self.state())

    def state_route(self, request: IRequest) -> bytes:
        """``GET /ui/state``."""
        return _json(request, self.state())

    async def register_route(self, request: IRequest) -> bytes:
        """``POST /ui/register``: fetch the registration from the app."""
        url = _read_json(request).get("url")
        if url is not None and not isinstance(url, str):
            raise UIError(400, "url must be a string")
        return _json(request, await self.driver.register(url or None))

    async def action_route(self, request: IRequest, slide_id: str, action: str) -> bytes:
        """``POST /ui/slides/{id}/{create|notify|cancel}``: send it to the app."""
        self._slide(slide_id)
        body = _read_json(request)
        if body.get("appUrl"):
            self.driver.app_url = str(body["appUrl"])
        if action == "create":
            answer = await self.driver.create(
                slide_id, body.get("input"), _region(body.get("region"))
            )
        elif action == "notify":
            answer = await self.driver.notify(slide_id)
        elif action == "press":
            result_id, action_id = body.get("resultId"), body.get("actionId")
            if isinstance(result_id, bool) or not isinstance(result_id, int):
                raise UIError(400, "resultId must be an integer")
            if not isinstance(action_id, str):
                raise UIError(400, "actionId must be a string")
            answer = await self.driver.press(slide_id, result_id, action_id)
        elif action == "cancel":
            result_id = body.get("resultId")
            if result_id is not None and (
                isinstance(result_id, bool) or not isinstance(result_id, int)
            ):
                raise UIError(400, "resultId must be an integer")
            answer = await self.driver.cancel(slide_id, result_id)
        else:
            raise UIError(404, f"unknown action {action!r}; use create, notify, cancel or press")
        return _json(request, answer.to_json())

    def results_route(self, request: IRequest) -> bytes:
        """``GET /ui/results[?slide=ID]``."""
        slide = request.args.get(b"slide", [b""])[0].decode()  # type: ignore[union-attr]
        if slide:
            self._slide(slide)
        return _json(request, self.driver.results(slide or None))

    def faults_route(self, request: IRequest) -> bytes:
        """``GET``/``POST /ui/faults``: read or change the fault knobs."""
        now = self.sps.clock.seconds()
        if request.method == b"POST":
            try:
                self.sps.faults.update(_read_json(request), now)
            except ValueError as e:
                raise UIError(400, str(e)) from None
            log.info("faults changed: {faults}", faults=self.sps.faults.to_json(now))
        return _json(request, self.sps.faults.to_json(now))

    def token_route(self, request: IRequest) -> bytes:
        """``POST /ui/token``: a fresh Bearer token for manual calls."""
        lifetime = _read_json(request).get("lifetime")
        if lifetime is not None and (
            isinstance(lifetime, bool) or not isinstance(lifetime, int | float)
        ):
            raise UIError(400, "lifetime must be a number of seconds")
        token = self.sps.issue_token(lifetime)
        return _json(request, {"token": token, "callbackUrl": self.driver.callback_url})

    async def thumbnail_route(self, request: IRequest, slide_id: str) -> bytes:
        """``GET /ui/slides/{id}/thumbnail.jpg``."""
        self._slide(slide_id)
        data = await self.tiles.thumbnail(slide_id, THUMBNAIL_SIDE)
        request.setHeader(b"content-type", b"image/jpeg")
        return data

    async def overlay_route(self, request: IRequest, slide_id: str) -> bytes:
        """``GET /ui/slides/{id}/overlay.png``: the thumbnail with the latest result."""
        data = await self.overlay_png(slide_id)
        request.setHeader(b"content-type", b"image/png")
        request.setHeader(b"cache-control", b"no-store")
        return data

    def label_route(self, request: IRequest, slide_id: str) -> bytes:
        """``GET /ui/slides/{id}/label.jpg``."""
        slide = self._slide(slide_id)
        if slide.label is None:
            raise UIError(404, "the slide has no label")
        request.setHeader(b"content-type", b"image/jpeg")
        return slide.label

    # --- errors ---

    def _ui_error(self, request: IRequest, failure: Any) -> bytes:
        return _json(request, {"error": failure.value.message}, failure.value.status)

    def _driver_error(self, request: IRequest, failure: Any) -> bytes:
        return _json(request, {"error": str(failure.value)}, 502)

    def _not_found(self, request: IRequest, failure: Any) -> bytes:
        return _json(request, {"error": "no such page"}, 404)

    def _not_allowed(self, request: IRequest, failure: Any) -> bytes:
        return _json(request, {"error": "method not allowed"}, 405)

    def _unexpected(self, request: IRequest, failure: Any) -> bytes:
        log.failure("simulator: unhandled error in {path}", failure, path=request.path)
        return _json(request, {"error": "internal error"}, 500)


@define
class SimulatorService(Service):
    """Runs a :class:`Simulator`: slides, listener, registration, and a clean stop.

    ``ready`` fires with this service once the simulator is listening and has logged
    ``dpatia-sps ready``; ``stopService`` closes the listener, the HTTP pool and the
    pyramids, and cancels pending registration attempts.
    """

    config: SimulatorConfig
    reactor: Any
    simulator: Simulator | None = None
    port: IListeningPort | None = None
    ready: Deferred[SimulatorService] = field(factory=Deferred)
    _pending: list[Any] = field(factory=list)
    _pool: HTTPConnectionPool | None = None
    _starting: Deferred[Any] | None = None

    def __attrs_post_init__(self) -> None:
        Service.__init__(self)
        self.setName("sps")

    @property
    def url(self) -> str:
        """The simulator's root URL (the page)."""
        assert self.simulator is not None
        return self.simulator.driver.callback_url[: -len(BASE_PATH)] + "/"

    @property
    def callback_url(self) -> str:
        """The SPS base URL an app calls back (``callbackInfo.url``)."""
        assert self.simulator is not None
        return self.simulator.driver.callback_url

    def startService(self) -> None:
        """Start generating/loading slides, then listen; ``ready`` fires when done."""
        Service.startService(self)
        self._starting = ensureDeferred(self._start())

        def failed(failure: Any) -> None:
            log.failure("dpatia-sps failed to start", failure)
            if not self.ready.called:
                self.ready.errback(failure)

        self._starting.addErrback(failed)

    async def _start(self) -> None:
        config, reactor = self.config, self.reactor
        log.info("dpatia-sps: preparing slides in {data}", data=config.data)
        specs = default_specs(config.scale)
        slide_set: SlideSet = await thread_runner(reactor)(load_or_generate, config.data, specs)
        log.info(
            "dpatia-sps: {count} slides {how} in {data}",
            count=len(slide_set.slides),
            how="generated" if slide_set.generated else "reused",
            data=str(slide_set.directory),
        )
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        simulator = Simulator.create(
            reactor,
            faults=config.faults(),
            http=HTTPClient(Agent(reactor, pool=self._pool)),
            app_url=config.app_url,
        )
        simulator.load(slide_set)
        simulator.sps.version = version_info(config.api_version)
        add_multichannel(simulator, slide_set)
        site = Site(simulator.resource())
        site.displayTracebacks = False
        port = self.port = await serverFromString(reactor, config.listen).listen(site)
        address = port.getHost()
        host = getattr(address, "host", "127.0.0.1")
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        base = (config.public_url or f"http://{host}:{address.port}").rstrip("/")  # type: ignore[attr-defined]
        simulator.driver.callback_url = base + BASE_PATH
        self.simulator = simulator
        now = reactor.seconds()
        if config.down_for:
            start = now + (config.down_after or 0.0)
            simulator.sps.faults.down_from = start
            simulator.sps.faults.down_until = start + config.down_for
        token = simulator.sps.issue_token()
        log.info("dpatia-sps listening on port {port}", port=address.port)  # type: ignore[attr-defined]
        log.info("dpatia-sps page: {url}/", url=base)
        log.info("dpatia-sps callback base URL: {url}", url=simulator.driver.callback_url)
        lifetime = simulator.sps.faults.token_lifetime
        log.info(
            "dpatia-sps token for manual calls ({validity}): {token}",
            validity=f"valid {lifetime:g} s" if lifetime else "does not expire",
            token=token,
        )
        log.info(
            'try: curl -H "Authorization: Bearer {token}" {url}/slides/{slide}/info',
            token=token,
            url=simulator.driver.callback_url,
            slide=slide_set.slides[0].slide_id if slide_set.slides else "ID",
        )
        log.info("dpatia-sps ready")
        if config.app_url:
            self._register_later(0.0, config.register_attempts)
        self.ready.callback(self)

    def _register_later(self, delay: float, attempts_left: int) -> None:
        """Try to register with the app; retry every ``register_interval`` while it is down."""

        def attempt() -> None:
            self._pending.remove(call)
            assert self.simulator is not None
            d = ensureDeferred(self.simulator.driver.register(self.config.app_url))

            def failed(failure: Any) -> None:
                if attempts_left > 1 and self.running:
                    self._register_later(self.config.register_interval, attempts_left - 1)
                else:
                    log.warn(
                        "dpatia-sps: could not register with {url}: {error}",
                        url=self.config.app_url,
                        error=failure.getErrorMessage(),
                    )

            d.addErrback(failed)

        call = self.reactor.callLater(delay, attempt)
        self._pending.append(call)

    def stopService(self) -> Deferred[None]:
        """Stop listening and release everything; fires when done."""
        Service.stopService(self)
        for call in self._pending:
            if call.active():
                call.cancel()
        self._pending.clear()
        return ensureDeferred(self._stop())

    async def _stop(self) -> None:
        if self._starting is not None and not self._starting.called:
            self._starting.cancel()
        if self.port is not None:
            await maybeDeferred(self.port.stopListening)
            self.port = None
        if self._pool is not None:
            await self._pool.closeCachedConnections()
            self._pool = None
        if self.simulator is not None:
            self.simulator.tiles.close()


async def start_simulator(reactor: Any, config: SimulatorConfig) -> SimulatorService:
    """Start a simulator in this process and wait until it listens (stop it with
    ``await service.stopService()``)."""
    service = SimulatorService(config=config, reactor=reactor)
    service.startService()
    await service.ready
    return service


__all__ = [
    "DEFAULT_APP_URL",
    "DEFAULT_DATA",
    "DEFAULT_LISTEN",
    "Simulator",
    "SimulatorConfig",
    "SimulatorService",
    "start_simulator",
]
