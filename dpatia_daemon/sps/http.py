"""The HTTP/TLS plumbing under :class:`~dpatia_daemon.sps.client.SPSClient`.

What a call needs below the IA-API: the service's treq client over its own persistent
pool and its TLS policy (:func:`make_http_client`, :class:`SPSHttp`), in-memory request
bodies that stay off the global cooperator, response bodies read so that a cancel
closes the connection (:func:`read_body`), one attempt under a deadline
(:func:`within_deadline`), the classes of transport failure that decide retries, and
``Retry-After``.  Nothing here knows an endpoint, a token or a retry policy.
"""

from __future__ import annotations

import string
from collections import OrderedDict
from collections.abc import Sequence
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import quote

from attrs import frozen
from hyperlink import EncodedURL
from treq.client import HTTPClient
from twisted.internet import error as ierror
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import (
    IConsumer,
    IOpenSSLClientConnectionCreator,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    URI,
    Agent,
    BrowserLikePolicyForHTTPS,
    HostnameCachingHTTPSPolicy,
    HTTPConnectionPool,
    PartialDownloadError,
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
)
from twisted.web.error import SchemeNotSupported
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory, IBodyProducer, IPolicyForHTTPS, IResponse
from zope.interface import implementer

__all__ = [
    "NOT_SENT_ERRORS",
    "TRANSPORT_ERRORS",
    "Answer",
    "BytesProducer",
    "DeadlineExceeded",
    "SPSHttp",
    "UnverifiedTLSPolicy",
    "is_tls_failure",
    "make_http_client",
    "make_tls_policy",
    "prepared_url",
    "read_body",
    "retry_after",
    "within_deadline",
]

log = Logger()


@frozen
class SPSHttp:
    """The service's HTTP client, the pool it owns and its TLS policy.

    Call :meth:`close` at service stop.
    """

    client: HTTPClient
    pool: HTTPConnectionPool
    tls_policy: IPolicyForHTTPS

    def close(self) -> Deferred[None]:
        """Close the pool's idle persistent connections (fires when they are closed)."""
        return self.pool.closeCachedConnections()


#: What an RFC 3986 URI may hold as it is (unreserved, reserved, and ``%`` escapes).
_URI_CHARACTERS = frozenset(string.ascii_letters + string.digits + "-._~:/?#[]@!$&'()*+,;=%")


class _PreparedURL(EncodedURL):
    """A URL that is already an ASCII URI.

    treq's ``request()`` calls ``to_uri().to_text()`` on every URL it is given, which
    re-encodes each part and IDNA-encodes the host: about a fifth of the CPU of an SPS
    call (issue 15's profile).  For a URL that is already a URI both are the identity.
    """

    _prepared: str = ""

    def to_uri(self) -> _PreparedURL:
        return self

    def to_text(self, with_password: bool = False) -> str:
        return self._prepared


def prepared_url(url: str, params: Sequence[tuple[str, str]] = ()) -> str | EncodedURL:
    """``url`` with ``params`` as its query, ready for treq.

    A URL that is already a URI (what :class:`SPSClient` builds from an allowlisted
    callback base and escaped path segments) becomes a :class:`_PreparedURL`, whose
    encoding treq then does not redo; anything else is returned as text (with the
    query escaped), for treq to encode as usual.
    """
    if params:
        query = "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in params)
        url = f"{url}{'&' if '?' in url else '?'}{query}"
    if not (url.isascii() and _URI_CHARACTERS.issuperset(url)):
        return url
    prepared = _PreparedURL.from_text(url)
    assert isinstance(prepared, _PreparedURL)
    prepared._prepared = url
    return prepared


@implementer(IAgentEndpointFactory)
class CachedEndpoints:
    """The agent's endpoint per (scheme, host, port), made once.

    Twisted's agent builds a new endpoint for every request, even one a pooled
    connection serves: a ``HostnameEndpoint`` (the host IDNA-encoded each time) and,
    for HTTPS, a TLS connection creator.  An SPS is one or a few hosts, so each is
    made once; the LRU bound keeps a misconfigured fleet of callback hosts small.
    """

    def __init__(
        self, reactor: Any, policy: IPolicyForHTTPS, connect_timeout: float, size: int = 64
    ) -> None:
        self._reactor = reactor
        # Caches each host's TLS connection creator (and its SSL context) as well.
        self._policy = HostnameCachingHTTPSPolicy(policy, cacheSize=size)
        self._timeout = connect_timeout
        self._size = size
        self._endpoints: OrderedDict[tuple[bytes, bytes, int], IStreamClientEndpoint] = (
            OrderedDict()
        )

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:  # noqa: N802 (interface)
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self._endpoints.pop(key, None)
        if endpoint is None:
            endpoint = self._make(uri)
        self._endpoints[key] = endpoint
        if len(self._endpoints) > self._size:
            self._endpoints.popitem(last=False)
        return endpoint

    def _make(self, uri: URI) -> IStreamClientEndpoint:
        try:
            host = uri.host.decode("ascii")
        except UnicodeDecodeError:
            raise ValueError(f"the host of {uri.host!r} is not ASCII") from None
        endpoint = HostnameEndpoint(self._reactor, host, uri.port, timeout=self._timeout)
        if uri.scheme == b"http":
            return endpoint
        if uri.scheme == b"https":
            return wrapClientTLS(self._policy.creatorForNetloc(uri.host, uri.port), endpoint)
        raise SchemeNotSupported(f"unsupported scheme: {uri.scheme!r}")


