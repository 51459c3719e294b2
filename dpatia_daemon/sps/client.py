"""The treq client for the SPS callback API (IA-API.md §2): retries, deadlines, errors.

:class:`SPSClient` owns *how* dpatia talks to an SPS: the URL of every endpoint, the
headers (Bearer token, ``X-Sectra-ApiVersion``, ``X-Sectra-SoftwareVersion``), a
deadline per attempt, retries with jittered exponential backoff, the version-conflict
dance of result updates, the token of every call (its ``auth`` collaborator, with one
retry per replacement token after a 401/403), and the mapping of every failure to one
:class:`SPSError` subclass.  It owns no connection pool: :func:`make_http_client` builds
one (with the TLS policy) for the service, which closes it at stop.  The errors live
in :mod:`.errors`, the HTTP/TLS plumbing in :mod:`.http`; both are re-exported here, so
``from dpatia_daemon.sps.client import SPSError, make_http_client`` keeps working.

Secrets (the callback token, client secrets, fetched access tokens) never appear in an
exception, a repr or a log line; body excerpts are redacted before they are kept, and
log lines name endpoint *templates* (``GET slides/{id}/info``), never URLs, so neither
query strings nor accession numbers (PHI) reach the logs.
"""

from __future__ import annotations

import base64
import json
import random as _random
import typing
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any
from urllib.parse import quote

import attrs
from attrs import define, field, frozen
from treq.client import HTTPClient
from twisted.internet import task
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from ..jobs import Callback
from ..models import (
    InvalidInput,
    Result,
    VersionInfo,
    dumps,
    parse,
    result_from_json,
    unstructure,
)
from .errors import (
    REDACTED,
    SPSConflict,
    SPSError,
    SPSNotFound,
    SPSProtocolError,
    SPSTimeout,
    SPSUnauthorized,
    SPSUnavailable,
    error_for_status,
    protocol_error,
)
from .http import (
    NOT_SENT_ERRORS,
    TRANSPORT_ERRORS,
    Answer,
    BytesProducer,
    DeadlineExceeded,
    SPSHttp,
    UnverifiedTLSPolicy,
    is_tls_failure,
    make_http_client,
    make_tls_policy,
    prepared_url,
    read_body,
    retry_after,
    within_deadline,
)
from .skim import skim

log = Logger()

#: The statuses ``PUT slides/{id}/qualityControl`` accepts (IA-API.md §2.7).
QC_STATUSES = frozenset({"NotSet", "QualityOk", "Rejected"})

#: Re-sends of one call after a 401/403, each with another token: the callback token's
#: fallback (client credentials), then one forced refresh of that token.
_AUTH_RETRIES = 2


# --- values ---------------------------------------------------------------------------


@frozen
class AccessToken:
    """A token from ``POST /token`` (IA-API.md §2.9); the token itself is never shown."""

    access_token: str = field(repr=lambda _: REDACTED)
    token_type: str = "Bearer"
    expires_in: float = 0.0


class Authorizer(typing.Protocol):
    """Chooses the Bearer token of every callback call (``SPSClient.auth``).

    :class:`dpatia_daemon.sps.tokens.CallbackAuth` is the implementation: the newest
    callback token first, client-credentials tokens after a 401/403.
    """

    async def token(self, callback: Callback) -> str:
        """The token to send for a call made with ``callback``."""
        ...

    async def rejected(self, callback: Callback, token: str, error: SPSUnauthorized) -> str | None:
        """The SPS refused ``token``: another token to send the call with once more, or
        None to give up (or raise an :class:`SPSError` that says more than ``error``)."""
        ...


