"""Serving the IA-API over TLS (``[server] listen = ssl:...``), with and without client
certificates (``[server] client_ca_file``), on 127.0.0.1 with certificates made here;
and ``[sps] verify_tls = false`` warning at every start."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
import treq
from twisted.internet.defer import ensureDeferred
from twisted.internet.ssl import Certificate, PrivateCertificate, optionsForClientTLS
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.filepath import FilePath
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from dpatia_daemon.config import Config, ConfigError, load_config
from dpatia_daemon.frontdoor.listening import endpoint
from dpatia_daemon.service import build_service

from .certs import Authority, Issued
from .harness import FrontDoor, start_front_door

pytestmark = pytest.mark.integration


@pytest.fixture
def door(reactor: Any, tmp_path: Path) -> Iterator[FrontDoor]:
    front = pytest_twisted.blockon(ensureDeferred(start_front_door(reactor, tmp_path / "door")))
    yield front
    pytest_twisted.blockon(ensureDeferred(front.close()))


@implementer(IPolicyForHTTPS)
@attrs.frozen
class _ClientPolicy:
    """Verify the server against ``trust``; present ``client`` when it is set."""

    trust: Certificate
    client: PrivateCertificate | None = None

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        return optionsForClientTLS(
            hostname.decode("ascii"), trustRoot=self.trust, clientCertificate=self.client
        )


def _client(reactor: Any, policy: Any) -> treq.client.HTTPClient:
    pool = HTTPConnectionPool(reactor, persistent=False)
    return treq.client.HTTPClient(Agent(reactor, contextFactory=policy, pool=pool))


def _listen_description(server: Issued) -> str:
    return f"ssl:0:interface=127.0.0.1:privateKey={server.key}:certKey={server.cert}"


async def _serve(reactor: Any, door: FrontDoor, listen: str, client_ca: Path | None) -> Any:
    server = attrs.evolve(
        Config().server,
        listen=listen,
        client_ca_file=FilePath(str(client_ca)) if client_ca else None,
    )
    return await endpoint(reactor, attrs.evolve(Config(), server=server)).listen(door.site)


async def _call(reactor: Any, client: Any, url: str, body: Any = None) -> tuple[int, Any]:
    if body is None:
        d = client.get(url)
    else:
        d = client.post(
            url, json.dumps(body).encode(), headers={"Content-Type": ["application/json"]}
        )
    d.addTimeout(10, reactor)
    response = await d
    return response.code, json.loads(await response.content())


@pytest_twisted.ensureDeferred
async def test_the_ia_api_answers_over_tls_verified_against_the_test_ca(
    reactor: Any, door: FrontDoor, tmp_path: Path
) -> None:
    """An ``ssl:`` listener with the README's options serves the IA-API; a client that
    trusts only the test CA verifies it (IP SAN 127.0.0.1) and the registration says
    https://."""
    ca = Authority(tmp_path)
    port = await _serve(reactor, door, _listen_description(ca.issue("server", server=True)), None)
    try:
        url = f"https://127.0.0.1:{port.getHost().port}"
        trust = Certificate.loadPEM(ca.cert.read_bytes())
        client = _client(reactor, BrowserLikePolicyForHTTPS(trustRoot=trust))
        code, body = await _call(reactor, client, url + "/dpatia")
        assert code == 200
        assert body["url"].startswith("https://")
        code, _ = await _call(
            reactor, client, url + "/dpatia/imagenotification", door.notification()
        )
        assert code == 200
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_client_that_does_not_trust_the_ca_gets_no_answer(
    reactor: Any, door: FrontDoor, tmp_path: Path
) -> None:
    """The certificate is really checked: trusting another CA, the call fails."""
    ca, other = Authority(tmp_path / "a", "CA one"), Authority(tmp_path / "b", "CA two")
    port = await _serve(reactor, door, _listen_description(ca.issue("server", server=True)), None)
    try:
        trust = Certificate.loadPEM(other.cert.read_bytes())
        client = _client(reactor, BrowserLikePolicyForHTTPS(trustRoot=trust))
        with pytest.raises(Exception) as failed:
            await _call(reactor, client, f"https://127.0.0.1:{port.getHost().port}/dpatia")
        assert "certificate verify failed" in repr(failed.value)
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_client_certificates_are_required_with_client_ca_file(
    reactor: Any, door: FrontDoor, tmp_path: Path
) -> None:
    """With ``client_ca_file``, a client without a certificate (or with one another CA
    signed) is refused in the handshake and its notification is never written; a
    client with a certificate the CA signed is answered."""
    ca, other = Authority(tmp_path / "a", "server CA"), Authority(tmp_path / "b", "rogue CA")
    clients_ca = Authority(tmp_path, "client CA")
    listen = _listen_description(ca.issue("server", server=True))
    port = await _serve(reactor, door, listen, clients_ca.cert)
    url = f"https://127.0.0.1:{port.getHost().port}"
    trust = Certificate.loadPEM(ca.cert.read_bytes())
    spool = door.spool_files()
    try:
        for presented in (None, other.issue("rogue", server=False)):
            client_cert = None
            if presented is not None:
                client_cert = PrivateCertificate.loadPEM(
                    presented.cert.read_bytes() + presented.key.read_bytes()
                )
            client = _client(reactor, _ClientPolicy(trust, client_cert))
            with pytest.raises(Exception):  # noqa: B017 (a TLS alert: its type varies by TLS version)
                await _call(reactor, client, url + "/dpatia/imagenotification", door.notification())
            assert door.spool_files() == spool
        good = clients_ca.issue("sps", server=False)
        mine = PrivateCertificate.loadPEM(good.cert.read_bytes() + good.key.read_bytes())
        code, _ = await _call(
            reactor,
            _client(reactor, _ClientPolicy(trust, mine)),
            url + "/dpatia/imagenotification",
            door.notification(slideId="slide-mtls"),
        )
        assert code == 200
        assert door.spool_files() != spool
    finally:
        await port.stopListening()