@implementer(IBodyProducer)
class BytesProducer:
    """Writes an in-memory body at once.

    treq would wrap bytes in a ``FileBodyProducer``, which schedules its writes on the
    global cooperator (and so the global reactor); a request body of a few KiB needs
    neither.
    """

    def __init__(self, body: bytes) -> None:
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        """Write the whole body; done at once, and then let go of it.

        A persistent connection keeps its last request, and with it this producer,
        until its next one: a result body of many MiB stayed in memory once per pooled
        connection (2.4 MiB more daemon RSS per job until the pool was full).  Twisted
        never produces a body twice (it retries only requests without one).
        """
        body, self._body = self._body, b""
        consumer.write(body)
        return succeed(None)

    def pauseProducing(self) -> None:
        """Nothing to pause: the body was written in one go."""

    def resumeProducing(self) -> None:
        """Nothing to resume."""

    def stopProducing(self) -> None:
        """Nothing to stop."""


class _BodyReader(Protocol):
    """Collects a response body into a Deferred that, unlike ``readBody``, can abort.

    Twisted's ``readBody`` only aborts on cancel when the transport has
    ``abortConnection``, and the proxy the agent hands to body protocols does not; a
    deadline that left the connection reading would leak it.  ``stopProducing`` on the
    proxy closes the underlying connection, which is what a cancel must do.
    """

    def __init__(self, code: int) -> None:
        self.code = code
        self.chunks: list[bytes] = []
        self.deferred: Deferred[bytes] = Deferred(self._cancel)

    def _cancel(self, _: Deferred[bytes]) -> None:
        """Close the connection the body is arriving on."""
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        """Keep a chunk of the body."""
        self.chunks.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """Fire with the body when it is complete, fail otherwise."""
        if self.deferred.called:
            return
        if reason.check(ResponseDone):
            self.deferred.callback(b"".join(self.chunks))
        elif reason.check(PotentialDataLoss):
            # No Content-Length and no chunking: the body may be cut short.
            self.deferred.errback(
                PartialDownloadError(str(self.code).encode("ascii"), b"", b"".join(self.chunks))
            )
        else:
            self.deferred.errback(reason)


def read_body(response: IResponse) -> Deferred[bytes]:
    """Read a whole response body; cancelling the Deferred closes the connection."""
    reader = _BodyReader(response.code)
    response.deliverBody(reader)
    return reader.deferred


@frozen
class Answer:
    """A response and its body (empty when the body is left to stream)."""

    response: IResponse
    body: bytes


class DeadlineExceeded(Exception):
    """An attempt ran out of time.  ``surely_not_sent``: it was still connecting."""

    def __init__(self, timeout: float, surely_not_sent: bool) -> None:
        super().__init__(f"no complete answer within {timeout:g} s")
        self.surely_not_sent = surely_not_sent


#: Failures of the transport, each worth another attempt for an idempotent call.
TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (
    ierror.ConnectError,  # refused, connect timeout, no route, TLS setup, ...
    ierror.DNSLookupError,
    ierror.ConnectingCancelledError,
    ierror.ConnectionClosed,
    RequestNotSent,
    ResponseFailed,  # includes ResponseNeverReceived
    RequestTransmissionFailed,
    PartialDownloadError,
)

#: Failures after which the request surely never reached the SPS: even a POST may be
#: repeated without risking a duplicate.
NOT_SENT_ERRORS: tuple[type[BaseException], ...] = (
    ierror.ConnectError,
    ierror.DNSLookupError,
    ierror.ConnectingCancelledError,
    RequestNotSent,
)


async def within_deadline(
    exchange: Deferred[Answer], timeout: float, clock: IReactorTime
) -> Answer:
    """Await ``exchange``, cancelling it after ``timeout`` seconds of ``clock``.

    Raises :class:`DeadlineExceeded` when the deadline ended it, and ``CancelledError``
    when the caller cancelled (whatever failure the exchange's own canceller chose:
    a connect that is cancelled fails with ``ConnectingCancelledError``, which must not
    look like a transport failure worth a retry).
    """
    cancelled: list[bool] = []

    def cancel(_: Deferred[Answer]) -> None:
        cancelled.append(True)
        exchange.cancel()

    gate: Deferred[Answer] = Deferred(cancel)

    def relay(result: Answer | Failure) -> None:
        # Cancelling the gate fails it even when the exchange's canceller did not
        # settle the exchange at once; a late result then has nowhere to go.
        if gate.called:
            return
        if isinstance(result, Failure):
            gate.errback(result)
        else:
            gate.callback(result)

    def expired(result: Answer | Failure, timeout: float) -> Answer | Failure:
        if not isinstance(result, Failure):
            return result  # the canceller produced an answer after all
        return Failure(DeadlineExceeded(timeout, result.check(*NOT_SENT_ERRORS) is not None))

    exchange.addBoth(relay)
    gate.addTimeout(timeout, clock, onTimeoutCancel=expired)
    try:
        return await gate
    except DeadlineExceeded:
        raise
    except Exception:
        if cancelled:
            raise CancelledError() from None
        raise