@frozen
class _Spec:
    """One logical call: what to send, how to classify failures, what to redact."""

    method: str
    endpoint: str  # method + path template, for errors and logs
    url: str
    params: Sequence[tuple[str, str]] = ()
    body: bytes | None = None
    content_type: str | None = None
    authorization: str = field(default="", repr=False)
    accept: str = "application/json"
    idempotent: bool = True
    stream: bool = False
    conflict_aware: bool = False
    secrets: tuple[str, ...] = field(default=(), repr=False)
    #: The callback the call was made with (None for ``POST token``): ``auth`` picks
    #: the Bearer token for it.
    callback: Callback | None = field(default=None, repr=False)
    extra_headers: tuple[tuple[str, str], ...] = ()


def _seg(value: str | int) -> str:
    """Escape one path segment (a ``/`` in an id must not become a path separator)."""
    return quote(str(value), safe="")


def _join(base: str, path: str) -> str:
    """Join the callback base URL (with or without a trailing slash) and a path."""
    return base.rstrip("/") + "/" + path.lstrip("/")


def _default_reapply(ours: Result) -> Callable[[Result], Result]:
    """Last writer wins: our result, carrying the SPS's current ``versionId``."""

    def reapply(current: Result) -> Result:
        return attrs.evolve(ours, versionId=current.versionId)

    return reapply


# --- the client -----------------------------------------------------------------------


