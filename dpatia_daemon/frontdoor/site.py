"""The front door's HTTP plumbing: the request and site, JSON in and out, and the one
place that maps errors to HTTP.

The Klein routes (:mod:`dpatia_daemon.frontdoor.routes`) raise; this module answers.
Every response, errors included, is JSON and carries ``X-Sectra-ApiVersion`` and
``X-Sectra-SoftwareVersion`` (:class:`IARequest`); an error's body is
``{"error": ..., "field": ...}`` (:func:`handle_errors`), never a traceback.

Bodies have two limits (:class:`BodyLimits`): ``[server] max_body_bytes`` for image
notifications, creates and cancels, ``[server] max_result_body_bytes`` for the modify
and delete that carry a whole stored result.  :func:`parse_json` bounds the shape too
(nesting depth, string length, number literals; no NaN or Infinity, which no JSON
writer may send back), so hostile JSON is a 400 naming the problem, never a 500.
"""

from __future__ import annotations

import json
import math
from functools import partial
from typing import Any
from urllib.parse import unquote_to_bytes

from attrs import frozen
from klein import Klein
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from twisted.web.server import Request, Site
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound

from .._version import __version__
from ..config import AccessLog, Config
from ..models import InvalidInput, dumps
from ..sps.client import SPSError
from .clients import ClientCheck

log = Logger()

JSON_TYPE = b"application/json"


class APIError(Exception):
    """An error answered with ``status`` and ``{"error": message, "field": field}``."""

    status = 400

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class CallbackNotAllowed(APIError):
    status = 403


class BodyTooLarge(APIError):
    status = 413


class UnsupportedMediaType(APIError):
    status = 415


class Unavailable(APIError):
    """503 with ``Retry-After``: the request was fine, but cannot be taken now."""

    status = 503

    def __init__(self, message: str, retry_after: int, field: str | None = None) -> None:
        super().__init__(message, field)
        self.retry_after = retry_after


# --- the request and site -------------------------------------------------------------


class IARequest(Request):
    """A request that stops buffering its body past its limit.

    Twisted's Site reads the whole body before a route runs; counting here keeps
    memory bounded whatever a client sends, and lets the route answer 413.  The limit
    is ``max_large_body_bytes`` for a path in ``large_paths`` (the route that takes
    modify and delete, whose action is only known once the body is parsed: the route
    applies the small limit to the others) and ``max_body_bytes`` elsewhere.
    :func:`make_site` passes the configured limits and API version to each request,
    and the ``clients`` check (``[server] allowed_clients``): a refused peer's body is
    dropped unread and its answer is 403, before any route runs.
    """

    body_too_large = False
    #: Why the peer may not call (``[server] allowed_clients``), or None.
    refused: str | None = None
    #: The body's length so far (all of it, even past the limit).
    received = 0

    def __init__(
        self,
        channel: http.HTTPChannel,
        queued: object = None,
        *,
        max_body_bytes: int = 1024 * 1024,
        max_large_body_bytes: int | None = None,
        large_paths: frozenset[bytes] = frozenset(),
        api_version: str = "1.5",
        clients: ClientCheck | None = None,
    ) -> None:
        super().__init__(channel)
        self.clients = clients
        self.max_body_bytes = max_body_bytes
        self.max_large_body_bytes = max(max_body_bytes, max_large_body_bytes or 0)
        self.large_paths = large_paths
        self.api_version = api_version
        self.body_limit = self.max_body_bytes

    def gotLength(self, length: int | None) -> None:
        # The headers are in: refuse a peer that may not call before its body arrives.
        if self.clients is not None:
            self.refused = self.clients.refusal(self.client)
        # The request line is parsed, but ``self.path`` is only set once the body is in:
        # the channel has the path already.
        path = getattr(self.channel, "_path", None)
        if not isinstance(path, bytes) or path.split(b"?", 1)[0] in self.large_paths:
            self.body_limit = self.max_large_body_bytes
        if length is not None and length > self.body_limit:
            self.body_too_large = True
            self.received = length
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self.body_too_large or self.refused is not None:
            return
        self.received += len(data)
        if self.received > self.body_limit:
            self.body_too_large = True
            if self.content is not None:
                self.content.seek(0)
                self.content.truncate()
            return
        super().handleContentChunk(data)

    def process(self) -> None:
        # One place for the headers every answer carries, errors and 404s included.
        self.setHeader(b"X-Sectra-ApiVersion", self.api_version.encode("ascii"))
        self.setHeader(b"X-Sectra-SoftwareVersion", __version__.encode("ascii"))
        self.setHeader(b"Content-Type", JSON_TYPE)
        self.setHeader(b"Cache-Control", b"no-store")
        refusal = (403, self.refused) if self.refused is not None else _unroutable(self)
        if refusal is not None:
            # No route runs: nothing is read, written or asked of the SPS.
            self.site = getattr(self.channel, "site", None)
            status, message = refusal
            self.write(json_answer(self, {"error": message, "field": None}, status))
            self.finish()
            return
        super().process()


