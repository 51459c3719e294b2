"""An in-memory SPS: the callback API of IA-API.md §2, served by a non-global Klein app.

:class:`FakeSPS` holds slides, results, tokens and a log of every request, and exposes
knobs that make it misbehave on purpose (``fail_next``, ``hang_next``, token expiry, and
the :class:`~.faults.Faults` of the simulator: latency, a 5xx fraction, dropped
downloads, down windows).
Unit tests talk to it through ``treq.testing.StubTreq(fake.resource())`` (a real
``Agent`` against a real ``Site``, in memory); integration tests serve
``fake.resource()`` from a ``Site`` on a loopback port.  A later task grows it into the
full simulator, so it is built on the same models as the daemon (``Result``,
``VersionInfo``) and keeps its state in plain attrs fields.

Where the sources say nothing (IA-API.md §5), the fake makes the choices dpatia plans
for: a stale or missing ``versionId`` on PUT is a **409** with a JSON ``error``, results
are listed oldest first, unknown things are a JSON 404.

The simulator (:mod:`.server`) serves generated slides through the same class: a
slide's ``tile_renderer`` renders DZI tiles from the real pyramid (off the reactor
thread) and its ``file_paths`` are streamed from disk.
"""

from __future__ import annotations

import json
import re
import secrets
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Generic, TypeVar
from urllib.parse import parse_qs

import attrs
from attrs import define, field, frozen
from klein import Klein
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from werkzeug.exceptions import MethodNotAllowed, NotFound

from ..models import InvalidInput, Result, VersionInfo, result_from_json, unstructure
from .faults import DelayedResource, Faults, FileStream, multipart_segments
from .versions import has_case_lists, has_quality_control, slide_info_for

log = Logger()

#: Where the SPS serves the callback API; ``callbackInfo.url`` is host + this.
BASE_PATH = "/SectraPathologyServer/external/imageanalysis/v1"

#: Slide-info keys only returned with ``includePHI=true`` (IA-API.md §2.2).
PHI_FIELDS = frozenset(
    {
        "seriesInstanceUid",
        "lisSlideId",
        "accessionNumberIssuer",
        "accessionNumber",
        "studyInstanceUid",
        "examId",
        "examDateTime",
        "examFreeFields",
    }
)

#: Slide-info keys only returned with ``scope=extended``.
EXTENDED_FIELDS = frozenset(
    {
        "specimen",
        "bodyPart",
        "examCode",
        "examDescription",
        "stationName",
        "priority",
        "qualityControl",
    }
)

QC_STATUSES = frozenset({"NotSet", "QualityOk", "Rejected"})

TileKey = tuple[int, int, int]
TileSource = dict[TileKey, bytes] | Callable[[int, int, int], bytes | None]
#: ``(level, col, row, extension)`` → the encoded tile, or ``None`` for no such tile.
TileRenderer = Callable[[int, int, int, str], "Deferred[bytes | None]"]

_TILE_NAME = re.compile(r"^(\d+)_(\d+)(?:_([^.]+))?\.([A-Za-z0-9]+)$")
_TILE_TYPES = {"jpg": "image/jpeg", "jpeg": "image/jpeg", "png": "image/png"}
#: Focal planes and optical paths the simulated scanner has (one of each).
_FOCAL_PLANES = {None, "0"}


