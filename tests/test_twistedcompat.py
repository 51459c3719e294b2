"""The private Twisted attributes :mod:`dpatia_daemon.twistedcompat` wraps still work.

Each test fails when a Twisted upgrade renames or removes what the wrapper relies on,
so the loss shows up here instead of as a daemon that runs deaf or reads slowly.
"""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.defer import fail, maybeDeferred
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from twisted.web._newclient import TransportProxyProducer
from twisted.web.client import ResponseFailed

from dpatia_daemon.pipeline.download import _READ_SIZE
from dpatia_daemon.twistedcompat import SocketReadSize, is_data_loss, raise_synchronously


class _Unbindable:
    """An endpoint whose ``listen`` fails at once, as a port in use does."""

    def listen(self, factory: object) -> Any:
        return fail(CannotListenError("127.0.0.1", 1, OSError("address in use")))


def test_raise_synchronously_makes_a_failed_listen_raise() -> None:
    """With raise_synchronously, a port that cannot be bound raises from the start
    (twistd exits non-zero) instead of being logged while the daemon runs deaf."""
    service = StreamServerEndpointService(_Unbindable(), Factory.forProtocol(Protocol))
    raise_synchronously(service)
    with pytest.raises(CannotListenError):
        service.privilegedStartService()


def test_without_it_a_failed_listen_is_only_logged() -> None:
    """The default the wrapper changes: Twisted logs the failure and carries on."""
    service = StreamServerEndpointService(_Unbindable(), Factory.forProtocol(Protocol))
    service.privilegedStartService()  # does not raise


def test_data_loss_is_recognised() -> None:
    """The reason Twisted gives a body cut short is recognised among the others."""
    from twisted.web import _newclient

    reasons = [Failure(_newclient._DataLoss()), Failure(ConnectionError())]
    error = ResponseFailed(reasons)
    assert [is_data_loss(f.value) for f in error.reasons] == [True, False]


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_read_size_is_raised_then_restored(reactor: Any) -> None:
    """The bigger read size applies to the body's socket only until ``restore``: the
    connection goes back to the pool as it was; other transports are left alone."""
    from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint

    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        Factory.forProtocol(Protocol)
    )
    client = await TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port).connect(
        Factory.forProtocol(Protocol)
    )
    try:
        sock = client.transport
        default = sock.bufferSize
        assert default < _READ_SIZE
        size = SocketReadSize(TransportProxyProducer(sock), _READ_SIZE)
        assert size.applied
        assert sock.bufferSize == _READ_SIZE
        size.restore()
        assert not size.applied
        assert sock.bufferSize == default
        assert "bufferSize" not in vars(sock)
        other = SocketReadSize(object(), _READ_SIZE)  # no socket below: nothing happens
        assert not other.applied
        other.restore()
    finally:
        client.transport.loseConnection()
        await maybeDeferred(port.stopListening)
