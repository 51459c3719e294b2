"""The private Twisted attributes dpatia relies on, each wrapped once and said why.

Twisted offers no public way to do these three things; each is small, and each is
covered by ``tests/test_twistedcompat.py``, which fails when a Twisted upgrade renames
or removes what it uses (rather than dpatia silently losing the behaviour):

* :func:`raise_synchronously` — ``StreamServerEndpointService._raiseSynchronously``:
  without it a port that cannot be bound is logged and the daemon runs deaf; with it
  ``privilegedStartService`` raises, so ``twistd`` exits non-zero.
* :class:`SocketReadSize` — ``TransportProxyProducer._producer`` and the socket's
  ``bufferSize``: the download reads a streaming body 1 MiB at a time instead of
  Twisted's 64 KiB, which about halves its CPU per GiB on loopback.  Where the chain
  below a body's transport is not what it expects, it does nothing (reads stay 64 KiB).
* :func:`is_data_loss` — ``twisted.web._newclient._DataLoss``: the reason a body cut
  short carries, which says nothing an error message needs (``ResponseFailed`` names it
  among the real reasons).
"""

from __future__ import annotations

from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.web import _newclient

__all__ = ["SocketReadSize", "is_data_loss", "raise_synchronously"]


def raise_synchronously(service: StreamServerEndpointService) -> None:
    """Make ``service`` raise from ``privilegedStartService`` when it cannot listen."""
    service._raiseSynchronously = True


def is_data_loss(error: BaseException) -> bool:
    """Whether ``error`` is the "body ended before its end" marker of Twisted's client."""
    return isinstance(error, _newclient._DataLoss)


class SocketReadSize:
    """Raises the socket read size of the connection under a response body, and undoes it.

    The body protocol's transport is Twisted's ``TransportProxyProducer``; the socket
    below it (TCP, or TCP under TLS) is a ``FileDescriptor`` whose ``bufferSize`` is
    the size of each ``recv``.  Anything else (an in-memory transport in tests, a
    Twisted that changed shape) is left alone: :attr:`applied` is False and reads stay
    64 KiB; nothing breaks.
    """

    def __init__(self, transport: object, size: int) -> None:
        """Raise the read size of the socket below ``transport`` to ``size`` bytes."""
        self._socket: Any = None
        candidate: Any = getattr(transport, "_producer", None)
        for _ in range(3):
            if candidate is None:
                return
            if hasattr(candidate, "doRead") and isinstance(
                getattr(candidate, "bufferSize", None), int
            ):
                break
            candidate = getattr(candidate, "transport", None)
        else:
            return
        if candidate.bufferSize >= size:
            return
        self._socket = candidate
        self._own = "bufferSize" in vars(candidate)
        self._previous = candidate.bufferSize
        candidate.bufferSize = size

    @property
    def applied(self) -> bool:
        """Whether a socket's read size was raised (and not yet restored)."""
        return self._socket is not None

    def restore(self) -> None:
        """Put the read size back (the connection may go back to the pool)."""
        sock, self._socket = self._socket, None
        if sock is None:
            return
        if self._own:
            sock.bufferSize = self._previous
        else:
            del sock.bufferSize