def default_slide_info(
    slide_id: str,
    *,
    width: int = 4096,
    height: int = 3072,
    tile_size: int = 256,
    microns_per_pixel: float = 0.25,
    accession_number: str = "ACC-0001",
) -> dict[str, Any]:
    """Plausible ``slides/{id}/info`` metadata (extended and PHI fields included)."""
    return {
        "id": slide_id,
        "isStreamable": True,
        "imageSize": {"width": width, "height": height},
        "tileSize": {"width": tile_size, "height": tile_size},
        "micronsPerPixel": microns_per_pixel,
        "focalPlanes": [{"id": "0", "offsetUm": 0.0}],
        "opticalPaths": [{"id": "0", "description": "Brightfield"}],
        "storedTileFormat": {"mimeType": "image/jpeg", "extension": "jpg"},
        "availableTileFormats": [{"mimeType": "image/jpeg", "extension": "jpg"}],
        "fileFormat": {"mimeType": "image/tiff"},
        "staining": {"displayName": "H&E"},
        "block": {"displayName": "A1"},
        "specimen": {"anatomy": "Colon", "description": "Biopsy"},
        "bodyPart": "COLON",
        "examCode": "PAT01",
        "examDescription": "Histopathology",
        "stationName": "SCANNER01",
        "priority": 0,
        "qualityControl": {"status": "NotSet", "versionId": str(uuid.uuid4())},
        "seriesInstanceUid": f"1.2.826.0.1.3680043.8.498.{uuid.uuid4().int % 10**20}",
        "lisSlideId": f"{accession_number}-A1-1",
        "accessionNumberIssuer": "LIS",
        "accessionNumber": accession_number,
        "studyInstanceUid": f"1.2.826.0.1.3680043.8.498.{uuid.uuid4().int % 10**20}",
        "examId": f"EX-{accession_number}",
        "examDateTime": "2025-03-14T09:26:53",
        "examFreeFields": [{"Referrer": "Dr. Example"}],
    }


@define
class FakeSlide:
    """One slide the fake SPS knows.

    ``info`` is the full metadata (PHI included; the endpoint filters it); ``tiles``
    maps ``(level, col, row)`` to bytes or is a callable returning bytes or ``None``;
    ``files`` is what ``slides/{id}/files`` serves, one ``(filename, bytes)`` per file.
    The simulator's slides set ``tile_renderer`` instead of ``tiles`` (it renders any
    tile of the real pyramid, by extension, asynchronously) and ``file_paths`` instead
    of ``files`` (streamed from disk).
    """

    slide_id: str
    info: dict[str, Any]
    label: bytes | None = None
    tiles: TileSource = field(factory=dict)
    files: list[tuple[str, bytes]] = field(factory=list)
    tile_renderer: TileRenderer | None = None
    #: For a multichannel slide: renders a tile of one optical path
    #: ``(level, col, row, ext, optical_path)`` (instead of ``tile_renderer``).
    channel_renderer: Callable[[int, int, int, str, str], Deferred[bytes | None]] | None = None
    file_paths: list[tuple[str, Path]] = field(factory=list)

    def tile(self, level: int, col: int, row: int) -> bytes | None:
        """The bytes of one tile, or ``None`` when there is no such tile."""
        if callable(self.tiles):
            return self.tiles(level, col, row)
        return self.tiles.get((level, col, row))


@frozen
class RecordedRequest:
    """A request as the fake saw it.

    ``path`` is the raw (still percent-encoded) path, ``query`` the parsed query
    (name → values), ``headers`` lower-case names → value (repeated headers joined
    with ``", "`` as RFC 9110 allows), ``body`` the raw bytes.
    """

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes

    def header(self, name: str) -> str | None:
        """The value of a header (case-insensitive), or ``None``."""
        return self.headers.get(name.lower())


