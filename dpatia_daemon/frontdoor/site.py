"""The front door's HTTP plumbing: the request and site, JSON in and out, and the one
place that maps errors to HTTP.

The Klein routes (:mod:`dpatia_daemon.frontdoor.routes`) raise; this module answers.
Every response, errors included, is JSON and carries ``X-Sectra-ApiVersion`` and
``X-Sectra-SoftwareVersion`` (:class:`IARequest`); an error's body is
``{"error": ..., "field": ...}`` (:func:`handle_errors`), never a traceback.
"""

from __future__ import annotations

import json
from functools import partial
from typing import Any

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
from ..models import InvalidInput
from ..sps.client import SPSError

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


# --- the request and site -------------------------------------------------------------


class IARequest(Request):
    """A request that stops buffering its body past ``max_body_bytes``.

    Twisted's Site reads the whole body before a route runs; counting here keeps
    memory bounded whatever a client sends, and lets the route answer 413.
    :func:`make_site` passes the configured limit and API version to each request.
    """

    body_too_large = False
    _received = 0

    def __init__(
        self,
        channel: http.HTTPChannel,
        queued: object = None,
        *,
        max_body_bytes: int = 1024 * 1024,
        api_version: str = "1.5",
    ) -> None:
        super().__init__(channel)
        self.max_body_bytes = max_body_bytes
        self.api_version = api_version

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self.max_body_bytes:
            self.body_too_large = True
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self.body_too_large:
            return
        self._received += len(data)
        if self._received > self.max_body_bytes:
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
        super().process()


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
        api_version=config.server.api_version,
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
    data = json.dumps(body).encode("utf-8")
    # Known length, so an answer from an async route goes out in one piece, not chunked.
    request.setHeader(b"Content-Length", b"%d" % len(data))
    return data


def read_json(request: IRequest, max_body_bytes: int) -> Any:
    """The request's JSON body; refuses a body over the limit, another content type,
    or text that is not JSON."""
    if getattr(request, "body_too_large", False):
        raise BodyTooLarge(f"the request body is larger than max_body_bytes ({max_body_bytes})")
    ctype = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
    if ctype != JSON_TYPE and not (ctype.startswith(b"application/") and ctype.endswith(b"+json")):
        raise UnsupportedMediaType(
            "the request body must be application/json, not "
            + (ctype.decode("latin-1") or "unspecified"),
            "Content-Type",
        )
    raw = request.content.read() if request.content is not None else b""
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, ValueError) as e:
        raise InvalidInput(f"the request body is not valid JSON ({e})", "$") from None


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