def is_tls_failure(exc: BaseException) -> bool:
    """True when the failure is a TLS handshake error (retrying will not fix it)."""
    try:
        from OpenSSL import SSL
    except ImportError:  # pragma: no cover - twisted[tls] is a dependency
        return False
    if isinstance(exc, SSL.Error):
        return True
    reasons = getattr(exc, "reasons", None) or []
    return any(isinstance(r, Failure) and r.check(SSL.Error) for r in reasons)


def retry_after(headers: Headers, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP-date)."""
    raw = headers.getRawHeaders(b"retry-after")
    if not raw:
        return None
    value = raw[0].decode("latin-1").strip()
    try:
        # RFC 9110 says delta-seconds is an integer; tolerate "1.5" all the same.
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when.timestamp() - now)


# --- TLS and the client ---------------------------------------------------------------


@implementer(IOpenSSLClientConnectionCreator)
class _UnverifiedTLSCreator:
    """A TLS client connection that checks neither the chain nor the host name."""

    def __init__(self, hostname: str, context: Any) -> None:
        self._hostname = hostname
        self._context = context

    def clientConnectionForTLS(self, tlsProtocol: Any) -> Any:
        """A pyOpenSSL connection with SNI but no verification."""
        from OpenSSL import SSL

        connection = SSL.Connection(self._context, None)
        connection.set_app_data(tlsProtocol)
        if not _is_ip_address(self._hostname):
            # Still send SNI: a virtual host in front of the SPS may need it.
            connection.set_tlsext_host_name(self._hostname.encode("idna"))
        return connection


def _is_ip_address(host: str) -> bool:
    """True for an IPv4/IPv6 literal (SNI must not carry one)."""
    import ipaddress

    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


@implementer(IPolicyForHTTPS)
class UnverifiedTLSPolicy:
    """An HTTPS policy that trusts any certificate (``verify_tls = false``).

    Self-signed SPS certificates are common in hospitals; this is the operator's escape
    hatch, and it is logged loudly.  Prefer ``ca_file``.
    """

    def __init__(self) -> None:
        from twisted.internet.ssl import CertificateOptions

        self._context = CertificateOptions(verify=False).getContext()

    def creatorForNetloc(self, hostname: bytes, port: int) -> _UnverifiedTLSCreator:
        """A non-verifying connection creator for ``hostname``."""
        return _UnverifiedTLSCreator(hostname.decode("ascii"), self._context)


def _load_pem_bundle(path: str) -> list[Any]:
    """Load every certificate of a PEM bundle (``Certificate.loadPEM`` reads only one)."""
    from twisted.internet.ssl import Certificate
    from twisted.python.filepath import FilePath

    data = FilePath(path).getContent()
    marker = b"-----BEGIN CERTIFICATE-----"
    blocks = [marker + chunk for chunk in data.split(marker)[1:]]
    if not blocks:
        raise ValueError(f"no PEM certificate in {path}")
    return [Certificate.loadPEM(block) for block in blocks]


def make_tls_policy(*, verify_tls: bool = True, ca_file: str | None = None) -> IPolicyForHTTPS:
    """The HTTPS policy for SPS calls: browser-like, a private CA bundle, or no checks."""
    if not verify_tls:
        log.warn(
            "TLS certificate verification of SPS calls is disabled (verify_tls = false): "
            "connections to the SPS can be intercepted; prefer ca_file",
            verify_tls=False,
        )
        return UnverifiedTLSPolicy()
    if ca_file is not None:
        from twisted.internet.ssl import trustRootFromCertificates

        return BrowserLikePolicyForHTTPS(
            trustRoot=trustRootFromCertificates(_load_pem_bundle(ca_file))
        )
    return BrowserLikePolicyForHTTPS()


def make_http_client(
    reactor: Any,
    *,
    verify_tls: bool = True,
    ca_file: str | None = None,
    connect_timeout: float = 10.0,
    pool_size: int = 16,
) -> SPSHttp:
    """Build the service's treq client over its own persistent pool.

    ``reactor`` must provide TCP, time and name resolution (a real reactor, or a
    ``MemoryReactorClock`` in tests); it is ``Any`` because mypy-zope cannot spell the
    intersection of those interfaces, and the pool and agent take it untyped.  Close the pool with :meth:`SPSHttp.close` at
    service stop.
    """
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = pool_size
    policy = make_tls_policy(verify_tls=verify_tls, ca_file=ca_file)
    agent = Agent.usingEndpointFactory(
        reactor, CachedEndpoints(reactor, policy, connect_timeout), pool=pool
    )
    return SPSHttp(client=HTTPClient(agent), pool=pool, tls_policy=policy)