class FakeHTTPError(Exception):
    """Answer the current request with ``status`` and ``{"error": message}``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        """Keep the status, the message for the JSON body and extra headers."""
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


class _Hang(Exception):
    """Never answer the current request (``hang_next``)."""


class _Refuse(Exception):
    """Drop the connection without an answer (a down window in ``refuse`` mode)."""


T = TypeVar("T")


class Watchers(Generic[T]):
    """Deferreds waiting for the next value that matches, fired as values happen."""

    def __init__(self) -> None:
        self._waiting: list[tuple[Callable[[T], bool], Deferred[T]]] = []

    def next(self, matching: Callable[[T], bool]) -> Deferred[T]:
        """Fire with the next value ``matching`` accepts; cancelling it stops the wait."""

        def forget(d: Deferred[T]) -> None:
            if entry in self._waiting:
                self._waiting.remove(entry)

        d: Deferred[T] = Deferred(forget)
        entry = (matching, d)
        self._waiting.append(entry)
        return d

    def fire(self, value: T) -> None:
        """``value`` happened: fire the waits it matches."""
        for entry in list(self._waiting):
            if entry[0](value):
                self._waiting.remove(entry)
                entry[1].callback(value)


def _new_version_id() -> str:
    """A fresh versionId (a UUID, as the SPS appears to use)."""
    return str(uuid.uuid4())


def _json_body(request: IRequest, status: int, payload: Any) -> bytes:
    """Set status and JSON content type; return the encoded payload."""
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json; charset=utf-8")
    return json.dumps(payload).encode("utf-8")


def _quote_filename(name: str) -> str:
    """Escape a file name for a quoted-string ``filename=`` parameter."""
    return name.replace("\\", "\\\\").replace('"', '\\"')


@define
class FakeSPS:
    """The SPS callback API in memory.

        State: ``slides``, ``results`` (integer ids; ``result_apps`` names each one's
        application), accepted Bearer ``tokens`` with optional ``token_expiry`` against
        ``clock``, and ``requests``, the requests received (the newest ``max_requests``; the
    count of older ones dropped is ``requests_dropped``, so a simulator left running for
    days does not grow without bound).  Knobs: ``fail_next`` (answer
        the next requests with these statuses; 429/503 carry ``Retry-After: retry_after``
        when set), ``hang_next`` (never answer that many requests), ``version`` (``GET
        /info``), ``client_credentials`` (client id → secret for ``POST /token``), and
        ``faults`` (:class:`~.faults.Faults`: latency, a seeded 5xx fraction, dropped
        downloads, the lifetime of issued tokens, down windows).

        ``clock`` defaults to a ``task.Clock`` that only moves when a test advances it;
        pass the reactor when serving on a real port so that tokens expire in real time.
        Every route records the request, then applies ``hang_next`` and ``fail_next``, then
        checks the token, in that order; the ``faults`` (down window, then the 5xx fraction)
        apply after ``fail_next``, and latency before the route runs.  Slide ids containing ``/`` are not supported
        (Twisted decodes ``%2F`` before routing).
    """

    app = Klein()
    base_path = BASE_PATH

    clock: IReactorTime = field(factory=Clock)
    slides: dict[str, FakeSlide] = field(factory=dict)
    results: dict[int, Result] = field(factory=dict)
    result_apps: dict[int, str] = field(factory=dict)
    tokens: set[str] = field(factory=set)
    token_expiry: dict[str, float] = field(factory=dict)
    requests: list[RecordedRequest] = field(factory=list)
    max_requests: int = 10_000
    requests_dropped: int = 0
    #: Result ids per slide, oldest first, so a listing does not scan every result
    #: (a benchmark stores thousands).  Entries of deleted results are skipped.
    _slide_results: dict[str, list[int]] = field(factory=dict, init=False)
    fail_next: list[int] = field(factory=list)
    retry_after: str | None = None
    hang_next: int = 0
    version: VersionInfo = VersionInfo("1.10", "4.2.0.0")
    client_credentials: dict[str, str] = field(factory=dict)
    token_lifetime: float = 3600.0
    new_version_id: Callable[[], str] = field(default=_new_version_id, repr=False)
    hanging: list[Deferred[bytes]] = field(factory=list, repr=False)
    faults: Faults = field(factory=Faults)
    downloads: int = 0
    #: Raw JSON items listed with a slide's results after the stored ones: what another
    #: tool or an older version may have stored there, in a shape dpatia cannot read.
    foreign_results: dict[str, list[Any]] = field(factory=dict)
    _next_result_id: int = 1
    _stored: Watchers[Result] = field(factory=lambda: Watchers[Result](), init=False, repr=False)

    # --- helpers for tests -------------------------------------------------------------

    def _record(self, recorded: RecordedRequest) -> None:
        """Keep ``recorded``; past ``max_requests``, drop the oldest tenth at once (one
        list copy per many requests, not one per request)."""
        self.requests.append(recorded)
        excess = len(self.requests) - self.max_requests
        if excess > 0:
            drop = max(excess, self.max_requests // 10)
            del self.requests[:drop]
            self.requests_dropped += drop

    def resource(self) -> IResource:
        """The ``IResource`` to mount at the root of a ``Site`` (or hand to StubTreq)."""
        return DelayedResource(self.app.resource(), lambda: self.faults.latency, self.clock)

    def add_slide(
        self,
        slide_id: str | None = None,
        *,
        info: dict[str, Any] | None = None,
        label: bytes | None = None,
        tiles: TileSource | None = None,
        files: list[tuple[str, bytes]] | None = None,
        **info_overrides: Any,
    ) -> FakeSlide:
        """Add a slide with plausible metadata; keyword overrides replace info fields."""
        slide_id = slide_id or uuid.uuid4().hex
        full = dict(info) if info is not None else default_slide_info(slide_id)
        full.update(info_overrides)
        full["id"] = slide_id
        slide = FakeSlide(
            slide_id=slide_id,
            info=full,
            label=label,
            tiles=tiles if tiles is not None else {},
            files=list(files or []),
        )
        self.slides[slide_id] = slide
        return slide

    def issue_token(self, lifetime: float | None = None) -> str:
        """Accept a new random Bearer token (expiring ``lifetime`` s from ``clock`` now;
        by default after ``faults.token_lifetime``, or never if that is unset)."""
        token = secrets.token_urlsafe(24)
        self.tokens.add(token)
        if lifetime is None:
            lifetime = self.faults.token_lifetime
        if lifetime is not None:
            self.token_expiry[token] = self.clock.seconds() + lifetime
        return token

    def store_result(self, app_id: str, result: Result) -> Result:
        """Store a result as ``POST applications/{app}/results`` would, and return it."""
        stored = attrs.evolve(result, id=self._next_result_id, versionId=self.new_version_id())
        # Keep what a client would read back (e.g. a null context becomes {}).
        stored = result_from_json(unstructure(stored))
        self._next_result_id += 1
        self.results[stored.id or 0] = stored
        self.result_apps[stored.id or 0] = app_id
        self._slide_results.setdefault(stored.slideId, []).append(stored.id or 0)
        self._stored.fire(stored)
        return stored

    def next_stored(self, matching: Callable[[Result], bool]) -> Deferred[Result]:
        """Fire with the next result created or updated that ``matching`` accepts (for
        tests that wait for the app instead of polling); cancelling it stops the wait."""
        return self._stored.next(matching)

    def results_for(self, slide_id: str, app_id: str | None = None) -> list[Result]:
        """The stored results on a slide (of one app, if given), oldest first."""
        found = []
        for rid in self._slide_results.get(slide_id, ()):
            r = self.results.get(rid)
            if r is not None and (app_id is None or self.result_apps.get(rid) == app_id):
                found.append(r)
        return found

    # --- request plumbing --------------------------------------------------------------

    def _enter(self, request: IRequest, *, auth: bool = True) -> RecordedRequest:
        """Record the request, apply the failure knobs, check the Bearer token."""
        request.content.seek(0)
        body = request.content.read()
        request.content.seek(0)
        raw_path, _, query = request.uri.partition(b"?")
        recorded = RecordedRequest(
            method=request.method.decode("ascii"),
            path=raw_path.decode("utf-8", errors="replace"),
            query=parse_qs(query.decode("utf-8", errors="replace"), keep_blank_values=True),
            headers={
                name.decode("latin-1").lower(): ", ".join(v.decode("latin-1") for v in values)
                for name, values in request.requestHeaders.getAllRawHeaders()
            },
            body=body,
        )
        self._record(recorded)
        if self.hang_next > 0:
            self.hang_next -= 1
            raise _Hang()
        if self.fail_next:
            status = self.fail_next.pop(0)
            headers = {}
            if status in (429, 503) and self.retry_after is not None:
                headers["Retry-After"] = self.retry_after
            raise FakeHTTPError(status, "injected failure", headers)
        now = self.clock.seconds()
        if self.faults.is_down(now):
            if self.faults.down_mode == "refuse":
                raise _Refuse()
            raise FakeHTTPError(
                503, "the SPS is down (injected)", {"Retry-After": self.faults.retry_after(now)}
            )
        injected = self.faults.injected_error()
        if injected is not None:
            raise FakeHTTPError(injected, "injected failure (error rate)")
        if auth:
            self._check_token(recorded)
        return recorded

    def _check_token(self, recorded: RecordedRequest) -> None:
        scheme, _, token = (recorded.header("authorization") or "").partition(" ")
        challenge = {"WWW-Authenticate": "Bearer"}
        # Never echo the token: error bodies end up in logs.
        if scheme.lower() != "bearer" or token not in self.tokens:
            raise FakeHTTPError(401, "missing or unknown Bearer token", challenge)
        expiry = self.token_expiry.get(token)
        if expiry is not None and self.clock.seconds() >= expiry:
            raise FakeHTTPError(401, "token expired", challenge)

    def _slide(self, slide_id: str) -> FakeSlide:
        """The slide, or a JSON 404."""
        slide = self.slides.get(slide_id)
        if slide is None:
            raise FakeHTTPError(404, "unknown slide")
        return slide

    @staticmethod
    def _json_request(recorded: RecordedRequest) -> Any:
        """The request body as JSON, or a 400."""
        try:
            return json.loads(recorded.body)
        except ValueError:
            raise FakeHTTPError(400, "the body is not JSON") from None

    @staticmethod
    def _parse_result(data: Any) -> Result:
        """A :class:`Result` from JSON, or a 400 naming the field."""
        try:
            return result_from_json(data)
        except InvalidInput as e:
            raise FakeHTTPError(400, f"invalid result: {e.message} at {e.field}") from None

    def _owned_result(self, app_id: str, result_id: int) -> Result:
        """The result if it belongs to ``app_id``, else a 404."""
        result = self.results.get(result_id)
        if result is None or self.result_apps.get(result_id) != app_id:
            raise FakeHTTPError(404, "unknown result")
        return result

    @staticmethod
    def _flag(recorded: RecordedRequest, name: str, value: str = "true") -> bool:
        """Whether query parameter ``name`` equals ``value`` (case-insensitive)."""
        return any(v.lower() == value for v in recorded.query.get(name, []))

    # --- routes: version and slides ----------------------------------------------------

    @app.route(BASE_PATH + "/info", methods=["GET"])
    def info(self, request: IRequest) -> bytes:
        """``GET /info``: the SPS's API and software version."""
        self._enter(request)
        return _json_body(request, 200, unstructure(self.version))

    @app.route(BASE_PATH + "/slides/<slide_id>/info", methods=["GET"])
    def slide_info(self, request: IRequest, slide_id: str) -> bytes:
        """``GET slides/{id}/info``: ``scope=extended`` and ``includePHI=true`` honoured."""
        recorded = self._enter(request)
        slide = self._slide(slide_id)
        hidden: set[str] = set()
        if not self._flag(recorded, "scope", "extended"):
            hidden |= EXTENDED_FIELDS
        if not self._flag(recorded, "includePHI"):
            hidden |= PHI_FIELDS
        info = {k: v for k, v in slide.info.items() if k not in hidden}
        return _json_body(request, 200, slide_info_for(self.version, info))

    @app.route(BASE_PATH + "/slides/<slide_id>/label", methods=["GET"])
    def label(self, request: IRequest, slide_id: str) -> bytes:
        """``GET slides/{id}/label``: JPEG bytes, or 204 when the slide has no label."""
        self._enter(request)
        slide = self._slide(slide_id)
        if slide.label is None:
            request.setResponseCode(204)
            return b""
        request.setHeader(b"content-type", b"image/jpeg")
        return slide.label

    @app.route(BASE_PATH + "/images/<slide_files>/<int:level>/<tile_name>", methods=["GET"])
    def tile(
        self, request: IRequest, slide_files: str, level: int, tile_name: str
    ) -> bytes | Deferred[bytes]:
        """``GET images/{slideId}_files/{level}/{col}_{row}[_{focalPlane}].{ext}``."""
        recorded = self._enter(request)
        match = _TILE_NAME.match(tile_name)
        if not slide_files.endswith("_files") or match is None:
            raise FakeHTTPError(404, "not a DZI tile path")
        slide = self._slide(slide_files[: -len("_files")])
        col, row, ext = int(match.group(1)), int(match.group(2)), match.group(4).lower()
        if slide.channel_renderer is not None:
            return self._channel_tile(request, recorded, slide, level, col, row, ext, match)
        if slide.tile_renderer is not None:
            if ext not in _TILE_TYPES:
                raise FakeHTTPError(404, f"tiles are not available as .{ext}")
            if match.group(3) not in _FOCAL_PLANES:
                raise FakeHTTPError(404, "no such focal plane")
            if recorded.query.get("opticalPath", ["0"])[0] != "0":
                raise FakeHTTPError(404, "no such optical path")

            def rendered(data: bytes | None) -> bytes:
                if data is None:
                    raise FakeHTTPError(404, "no such tile")
                request.setHeader(b"content-type", _TILE_TYPES[ext])
                return data

            return slide.tile_renderer(level, col, row, ext).addCallback(rendered)
        data = slide.tile(level, col, row)
        if data is None:
            raise FakeHTTPError(404, "no such tile")
        request.setHeader(b"content-type", _TILE_TYPES.get(ext, "application/octet-stream"))
        return data

    def _channel_tile(
        self,
        request: IRequest,
        recorded: RecordedRequest,
        slide: FakeSlide,
        level: int,
        col: int,
        row: int,
        ext: str,
        match: Any,
    ) -> Deferred[bytes]:
        """A tile of one optical path of a multichannel slide (``?opticalPath=``; the
        first path when not named)."""
        assert slide.channel_renderer is not None
        paths = [str(p.get("id")) for p in slide.info.get("opticalPaths") or []]
        path = recorded.query.get("opticalPath", paths[:1])[0]
        if ext not in _TILE_TYPES or match.group(3) not in _FOCAL_PLANES:
            raise FakeHTTPError(404, "no such tile format or focal plane")
        if path not in paths:
            raise FakeHTTPError(404, "no such optical path")

        def rendered(data: bytes | None) -> bytes:
            if data is None:
                raise FakeHTTPError(404, "no such tile")
            request.setHeader(b"content-type", _TILE_TYPES[ext])
            return data

        return slide.channel_renderer(level, col, row, ext, path).addCallback(rendered)

    @app.route(BASE_PATH + "/slides/<slide_id>/files", methods=["GET"])
    def files(self, request: IRequest, slide_id: str) -> bytes | IResource:
        """``GET slides/{id}/files``: one octet-stream file, or ``multipart/related``.

        Files on disk (``file_paths``) are streamed; a download the ``faults`` say to
        cut is streamed too, and the connection is closed part-way.
        """
        self._enter(request)
        slide = self._slide(slide_id)
        if not slide.files and not slide.file_paths:
            raise FakeHTTPError(404, "the slide has no files")
        self.downloads += 1
        drop_after = self.faults.take_drop()
        if slide.file_paths or drop_after is not None:
            sources: list[tuple[str, bytes | Path]] = list(slide.file_paths or slide.files)
            return FileStream(sources, f"dpatia-sim-{uuid.uuid4().hex}", drop_after)
        if len(slide.files) == 1:
            name, data = slide.files[0]
            request.setHeader(b"content-type", b"application/octet-stream")
            request.setHeader(
                b"content-disposition", f'attachment; filename="{_quote_filename(name)}"'
            )
            request.setHeader(b"content-length", str(len(data)))
            return data
        boundary = f"dpatia-fake-{uuid.uuid4().hex}"
        body = multipart_related(slide.files, boundary)
        request.setHeader(b"content-type", f"multipart/related; boundary={boundary}")
        request.setHeader(b"content-length", str(len(body)))
        return body

    @app.route(BASE_PATH + "/slides/<slide_id>/qualityControl", methods=["PUT"])
    def quality_control(self, request: IRequest, slide_id: str) -> bytes:
        """``PUT slides/{id}/qualityControl``: store the status; a stale versionId is 409."""
        recorded = self._enter(request)
        if not has_quality_control(self.version):
            raise FakeHTTPError(404, f"no such endpoint in IA-API {self.version.apiVersion}")
        slide = self._slide(slide_id)
        data = self._json_request(recorded)
        qc = data.get("qualityControl") if isinstance(data, dict) else None
        if not isinstance(qc, dict) or qc.get("status") not in QC_STATUSES:
            raise FakeHTTPError(
                400, "qualityControl.status must be one of " + ", ".join(sorted(QC_STATUSES))
            )
        current = (slide.info.get("qualityControl") or {}).get("versionId")
        if current is not None and qc.get("versionId") != current:
            raise FakeHTTPError(409, f"versionId conflict: {qc.get('versionId')!r} is not current")
        slide.info["qualityControl"] = {"status": qc["status"], "versionId": self.new_version_id()}
        request.setResponseCode(200)
        return b""

    def _need_case_lists(self) -> None:
        if not has_case_lists(self.version):
            raise FakeHTTPError(404, f"no such endpoint in IA-API {self.version.apiVersion}")

    def _case_entry(self, slide: FakeSlide, include_phi: bool) -> dict[str, Any]:
        """One slide of a case listing (PHI identifiers only on request)."""
        entry = {
            key: slide.info[key]
            for key in ("staining", "block", "specimen")
            if slide.info.get(key) is not None
        }
        entry["id"] = slide.slide_id
        if include_phi:
            for key in ("seriesInstanceUid", "lisSlideId"):
                if key in slide.info:
                    entry[key] = slide.info[key]
        return entry

    @app.route(BASE_PATH + "/slides/<slide_id>/request/images/info", methods=["GET"])
    def slide_request_images(self, request: IRequest, slide_id: str) -> bytes:
        """``GET slides/{id}/request/images/info``: the slides of the same case."""
        recorded = self._enter(request)
        self._need_case_lists()
        accession = self._slide(slide_id).info.get("accessionNumber")
        case = [s for s in self.slides.values() if s.info.get("accessionNumber") == accession]
        include_phi = self._flag(recorded, "includePHI")
        return _json_body(request, 200, [self._case_entry(s, include_phi) for s in case])

    @app.route(BASE_PATH + "/requests/<accession_number>/images/info", methods=["GET"])
    def request_images(self, request: IRequest, accession_number: str) -> bytes:
        """``GET requests/{accessionNumber}/images/info``; either issuer parameter name."""
        recorded = self._enter(request)
        self._need_case_lists()
        # The sources disagree on the parameter's name (IA-API.md §2.8): accept both.
        issuers = recorded.query.get("accessionNumberIssuer") or recorded.query.get(
            "accessionNumberIssuerId"
        )
        issuer = issuers[0] if issuers else None
        case = [
            s
            for s in self.slides.values()
            if s.info.get("accessionNumber") == accession_number
            and (issuer is None or s.info.get("accessionNumberIssuer") == issuer)
        ]
        if not case:
            raise FakeHTTPError(404, "unknown request")
        include_phi = self._flag(recorded, "includePHI")
        return _json_body(request, 200, [self._case_entry(s, include_phi) for s in case])

    # --- routes: results ---------------------------------------------------------------

    @app.route(BASE_PATH + "/applications/<app_id>/results/slide/<slide_id>", methods=["GET"])
    def list_results(self, request: IRequest, app_id: str, slide_id: str) -> bytes:
        """``GET applications/{app}/results/slide/{slide}``: this app's results, oldest first."""
        self._enter(request)
        self._slide(slide_id)
        listed = [unstructure(r) for r in self.results_for(slide_id, app_id)]
        return _json_body(request, 200, listed + self.foreign_results.get(slide_id, []))

    @app.route(BASE_PATH + "/applications/<app_id>/results", methods=["POST"])
    @app.route(BASE_PATH + "/applications/<app_id>/results/", methods=["POST"])
    def create_result(self, request: IRequest, app_id: str) -> bytes:
        """``POST applications/{app}/results``: store, assign id and versionId, answer 201."""
        recorded = self._enter(request)
        result = self._parse_result(self._json_request(recorded))
        self._slide(result.slideId)
        stored = self.store_result(app_id, result)
        return _json_body(request, 201, unstructure(stored))

    @app.route(BASE_PATH + "/applications/<app_id>/results/<int:result_id>", methods=["GET"])
    def get_result(self, request: IRequest, app_id: str, result_id: int) -> bytes:
        """``GET applications/{app}/results/{id}``."""
        self._enter(request)
        return _json_body(request, 200, unstructure(self._owned_result(app_id, result_id)))

    @app.route(BASE_PATH + "/applications/<app_id>/results/<int:result_id>", methods=["PUT"])
    def update_result(self, request: IRequest, app_id: str, result_id: int) -> bytes:
        """``PUT applications/{app}/results/{id}``: needs the current versionId, else 409."""
        recorded = self._enter(request)
        current = self._owned_result(app_id, result_id)
        result = self._parse_result(self._json_request(recorded))
        if result.id is not None and result.id != result_id:
            raise FakeHTTPError(400, "the body's id does not match the path")
        if result.slideId != current.slideId:
            raise FakeHTTPError(400, "a result cannot move to another slide")
        if result.versionId != current.versionId:
            raise FakeHTTPError(
                409,
                f"versionId conflict: {result.versionId!r} is not the current version",
            )
        stored = attrs.evolve(result, id=result_id, versionId=self.new_version_id())
        self.results[result_id] = stored
        self._stored.fire(stored)
        return _json_body(request, 200, unstructure(stored))

    # --- routes: tokens ----------------------------------------------------------------

    @app.route(BASE_PATH + "/token", methods=["POST"])
    def token(self, request: IRequest) -> bytes:
        """``POST /token?applicationId=``: client credentials (HTTP Basic) → Bearer token."""
        recorded = self._enter(request, auth=False)
        if not recorded.query.get("applicationId", [""])[0]:
            raise FakeHTTPError(400, "applicationId is required")
        form = parse_qs(recorded.body.decode("utf-8", errors="replace"))
        if form.get("grant_type") != ["client_credentials"]:
            raise FakeHTTPError(400, "unsupported_grant_type")
        user = request.getUser().decode("utf-8", errors="replace")
        password = request.getPassword().decode("utf-8", errors="replace")
        if not user or self.client_credentials.get(user) != password:
            raise FakeHTTPError(401, "invalid_client", {"WWW-Authenticate": "Basic"})
        token = self.issue_token(self.token_lifetime)
        return _json_body(
            request,
            200,
            {"access_token": token, "token_type": "Bearer", "expires_in": self.token_lifetime},
        )

    # --- errors (one place maps them to HTTP) ------------------------------------------

    @app.handle_errors(FakeHTTPError)
    def _http_error(self, request: IRequest, failure: Failure) -> bytes:
        """Answer a :class:`FakeHTTPError` with its status, headers and JSON error."""
        error: FakeHTTPError = failure.value  # type: ignore[assignment]
        for name, value in error.headers.items():
            request.setHeader(name, value)
        return _json_body(request, error.status, {"error": error.message})

    @app.handle_errors(_Hang)
    def _hang(self, request: IRequest, failure: Failure) -> Deferred[bytes]:
        """Leave the request unanswered."""
        # The client's deadline is what ends this; a disconnect cancels it.
        d: Deferred[bytes] = Deferred(lambda d: self.hanging.remove(d))
        self.hanging.append(d)
        return d

    @app.handle_errors(_Refuse)
    def _refuse(self, request: IRequest, failure: Failure) -> Deferred[bytes]:
        """Abort the connection without an answer; the request is never finished."""
        transport = getattr(request, "transport", None)
        if transport is not None:
            transport.abortConnection()
        return Deferred()

    @app.handle_errors(NotFound)
    def _not_found(self, request: IRequest, failure: Failure) -> bytes:
        """No route matched: a JSON 404."""
        return _json_body(request, 404, {"error": "no such endpoint"})

    @app.handle_errors(MethodNotAllowed)
    def _method_not_allowed(self, request: IRequest, failure: Failure) -> bytes:
        """Wrong method for the route: a JSON 405."""
        return _json_body(request, 405, {"error": "method not allowed"})

    @app.handle_errors(Exception)
    def _internal_error(self, request: IRequest, failure: Failure) -> bytes:
        """Anything else: logged, and a JSON 500 without a traceback."""
        log.failure(
            "fake SPS: unhandled error in {method} {path}",
            failure,
            method=request.method,
            path=request.path,
        )
        return _json_body(request, 500, {"error": "internal error"})


def multipart_related(files: list[tuple[str, bytes]], boundary: str) -> bytes:
    """Frame files as one ``multipart/related`` body, the way the SPS sends several files."""
    segments = multipart_segments(files, boundary)
    return b"".join(s for s in segments if isinstance(s, bytes))


__all__ = [
    "BASE_PATH",
    "EXTENDED_FIELDS",
    "PHI_FIELDS",
    "FakeHTTPError",
    "FakeSPS",
    "FakeSlide",
    "RecordedRequest",
    "default_slide_info",
    "multipart_related",
]