@define
class SPSClient:
    """Calls the SPS callback API on behalf of jobs.

    Collaborators: ``http`` (a treq ``HTTPClient``; its agent and pool belong to the
    service), ``clock`` (deadlines and backoff).  ``api_version`` and
    ``software_version`` go out as ``X-Sectra-ApiVersion`` / ``X-Sectra-SoftwareVersion``
    on every call (IA-API.md §6).  ``timeout`` is the deadline of one attempt, covering
    connect, headers and (for buffered calls) the body; ``retries`` is the number of
    extra attempts; backoff is full jitter, ``min(cap, base * 2**n) * random()``.

    Every ``async`` method returns a coroutine: callers wrap it in ``ensureDeferred``.
    Cancelling that Deferred stops the call at once (no further attempt is made).
    """

    http: HTTPClient
    clock: IReactorTime
    software_version: str
    api_version: str = "1.5"
    timeout: float = 30.0
    retries: int = 4
    backoff_base: float = 0.5
    backoff_cap: float = 30.0
    random: Callable[[], float] = field(default=_random.random, repr=False)
    #: Which Bearer token a callback call sends, and another after a 401/403 (retried
    #: once per token).  None: the callback's own token, and a 401/403 is final.
    auth: Authorizer | None = None
    #: Told of every attempt's outcome: ``(endpoint template, "2xx" | "4xx" | "5xx" |
    #: "error")`` (the metrics' SPS request counts); None: nobody counts.
    on_answer: Callable[[str, str], None] | None = field(default=None, repr=False)

    # --- endpoints ---------------------------------------------------------------------

    async def get_info(self, callback: Callback) -> VersionInfo:
        """``GET /info``: the SPS's API and software version."""
        answer = await self._call(self._spec(callback, "GET", "info", "info"))
        data = self._json(answer, "GET info", (callback.token,))
        try:
            info: VersionInfo = parse(VersionInfo, data)
        except InvalidInput as e:
            raise self._protocol_error("GET info", e, answer, (callback.token,)) from None
        return info

    async def slide_info(
        self,
        callback: Callback,
        slide_id: str,
        *,
        extended: bool = True,
        include_phi: bool = False,
    ) -> dict[str, Any]:
        """``GET slides/{id}/info``: slide metadata (PHI only when asked for)."""
        endpoint = "GET slides/{id}/info"
        params: list[tuple[str, str]] = []
        if extended:
            params.append(("scope", "extended"))
        if include_phi:
            params.append(("includePHI", "true"))
        spec = self._spec(callback, "GET", endpoint, f"slides/{_seg(slide_id)}/info", params)
        answer = await self._call(spec)
        data = self._json(answer, endpoint, (callback.token,))
        if not isinstance(data, dict):
            raise self._protocol_error(endpoint, "expected a JSON object", answer, spec.secrets)
        return data

    async def label(self, callback: Callback, slide_id: str) -> bytes | None:
        """``GET slides/{id}/label``: the label image, or ``None`` (204) when there is none.

        The label may show PHI; callers keep it out of logs and long-lived storage.
        """
        spec = self._spec(
            callback, "GET", "GET slides/{id}/label", f"slides/{_seg(slide_id)}/label", accept="*/*"
        )
        answer = await self._call(spec)
        if answer.response.code == 204:
            return None
        return answer.body

    async def tile(
        self,
        callback: Callback,
        slide_id: str,
        level: int,
        col: int,
        row: int,
        *,
        ext: str = "jpg",
        focal_plane: str | int | None = None,
        optical_path: str | None = None,
    ) -> bytes:
        """``GET images/{slideId}_files/{level}/{col}_{row}[_{focalPlane}].{ext}``: one DZI tile."""
        suffix = "" if focal_plane is None else f"_{_seg(focal_plane)}"
        path = (
            f"images/{_seg(slide_id)}_files/{int(level)}/{int(col)}_{int(row)}{suffix}.{_seg(ext)}"
        )
        params = [] if optical_path is None else [("opticalPath", optical_path)]
        endpoint = "GET images/{id}_files/{level}/{col}_{row}.{ext}"
        spec = self._spec(callback, "GET", endpoint, path, params, accept="image/*")
        return (await self._call(spec)).body

    async def open_files(
        self,
        callback: Callback,
        slide_id: str,
        *,
        range_from: int | None = None,
        if_range: str | None = None,
    ) -> IResponse:
        """``GET slides/{id}/files``: the response, as soon as its headers arrived.

        ``range_from=N`` (N > 0) asks for the rest of a single-file answer from byte N
        (``Range: bytes=N-``, with ``If-Range: if_range`` — the earlier answer's strong
        ETag or Last-Modified — when given): the SPS answers 206 with Content-Range, or
        200 with the whole file; 416 raises :class:`SPSError` (not retried).

        The deadline and the retries cover getting the headers only (and reading the
        body of an error answer).  The body (a single file or ``multipart/related``,
        IA-API.md §2.4) can be many GiB, so it is the caller's: hand it to a protocol
        with ``response.deliverBody`` (or ``treq.collect(response, sink.write)``) and
        guard it with an idle timer and an overall deadline of its own; to give up,
        call ``stopProducing()`` on the transport that protocol was given, which
        closes the connection.
        """
        spec = self._spec(
            callback,
            "GET",
            "GET slides/{id}/files",
            f"slides/{_seg(slide_id)}/files",
            accept="*/*",
            stream=True,
        )
        extra: tuple[tuple[str, str], ...] = ()
        if range_from:
            extra += (("range", f"bytes={int(range_from)}-"),)
        if if_range:
            extra += (("if-range", if_range),)
        if extra:
            spec = attrs.evolve(spec, extra_headers=extra)
        return (await self._call(spec)).response

    async def list_results(self, callback: Callback, app_id: str, slide_id: str) -> list[Result]:
        """``GET applications/{appId}/results/slide/{slideId}``: this app's results on a slide."""
        endpoint = "GET applications/{appId}/results/slide/{slideId}"
        path = f"applications/{_seg(app_id)}/results/slide/{_seg(slide_id)}"
        spec = self._spec(callback, "GET", endpoint, path)
        answer = await self._call(spec)
        data = self._json(answer, endpoint, spec.secrets, parse=partial(skim, array=True))
        if not isinstance(data, list):
            raise self._protocol_error(endpoint, "expected a JSON array", answer, spec.secrets)
        # Tolerant: the list holds whatever anyone stored for this app (other versions,
        # other tools).  An item dpatia cannot read is not one it can reuse; refusing
        # the whole list would make the slide unwritable for good.
        results: list[Result] = []
        skipped: list[str] = []
        for index, item in enumerate(data):
            if not isinstance(item, dict):
                skipped.append(f"item {index}: not an object")
                continue
            try:
                results.append(result_from_json(item))
            except InvalidInput as e:
                # The field's path only down to the first key or index: what the item
                # holds stays out of the log.
                where = (e.field or "$").split("[", 1)[0]
                skipped.append(f"item {index}: {e.message} at {where}")
        if skipped:
            log.warn(
                "SPS {endpoint}: skipped {count} of {total} results dpatia cannot read "
                "({problems})",
                endpoint=endpoint,
                count=len(skipped),
                total=len(data),
                problems="; ".join(skipped[:3]) + ("; ..." if len(skipped) > 3 else ""),
            )
        return results

    async def get_result(self, callback: Callback, app_id: str, result_id: int) -> Result:
        """``GET applications/{appId}/results/{id}``: one stored result."""
        endpoint = "GET applications/{appId}/results/{id}"
        path = f"applications/{_seg(app_id)}/results/{_seg(result_id)}"
        spec = self._spec(callback, "GET", endpoint, path)
        return self._stored_result(await self._call(spec), endpoint, spec)

    async def create_result(self, callback: Callback, app_id: str, result: Result) -> Result:
        """``POST applications/{appId}/results``: store a new result; returns it with ids.

        Expects 201; 200 is accepted too (older SPS versions answer 200).
        """
        endpoint = "POST applications/{appId}/results"
        body = attrs.evolve(result, id=None, versionId=None)
        spec = self._spec(
            callback,
            "POST",
            endpoint,
            f"applications/{_seg(app_id)}/results",
            body=dumps(unstructure(body)),
            # A POST that reached the SPS may have stored a result even if no answer
            # came back; repeating it could leave a duplicate annotation the app can
            # never delete (IA-API.md §3.1).  So only retry when the request surely
            # was not received (connect errors) or the SPS said so (429/503).
            idempotent=False,
        )
        return self._stored_result(await self._call(spec), endpoint, spec)

    async def update_result(
        self,
        callback: Callback,
        app_id: str,
        result: Result,
        *,
        reapply: Callable[[Result], Result] | None = None,
    ) -> Result:
        """``PUT applications/{appId}/results/{id}``: replace a stored result.

        ``result`` carries its ``id`` and the ``versionId`` it was based on.  On a
        version conflict the current result is read back, ``reapply(current)`` builds
        the result to send (default: ours with the current ``versionId``), and the PUT
        is tried once more; a second conflict raises :class:`SPSConflict`.
        """
        if result.id is None:
            raise ValueError("update_result needs a stored result (with an id)")
        try:
            return await self._put_result(callback, app_id, result)
        except SPSConflict as first:
            log.info(
                "SPS {endpoint}: versionId conflict on result {result_id}; re-reading",
                endpoint=first.endpoint,
                result_id=result.id,
                status=first.status,
            )
        current = await self.get_result(callback, app_id, result.id)
        merged = (reapply or _default_reapply(result))(current)
        merged = attrs.evolve(merged, id=result.id, versionId=current.versionId)
        try:
            return await self._put_result(callback, app_id, merged)
        except SPSConflict as second:
            raise SPSConflict(
                "versionId conflict again after re-reading the result",
                endpoint=second.endpoint,
                status=second.status,
                body_excerpt=second.body_excerpt,
            ) from None

    async def update_result_body(
        self, callback: Callback, app_id: str, result_id: int, body: bytes
    ) -> bytes:
        """``PUT applications/{appId}/results/{id}`` of a result already serialised as
        ``body`` (with its ``versionId``); the SPS's answer body as it came, unparsed.

        For results of many MiB: neither the body nor the answer is built or parsed on
        the reactor thread here.  A stale ``versionId`` raises :class:`SPSConflict` (no
        re-read: the caller falls back on :meth:`update_result`); an answer that is not
        a JSON object raises :class:`SPSProtocolError`.
        """
        endpoint = "PUT applications/{appId}/results/{id}"
        path = f"applications/{_seg(app_id)}/results/{_seg(result_id)}"
        spec = self._spec(callback, "PUT", endpoint, path, body=body, conflict_aware=True)
        answer = await self._call(spec)
        text = answer.body.strip()
        if not (text.startswith(b"{") and text.endswith(b"}")):
            raise self._protocol_error(endpoint, "expected a JSON object", answer, spec.secrets)
        return answer.body

    async def _put_result(self, callback: Callback, app_id: str, result: Result) -> Result:
        """One ``PUT applications/{appId}/results/{id}`` (conflicts raise :class:`SPSConflict`)."""
        endpoint = "PUT applications/{appId}/results/{id}"
        path = f"applications/{_seg(app_id)}/results/{_seg(result.id or 0)}"
        answer, spec = await self._put_versioned(callback, endpoint, path, unstructure(result))
        return self._stored_result(answer, endpoint, spec)

    async def _put_versioned(
        self, callback: Callback, endpoint: str, path: str, payload: object
    ) -> tuple[Answer, _Spec]:
        """PUT a JSON ``payload`` that carries a ``versionId`` (a stale one: SPSConflict)."""
        body = dumps(payload)
        spec = self._spec(callback, "PUT", endpoint, path, body=body, conflict_aware=True)
        return await self._call(spec), spec

    async def set_quality_control(
        self,
        callback: Callback,
        slide_id: str,
        *,
        status: str,
        version_id: str | None,
        application_version: str,
    ) -> None:
        """``PUT slides/{id}/qualityControl`` (IA-API 1.10): set the slide's QC status.

        ``version_id`` is copied from ``qualityControl.versionId`` of the slide info.
        """
        if status not in QC_STATUSES:
            raise ValueError(f"unknown QC status {status!r}; expected one of {sorted(QC_STATUSES)}")
        payload = {
            "applicationVersion": application_version,
            "qualityControl": {"status": status, "versionId": version_id},
        }
        path = f"slides/{_seg(slide_id)}/qualityControl"
        await self._put_versioned(callback, "PUT slides/{id}/qualityControl", path, payload)

    async def slide_request_images(
        self, callback: Callback, slide_id: str, *, include_phi: bool = False
    ) -> list[dict[str, Any]]:
        """``GET slides/{id}/request/images/info`` (IA-API 1.9): the slides of the same case."""
        endpoint = "GET slides/{id}/request/images/info"
        params = [("includePHI", "true")] if include_phi else []
        spec = self._spec(
            callback, "GET", endpoint, f"slides/{_seg(slide_id)}/request/images/info", params
        )
        return self._object_list(await self._call(spec), endpoint, spec.secrets)

    async def request_images(
        self,
        callback: Callback,
        accession_number: str,
        *,
        issuer: str | None = None,
        include_phi: bool = False,
    ) -> list[dict[str, Any]]:
        """``GET requests/{accessionNumber}/images/info`` (IA-API 1.9): the slides of a case."""
        endpoint = "GET requests/{accessionNumber}/images/info"
        params = [("includePHI", "true")] if include_phi else []
        if issuer is not None:
            # Sources disagree on the name (IA-API.md §2.8): [dl] (Sectra's newest
            # module) and [TS] use accessionNumberIssuer, [contrib]/[pypi] use
            # accessionNumberIssuerId.  We follow Sectra's own code.
            params.append(("accessionNumberIssuer", issuer))
        path = f"requests/{_seg(accession_number)}/images/info"
        spec = self._spec(callback, "GET", endpoint, path, params)
        return self._object_list(await self._call(spec), endpoint, spec.secrets)

    async def fetch_token(
        self, base_url: str, app_id: str, client_id: str, client_secret: str
    ) -> AccessToken:
        """``POST {base}/token?applicationId=``: a token from client credentials (§2.9)."""
        endpoint = "POST token"
        basic = base64.b64encode(f"{client_id}:{client_secret}".encode()).decode("ascii")
        spec = _Spec(
            method="POST",
            endpoint=endpoint,
            url=_join(base_url, "token"),
            params=(("applicationId", app_id),),
            body=b"grant_type=client_credentials",
            content_type="application/x-www-form-urlencoded",
            authorization=f"Basic {basic}",
            # Asking for a token twice is harmless: retry like a GET.
            idempotent=True,
            secrets=(client_secret, basic),
        )
        answer = await self._call(spec)
        # The answer holds the new token: never quote it in an error.
        try:
            data = json.loads(answer.body)
            token = data["access_token"]
            token_type = data.get("token_type", "Bearer")
            expires_in = data.get("expires_in", 0)
            if not isinstance(token, str) or not token:
                raise ValueError("access_token")
            if not isinstance(token_type, str):
                raise ValueError("token_type")
            if isinstance(expires_in, bool) or not isinstance(expires_in, int | float):
                raise ValueError("expires_in")
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise SPSProtocolError(
                f"malformed token answer ({type(e).__name__})",
                endpoint=endpoint,
                status=answer.response.code,
            ) from None
        return AccessToken(access_token=token, token_type=token_type, expires_in=float(expires_in))

    # --- request building --------------------------------------------------------------

    def _spec(
        self,
        callback: Callback,
        method: str,
        endpoint: str,
        path: str,
        params: Sequence[tuple[str, str]] = (),
        *,
        body: bytes | None = None,
        accept: str = "application/json",
        stream: bool = False,
        idempotent: bool = True,
        conflict_aware: bool = False,
    ) -> _Spec:
        """Describe one callback call: URL, Bearer token, body, retry class."""
        if not endpoint.startswith(method + " "):
            endpoint = f"{method} {endpoint}"
        return _Spec(
            method=method,
            endpoint=endpoint,
            url=_join(callback.url, path),
            params=tuple(params),
            body=body,
            content_type="application/json" if body is not None else None,
            authorization=f"Bearer {callback.token}",
            accept=accept,
            idempotent=idempotent,
            stream=stream,
            conflict_aware=conflict_aware,
            secrets=(callback.token,),
            callback=callback,
        )

    def _headers(self, spec: _Spec) -> Headers:
        """The request headers of ``spec`` (auth, versions, accept, content type)."""
        headers = Headers()
        headers.setRawHeaders(b"authorization", [spec.authorization.encode("latin-1")])
        headers.setRawHeaders(b"x-sectra-apiversion", [self.api_version.encode("ascii")])
        headers.setRawHeaders(b"x-sectra-softwareversion", [self.software_version.encode("ascii")])
        headers.setRawHeaders(b"accept", [spec.accept.encode("ascii")])
        if spec.content_type is not None:
            headers.setRawHeaders(b"content-type", [spec.content_type.encode("ascii")])
        for name, value in spec.extra_headers:
            headers.setRawHeaders(name.encode("ascii"), [value.encode("latin-1")])
        return headers

    # --- one attempt -------------------------------------------------------------------

    def _exchange(self, spec: _Spec) -> Deferred[Answer]:
        """Send the request and read the body (unless streaming a success)."""
        d = self.http.request(
            spec.method,
            prepared_url(spec.url, spec.params),
            headers=self._headers(spec),
            data=None if spec.body is None else BytesProducer(spec.body),
            # Redirects are not part of the IA-API; following one would either drop
            # the token (cross-origin) or hand it to another host.
            allow_redirects=False,
            unbuffered=True,
            # treq only uses the reactor for its own timeout=, which we replace with
            # a deadline on the whole exchange; passing ours keeps it off the global.
            reactor=self.clock,  # type: ignore[arg-type]
        )

        def got_response(response: IResponse) -> Answer | Deferred[Answer]:
            if spec.stream and 200 <= response.code < 300:
                return Answer(response, b"")
            return read_body(response).addCallback(lambda body: Answer(response, body))

        return d.addCallback(got_response)

    async def _attempt(self, spec: _Spec) -> Answer:
        """One attempt under the deadline; tells a deadline from a caller's cancel."""
        if self.on_answer is None:
            return await within_deadline(self._exchange(spec), self.timeout, self.clock)
        try:
            answer = await within_deadline(self._exchange(spec), self.timeout, self.clock)
        except CancelledError:
            raise
        except Exception:
            self.on_answer(spec.endpoint, "error")
            raise
        self.on_answer(spec.endpoint, f"{answer.response.code // 100}xx")
        return answer

    # --- retries -----------------------------------------------------------------------

    def _backoff(self, attempt: int) -> float:
        """Full-jitter exponential backoff after failed attempt number ``attempt``."""
        return min(self.backoff_cap, self.backoff_base * 2**attempt) * self.random()

    async def _call(self, spec: _Spec) -> Answer:
        """Run ``spec`` with retries; return a 2xx answer or raise an :class:`SPSError`.

        The one place tokens are chosen: with ``auth``, the Bearer token of a callback
        call comes from it, and after a 401/403 the call is sent once more with the
        token it offers instead (at most ``_AUTH_RETRIES`` times, never the same
        token twice).  A 401/403 answer means the SPS did not act on the request, so
        this is safe for a POST too.
        """
        callback = spec.callback
        if self.auth is None or callback is None:
            return await self._attempts(spec)
        token = await self.auth.token(callback)
        tried = [token]
        while True:
            try:
                return await self._attempts(self._bearer(spec, token, tried))
            except SPSUnauthorized as e:
                if len(tried) > _AUTH_RETRIES:
                    raise
                replacement = await self.auth.rejected(callback, token, e)
                if replacement is None or replacement in tried:
                    raise
                log.info(
                    "SPS {endpoint}: token rejected (HTTP {status}); trying another token",
                    endpoint=e.endpoint,
                    status=e.status,
                )
                token = replacement
                tried.append(token)

    @staticmethod
    def _bearer(spec: _Spec, token: str, tried: Sequence[str]) -> _Spec:
        """``spec`` sending ``token``; every token tried is redacted from errors."""
        return attrs.evolve(
            spec,
            authorization=f"Bearer {token}",
            secrets=tuple(dict.fromkeys((*spec.secrets, *tried))),
        )

    async def _attempts(self, spec: _Spec) -> Answer:
        """Run ``spec`` with retries of transport errors, 5xx and 429."""
        attempts = self.retries + 1
        for attempt in range(attempts):
            last = attempt == attempts - 1
            status: int | None = None
            try:
                answer = await self._attempt(spec)
            except DeadlineExceeded as e:
                if last or not (spec.idempotent or e.surely_not_sent):
                    what = f"no complete answer within {self.timeout:g} s"
                    raise self._given_up(SPSTimeout, what, spec, attempt, attempts) from None
                reason = "deadline"
                delay = self._backoff(attempt)
            except TRANSPORT_ERRORS as e:
                if is_tls_failure(e):
                    raise SPSUnavailable(
                        "TLS handshake failed (untrusted or invalid certificate?)",
                        endpoint=spec.endpoint,
                    ) from None
                if last or not (spec.idempotent or isinstance(e, NOT_SENT_ERRORS)):
                    what = f"connection failed: {type(e).__name__}"
                    raise self._given_up(SPSUnavailable, what, spec, attempt, attempts) from None
                reason = type(e).__name__
                delay = self._backoff(attempt)
            else:
                code = answer.response.code
                if 200 <= code < 300:
                    return answer
                retryable = code in (429, 503) or (code >= 500 and spec.idempotent)
                if not retryable or last:
                    raise self._status_error(spec, answer, attempt + 1 if retryable else None)
                status = code
                reason = f"HTTP {code}"
                hinted = retry_after(answer.response.headers, self.clock.seconds())
                if code in (429, 503) and hinted is not None:
                    delay = min(self.backoff_cap, hinted)
                else:
                    delay = self._backoff(attempt)
            log.warn(
                "SPS {endpoint} attempt {attempt} failed ({reason}); retrying in {delay} s",
                endpoint=spec.endpoint,
                attempt=attempt + 1,
                attempts=attempts,
                reason=reason,
                status=status,
                delay=round(delay, 3),
            )
            await task.deferLater(self.clock, delay)
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    def _given_up(
        kind: type[SPSError], what: str, spec: _Spec, attempt: int, attempts: int
    ) -> SPSError:
        """The error of a failed attempt that is not retried: what, and which attempt."""
        unsure = "" if spec.idempotent else "; not retried, the SPS may have received it"
        return kind(f"{what}{unsure} (attempt {attempt + 1} of {attempts})", endpoint=spec.endpoint)

    # --- answers -----------------------------------------------------------------------

    def _status_error(self, spec: _Spec, answer: Answer, attempts: int | None) -> SPSError:
        """Map a non-2xx answer to the matching :class:`SPSError` subclass."""
        return error_for_status(
            spec.endpoint,
            answer.response.code,
            answer.body,
            spec.secrets,
            conflict_aware=spec.conflict_aware,
            attempts=attempts,
            retry_after=retry_after(answer.response.headers, self.clock.seconds()),
        )

    @staticmethod
    def _protocol_error(
        endpoint: str, problem: object, answer: Answer, secrets: Sequence[str]
    ) -> SPSProtocolError:
        """An :class:`SPSProtocolError` for a 2xx answer that is not what the API promises."""
        return protocol_error(endpoint, problem, answer.response.code, answer.body, secrets)

    def _json(
        self,
        answer: Answer,
        endpoint: str,
        secrets: Sequence[str],
        parse: Callable[[bytes], Any] = json.loads,
    ) -> Any:
        """Decode a JSON answer with ``parse`` or raise :class:`SPSProtocolError`; results
        are decoded with :func:`~dpatia_daemon.sps.skim.skim`, which keeps a large
        answer's contents as text."""
        try:
            return parse(answer.body)
        except ValueError:
            raise self._protocol_error(endpoint, "not JSON", answer, secrets) from None

    def _stored_result(self, answer: Answer, endpoint: str, spec: _Spec) -> Result:
        """The result a result call answered with (its JSON body parsed and checked)."""
        return self._result(
            self._json(answer, endpoint, spec.secrets, parse=skim), endpoint, answer, spec.secrets
        )

    def _result(self, data: Any, endpoint: str, answer: Answer, secrets: Sequence[str]) -> Result:
        """Parse a result or raise :class:`SPSProtocolError`."""
        try:
            return result_from_json(data)
        except InvalidInput as e:
            raise self._protocol_error(endpoint, e, answer, secrets) from None

    def _object_list(
        self, answer: Answer, endpoint: str, secrets: Sequence[str]
    ) -> list[dict[str, Any]]:
        """Decode a JSON array of objects or raise :class:`SPSProtocolError`."""
        data = self._json(answer, endpoint, secrets)
        if not isinstance(data, list) or not all(isinstance(i, dict) for i in data):
            raise self._protocol_error(endpoint, "expected an array of objects", answer, secrets)
        return data


__all__ = [
    "QC_STATUSES",
    "AccessToken",
    "Authorizer",
    "SPSClient",
    "SPSConflict",
    "SPSError",
    "SPSHttp",
    "SPSNotFound",
    "SPSProtocolError",
    "SPSTimeout",
    "SPSUnauthorized",
    "SPSUnavailable",
    "UnverifiedTLSPolicy",
    "make_http_client",
    "make_tls_policy",
]
