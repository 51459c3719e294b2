"""The HTTP plumbing's shortcuts: URLs treq need not re-encode, endpoints made once."""

from __future__ import annotations

import gc
import sys

import pytest_twisted
from twisted.internet.testing import MemoryReactorClock
from twisted.web.client import URI, BrowserLikePolicyForHTTPS
from twisted.web.resource import Resource
from twisted.web.server import Site

from dpatia_daemon.sps.http import (
    BytesProducer,
    CachedEndpoints,
    make_http_client,
    prepared_url,
)


def test_a_uri_is_kept_as_it_is_and_treq_does_not_reencode_it() -> None:
    url = prepared_url("http://sps:8080/v1/slides/a%2Fb/info", [("scope", "extended")])
    assert not isinstance(url, str)
    assert url.to_uri() is url
    assert url.to_uri().to_text() == "http://sps:8080/v1/slides/a%2Fb/info?scope=extended"
    assert url.host == "sps" and url.port == 8080


def test_query_values_are_escaped() -> None:
    url = prepared_url("http://sps/v1/requests", [("issuer", "a b&c=d/é")])
    assert url.to_uri().to_text() == "http://sps/v1/requests?issuer=a%20b%26c%3Dd%2F%C3%A9"


def test_a_url_that_is_not_a_uri_is_left_to_treq() -> None:
    assert prepared_url("http://spś.example/v1/x") == "http://spś.example/v1/x"
    assert prepared_url("http://sps/v1/a b") == "http://sps/v1/a b"


class _Recorder(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.uris: list[bytes] = []

    def render_GET(self, request):  # noqa: N802 (twisted.web's name)
        self.uris.append(request.uri)
        return b"{}"

    def render_PUT(self, request):  # noqa: N802 (twisted.web's name)
        return self.render_GET(request)


@pytest_twisted.ensureDeferred
async def test_a_prepared_url_arrives_as_built() -> None:
    from twisted.internet import reactor

    recorder = _Recorder()
    port = reactor.listenTCP(0, Site(recorder), interface="127.0.0.1")
    http = make_http_client(reactor)
    try:
        base = f"http://127.0.0.1:{port.getHost().port}/v1/slides/a%2Fb/info"
        for _ in range(2):  # the second over the pooled connection and cached endpoint
            answer = await http.client.get(prepared_url(base, [("q", "x y")]))
            assert answer.code == 200
            await answer.content()
    finally:
        await http.close()
        await port.stopListening()
    assert recorder.uris == [b"/v1/slides/a%2Fb/info?q=x%20y"] * 2


def test_endpoints_are_made_once_per_scheme_host_and_port() -> None:
    endpoints = CachedEndpoints(MemoryReactorClock(), BrowserLikePolicyForHTTPS(), 5.0, size=2)
    first = endpoints.endpointForURI(URI.fromBytes(b"https://sps.example/v1/a"))
    assert endpoints.endpointForURI(URI.fromBytes(b"https://sps.example/v1/b")) is first
    other_port = endpoints.endpointForURI(URI.fromBytes(b"https://sps.example:8443/v1/a"))
    plain = endpoints.endpointForURI(URI.fromBytes(b"http://sps.example/v1/a"))
    assert len({id(first), id(other_port), id(plain)}) == 3
    # Bounded: the least recently used (the first) was dropped and is made anew.
    assert endpoints.endpointForURI(URI.fromBytes(b"https://sps.example/v1/a")) is not first


@pytest_twisted.ensureDeferred
async def test_a_pooled_connection_does_not_keep_the_body_it_sent() -> None:
    """A persistent connection keeps its last request (and its producer) until its
    next one; the producer must not keep the body, or every pooled connection holds
    on to the last result of many MiB it PUT."""
    from twisted.internet import reactor

    recorder = _Recorder()
    port = reactor.listenTCP(0, Site(recorder), interface="127.0.0.1")
    http = make_http_client(reactor)
    body = b"x" * (4 << 20)
    alone = sys.getrefcount(body)
    try:
        url = f"http://127.0.0.1:{port.getHost().port}/v1/applications/a/results/1"
        answer = await http.client.put(url, data=BytesProducer(body), unbuffered=True)
        await answer.content()
        assert len(http.pool._connections) == 1  # still open, in the pool
        gc.collect()
        assert sys.getrefcount(body) == alone
    finally:
        await http.close()
        await port.stopListening()
