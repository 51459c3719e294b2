"""A test NOTIFY_SOCKET: a datagram socket read by the reactor, which keeps every
message and lets a test wait (boundedly) for the next one that matches."""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure


class NotifyReceiver:
    """Receives sd_notify datagrams on ``address`` ("\\0name": abstract) via ``reactor``."""

    def __init__(self, reactor: Any, address: str) -> None:
        self.reactor = reactor
        self.messages: list[str] = []
        self._waiters: list[tuple[Callable[[str], bool], Deferred[str]]] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.setblocking(False)
        reactor.addReader(self)

    def fileno(self) -> int:
        return self.sock.fileno()

    def logPrefix(self) -> str:
        return "notify-receiver"

    def doRead(self) -> None:
        while True:
            try:
                message = self.sock.recv(4096).decode()
            except BlockingIOError:
                return
            self.messages.append(message)
            for entry in list(self._waiters):
                if entry[0](message):
                    self._waiters.remove(entry)
                    entry[1].callback(message)

    def connectionLost(self, reason: Failure) -> None:
        pass

    def next(self, matching: Callable[[str], bool], timeout: float = 30.0) -> Deferred[str]:
        """Fire with the next message ``matching`` accepts; fail after ``timeout`` s."""
        d: Deferred[str] = Deferred(lambda d: self._waiters.remove(entry))
        entry = (matching, d)
        self._waiters.append(entry)
        return d.addTimeout(timeout, self.reactor)

    def wait_for(self, matching: Callable[[str], bool], timeout: float = 30.0) -> Deferred[str]:
        """The first message ``matching`` accepts, received already or still to come."""
        for message in self.messages:
            if matching(message):
                return succeed(message)
        return self.next(matching, timeout)

    def close(self) -> None:
        self.reactor.removeReader(self)
        self.sock.close()
