"""A lean closed-loop HTTP/1.1 load generator, run as its own process by the benchmarks.

``concurrency`` keep-alive connections each send the next pre-encoded POST as soon as
the previous answer is complete; the latency of each request is measured from its
send to the end of its answer.  It costs a few tens of microseconds per request, so on
a 2-core machine the daemon being measured, not the client, is what limits the figures
(a treq client in the benchmark's own reactor cost about as much CPU as the daemon).
A server that closes the connection after an answer (gunicorn's sync workers, the
seed's, answer ``Connection: close``) gets a new connection for the next request, and
that request's latency includes the connect, as it would for the SPS.

Usage (what ``bench/ack.py`` runs)::

    python bench/loadgen.py HOST PORT PATH CONCURRENCY BODIES.jsonl

prints one JSON object: ``{"seconds": ..., "latencies_ms": [...], "statuses": {...}}``.
Each line of ``BODIES.jsonl`` is one request body; every body is sent once.
"""

from __future__ import annotations

import json
import selectors
import socket
import sys
import time
from collections import Counter


def _request(host: str, port: int, path: str, body: bytes) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("ascii") + body


class _Connection:
    """One connection: send a request, read its answer, repeat (reconnecting when the
    server closed it)."""

    def __init__(self, host: str, port: int, selector: selectors.BaseSelector) -> None:
        self.address = (host, port)
        self.selector = selector
        self.sock: socket.socket | None = None
        self.buffer = b""
        self.started = 0.0

    def _connect(self) -> socket.socket:
        sock = socket.create_connection(self.address)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        self.selector.register(sock, selectors.EVENT_READ, self)
        self.sock = sock
        return sock

    def close(self) -> None:
        if self.sock is not None:
            self.selector.unregister(self.sock)
            self.sock.close()
            self.sock = None
        self.buffer = b""

    def send(self, request: bytes) -> None:
        self.started = time.perf_counter()
        sock = self.sock or self._connect()
        # Requests are a few hundred bytes: they always fit the socket buffer.
        if sock.send(request) != len(request):
            raise RuntimeError("a request did not fit the socket buffer")

    def answer(self) -> int | None:
        """Read what arrived; the status once a whole answer is in, else None."""
        assert self.sock is not None
        closed = False
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                break
            if not data:
                closed = True
                break
            self.buffer += data
        status, close = self._parse()
        if status is None:
            if closed:
                raise ConnectionError("the server closed the connection mid-answer")
            return None
        if close or closed:
            self.close()
        return status

    def _parse(self) -> tuple[int | None, bool]:
        """(status, whether the server will close) of a complete answer in the buffer,
        which it then drops; (None, False) while incomplete."""
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return None, False
        head = self.buffer[:end].decode("latin-1")
        length = None
        close = False
        for line in head.split("\r\n")[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "connection":
                close = value.strip().lower() == "close"
        if length is None:
            # Chunked: small JSON answers, so the last-chunk marker suffices.
            last = self.buffer.find(b"0\r\n\r\n", end + 4)
            if last < 0:
                return None, False
            length = last + 5 - (end + 4)
        if len(self.buffer) < end + 4 + length:
            return None, False
        self.buffer = self.buffer[end + 4 + length :]
        return int(head.split(" ", 2)[1]), close


def run(host: str, port: int, path: str, concurrency: int, bodies: list[bytes]) -> dict:
    requests = [_request(host, port, path, body) for body in reversed(bodies)]
    selector = selectors.DefaultSelector()
    connections = [_Connection(host, port, selector) for _ in range(concurrency)]
    for connection in connections[: len(requests)]:
        connection._connect()
    del connections[len(requests) :]
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    start = time.perf_counter()
    busy = 0
    for connection in connections:
        connection.send(requests.pop())
        busy += 1
    while busy:
        events = selector.select(timeout=60)
        if not events:
            raise TimeoutError(f"no answer within 60 s ({busy} requests outstanding)")
        for key, _ in events:
            connection = key.data
            status = connection.answer()
            if status is None:
                continue
            latencies.append((time.perf_counter() - connection.started) * 1000)
            statuses[status] += 1
            if requests:
                connection.send(requests.pop())
            else:
                busy -= 1
    seconds = time.perf_counter() - start
    for connection in connections:
        connection.close()
    return {"seconds": seconds, "latencies_ms": latencies, "statuses": dict(statuses)}


def main(argv: list[str]) -> None:
    host, port, path, concurrency, bodies_file = argv
    with open(bodies_file, "rb") as f:
        bodies = [line.rstrip(b"\n") for line in f if line.strip()]
    print(json.dumps(run(host, int(port), path, int(concurrency), bodies)))


if __name__ == "__main__":
    main(sys.argv[1:])