def test_client_ca_file_needs_an_ssl_listener(tmp_path: Path) -> None:
    """``client_ca_file`` with a tcp: listener stops the start, naming the key."""
    ca = Authority(tmp_path)
    server = attrs.evolve(Config().server, listen="tcp:0", client_ca_file=FilePath(str(ca.cert)))
    with pytest.raises(ConfigError, match=r"\[server\] client_ca_file: needs an ssl: listener"):
        endpoint(MemoryReactorClock(), attrs.evolve(Config(), server=server))


def test_client_ca_file_is_refused_with_several_processes(tmp_path: Path) -> None:
    """The extra front-door processes listen on plain tcp:, so client certificates
    could not be required there: the start stops instead of ignoring the key."""
    from conftest import write_config

    ca = Authority(tmp_path)
    path = write_config(
        tmp_path,
        {"server": {"processes": 2, "listen": "tcp:0", "client_ca_file": str(ca.cert)}},
    )
    with pytest.raises(ConfigError, match=r"\[server\] client_ca_file: client certificates"):
        build_service(load_config(path), MemoryReactorClock())


def _warnings_of_a_start(tmp_path: Path, verify_tls: str) -> list[str]:
    from conftest import write_config

    path = write_config(tmp_path, {"sps": {"verify_tls": verify_tls}, "workers": {"count": 0}})
    seen: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_level") is LogLevel.warn and "verify_tls" in event.get("log_format", ""):
            seen.append(event["log_format"])

    globalLogPublisher.addObserver(observe)
    try:
        build_service(load_config(path), MemoryReactorClock())
    finally:
        globalLogPublisher.removeObserver(observe)
    return seen


def test_verify_tls_false_warns_at_every_start(tmp_path: Path) -> None:
    """Each start (each service tree built) with ``verify_tls = false`` logs one
    warning saying that SPS connections can be intercepted; ``true`` logs none."""
    assert len(_warnings_of_a_start(tmp_path, "false")) == 1
    again = _warnings_of_a_start(tmp_path, "false")
    assert len(again) == 1 and "intercepted" in again[0]
    assert _warnings_of_a_start(tmp_path, "true") == []