def _unroutable(request: Request) -> tuple[int, str] | None:
    """A 400 for a path or Host that is not UTF-8 once percent-decoded (Klein would
    log a traceback and answer in plain text), else None."""
    path = request.uri.split(b"?", 1)[0]
    try:
        unquote_to_bytes(path).decode("utf-8")
    except UnicodeDecodeError:
        return 400, "the request path is not UTF-8 (once percent-decoded)"
    try:
        (request.getHeader(b"host") or b"").decode("utf-8")
    except UnicodeDecodeError:
        return 400, "the Host header is not UTF-8"
    return None


class IASite(Site):
    """A site that writes access-log lines only for the answers ``access_log`` names.

    Every accepted job already gets its own log line; a second line per request for
    each of the thousands of slides a scanner imports is noise at 3 a.m. and a tenth
    of an acknowledgement's CPU.  Refusals (4xx/5xx) have no other line, so they keep
    theirs by default.
    """

    def __init__(
        self, resource: IResource, *, access_log: AccessLog = AccessLog.ERRORS, **kwargs: Any
    ) -> None:
        super().__init__(resource, **kwargs)
        self.access_log = access_log

    def log(self, request: http.Request) -> None:
        if self.access_log is AccessLog.ALL or (
            self.access_log is AccessLog.ERRORS and request.code >= 400
        ):
            super().log(request)


def make_site(resource: IResource, config: Config) -> Site:
    """The HTTP site for ``resource``: bounded bodies, no tracebacks, no access-log PII."""
    requests = partial(
        IARequest,
        max_body_bytes=config.server.max_body_bytes,
        max_large_body_bytes=config.server.max_result_body_bytes,
        large_paths=frozenset({config.server.route.encode("ascii")}),
        api_version=config.server.api_version,
        clients=ClientCheck(config.server.allowed_clients),
    )
    # The IA-API speaks JSON only: without this, Twisted parses the Content-Type of every
    # POST (through the email package: a fifth of an acknowledgement's CPU) to decode
    # form submissions nobody sends here.
    site = IASite(
        resource,
        access_log=config.server.access_log,
        requestFactory=requests,
        parsePOSTFormSubmission=False,
    )
    site.displayTracebacks = False
    return site


# --- JSON in and out ------------------------------------------------------------------


def json_answer(request: IRequest, body: Any, status: int = 200) -> bytes:
    """``body`` as the JSON answer to ``request``, with ``status``."""
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", JSON_TYPE)
    data = dumps(body)  # a stored result read from the SPS may hold RawJSON content
    # Known length, so an answer from an async route goes out in one piece, not chunked.
    request.setHeader(b"Content-Length", b"%d" % len(data))
    return data


@frozen
class BodyLimits:
    """The bounds of a request body (``[server]``): its size, and its JSON's shape."""

    #: Image notifications, creates and cancels.
    max_body_bytes: int = 1024 * 1024
    #: Modify and delete, which carry a whole stored result.
    max_result_body_bytes: int = 64 * 1024 * 1024
    max_depth: int = 64
    max_string: int = 1024 * 1024

    @classmethod
    def of(cls, config: Config) -> BodyLimits:
        """The limits ``config``'s ``[server]`` section sets."""
        server = config.server
        return cls(
            max_body_bytes=server.max_body_bytes,
            max_result_body_bytes=max(server.max_body_bytes, server.max_result_body_bytes),
            max_depth=server.max_json_depth,
            max_string=server.max_json_string,
        )


#: A number literal longer than this is refused (no coordinate or id needs more).
MAX_NUMBER_CHARS = 100


def too_large(what: str, size: int, limit: int, key: str) -> BodyTooLarge:
    """The 413 for a body of ``size`` bytes over ``limit`` (``[server] key``)."""
    return BodyTooLarge(
        f"the request body ({size} bytes) is larger than {limit} bytes, "
        f"the limit for {what} ([server] {key})"
    )


def read_body(request: IRequest, limit: int, what: str, key: str) -> bytes:
    """The request's JSON body as bytes; refuses a body over ``limit``
    (``[server] key``, the limit for ``what``) or another content type."""
    size = getattr(request, "received", 0)
    if getattr(request, "body_too_large", False):
        raise too_large(what, size, min(limit, getattr(request, "body_limit", limit)), key)
    ctype = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
    if ctype != JSON_TYPE and not (ctype.startswith(b"application/") and ctype.endswith(b"+json")):
        raise UnsupportedMediaType(
            "the request body must be application/json, not "
            + (ctype.decode("latin-1") or "unspecified"),
            "Content-Type",
        )
    raw = request.content.read() if request.content is not None else b""
    if len(raw) > limit:
        raise too_large(what, len(raw), limit, key)
    return raw


def parse_json(raw: bytes, limits: BodyLimits) -> Any:
    """``raw`` as JSON within ``limits``' depth and string length; plain blocking work.

    Refuses (:class:`InvalidInput`, a 400 naming the problem) text that is not JSON,
    NaN and Infinity, numbers that overflow a float or have more than
    :data:`MAX_NUMBER_CHARS` characters, nesting deeper than ``max_depth`` and strings
    longer than ``max_string``.  The number hooks are Python calls, so a parse in a
    thread lets the reactor's thread take the GIL between them.
    """
    try:
        data = json.loads(
            raw,
            parse_int=_bounded_int,
            parse_float=_finite_float,
            parse_constant=_no_constant,
        )
    except RecursionError:
        raise _too_deep(limits) from None
    except InvalidInput:
        raise
    except (UnicodeDecodeError, ValueError) as e:
        raise InvalidInput(f"the request body is not valid JSON ({e})", "$") from None
    if b"\\ud" in raw or b"\\uD" in raw:
        _check_text(data)
    # Cheap tests in C first: most bodies cannot break either bound.
    if len(raw) > limits.max_string or raw.count(b"[") + raw.count(b"{") > limits.max_depth:
        _check_shape(data, limits)
    return data


def _check_text(data: Any) -> None:
    """Refuse a lone surrogate (``"\\ud800"`` unpaired): valid JSON, but no text, and
    a 500 in whatever later encodes it (a job key, a file, an SPS call)."""
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInput(
            "the request body has a string with an unpaired surrogate escape (\\ud800-"
            "\\udfff), which is not text",
            "$",
        ) from None


def _short_number(text: str, unit: str) -> str:
    if len(text) > MAX_NUMBER_CHARS:
        raise InvalidInput(
            f"the request body has a number of {len(text)} {unit} "
            f"(at most {MAX_NUMBER_CHARS} are accepted)",
            "$",
        )
    return text


def _bounded_int(text: str) -> int:
    return int(_short_number(text, "digits"))


def _finite_float(text: str) -> float:
    value = float(_short_number(text, "characters"))
    if not math.isfinite(value):
        raise InvalidInput(f"the request body has a number out of range ({text})", "$")
    return value


def _no_constant(text: str) -> Any:
    raise InvalidInput(f"the request body has {text}, which is not a JSON number", "$")


def _too_deep(limits: BodyLimits) -> InvalidInput:
    return InvalidInput(
        f"the request body is nested deeper than {limits.max_depth} levels "
        "([server] max_json_depth)",
        "$",
    )


def _check_shape(data: Any, limits: BodyLimits) -> None:
    """Refuse ``data`` nested deeper than ``max_depth`` or with a longer string than
    ``max_string`` (keys included); iterative, so no depth can overflow a stack."""
    longest, deepest = limits.max_string, limits.max_depth
    if isinstance(data, str) and len(data) > longest:
        raise _too_long(data, limits)
    containers: list[tuple[Any, int]] = [(data, 1)]
    while containers:
        value, depth = containers.pop()
        if isinstance(value, dict):
            for name in value:
                if len(name) > longest:
                    raise _too_long(name, limits)
            children: Any = value.values()
        elif isinstance(value, list):
            children = value
        else:
            continue
        if depth > deepest:
            raise _too_deep(limits)
        for child in children:
            if isinstance(child, (dict, list)):
                containers.append((child, depth + 1))
            elif isinstance(child, str) and len(child) > longest:
                raise _too_long(child, limits)


def _too_long(text: str, limits: BodyLimits) -> InvalidInput:
    return InvalidInput(
        f"the request body has a string of {len(text)} characters, longer than "
        f"{limits.max_string} ([server] max_json_string)",
        "$",
    )


# --- errors: the one place that maps them to HTTP -------------------------------------


def handle_errors(app: Klein) -> None:
    """Answer every error ``app``'s routes raise as JSON, the catch-all last."""
    app.handle_errors(APIError)(_api_error)
    app.handle_errors(InvalidInput)(_invalid_input)
    app.handle_errors(MethodNotAllowed)(_method_not_allowed)
    app.handle_errors(NotFound)(_not_found)
    app.handle_errors(HTTPException)(_http_exception)
    app.handle_errors(SPSError)(_sps_error)
    app.handle_errors(Exception)(_unexpected)


def _error(request: IRequest, message: str, field: str | None, status: int) -> bytes:
    return json_answer(request, {"error": message, "field": field}, status)


def _api_error(request: IRequest, failure: Failure) -> bytes:
    e: APIError = failure.value  # type: ignore[assignment]
    if isinstance(e, Unavailable):
        request.setHeader(b"Retry-After", b"%d" % e.retry_after)
    return _error(request, e.message, e.field, e.status)


def _invalid_input(request: IRequest, failure: Failure) -> bytes:
    e: InvalidInput = failure.value  # type: ignore[assignment]
    return _error(request, e.message, e.field, 400)


def _method_not_allowed(request: IRequest, failure: Failure) -> bytes:
    allowed = getattr(failure.value, "valid_methods", None) or []
    if allowed:
        request.setHeader(b"Allow", ", ".join(allowed).encode("ascii"))
    method = request.method.decode("latin-1")
    return _error(request, f"method {method} not allowed here", None, 405)


def _not_found(request: IRequest, failure: Failure) -> bytes:
    return _error(request, "no such resource", None, 404)


def _http_exception(request: IRequest, failure: Failure) -> bytes:
    e: HTTPException = failure.value  # type: ignore[assignment]
    return _error(request, e.description or e.name, None, e.code or 500)


def _sps_error(request: IRequest, failure: Failure) -> bytes:
    log.warn("SPS call failed while answering: {error}", error=str(failure.value))
    return _error(
        request,
        f"the Sectra Pathology Server could not be reached or refused: {failure.value}",
        None,
        502,
    )


def _unexpected(request: IRequest, failure: Failure) -> bytes:
    log.failure(
        "unexpected error answering {method} {path}",
        failure,
        method=request.method.decode("latin-1"),
        path=request.path.decode("latin-1"),
    )
    return _error(request, "internal error; see the daemon log", None, 500)
