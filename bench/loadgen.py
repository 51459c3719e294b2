"""A lean closed-loop HTTP/1.1 load generator, run as its own process by the benchmarks.

``concurrency`` keep-alive connections each send the next pre-encoded POST as soon as
the previous answer is complete; the latency of each request is measured from its
send to the end of its answer.  It costs a few tens of microseconds per request, so on
a 2-core machine the daemon being measured, not the client, is what limits the figures
(a treq client in the benchmark's own reactor cost about as much CPU as the daemon).

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
    """One keep-alive connection: send a request, read its answer, repeat."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""
        self.started = 0.0

    def send(self, request: bytes) -> None:
        self.started = time.perf_counter()
        # Requests are a few hundred bytes: they always fit the socket buffer.
        if self.sock.send(request) != len(request):
            raise RuntimeError("a request did not fit the socket buffer")

    def answer(self) -> int | None:
        """Read what arrived; the status once a whole answer is in, else None."""
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                break
            if not data:
                raise ConnectionError("the server closed the connection")
            self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return None
        head = self.buffer[:end].decode("latin-1")
        length = None
        for line in head.split("\r\n")[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        if length is None:
            # Chunked: small JSON answers, so the last-chunk marker suffices.
            last = self.buffer.find(b"0\r\n\r\n", end + 4)
            if last < 0:
                return None
            length = last + 5 - (end + 4)
        if len(self.buffer) < end + 4 + length:
            return None
        self.buffer = self.buffer[end + 4 + length :]
        return int(head.split(" ", 2)[1])


def run(host: str, port: int, path: str, concurrency: int, bodies: list[bytes]) -> dict:
    requests = [_request(host, port, path, body) for body in reversed(bodies)]
    selector = selectors.DefaultSelector()
    connections = []
    for _ in range(min(concurrency, len(requests))):
        sock = socket.create_connection((host, port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        connection = _Connection(sock)
        connections.append(connection)
        selector.register(sock, selectors.EVENT_READ, connection)
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
        connection.sock.close()
    return {"seconds": seconds, "latencies_ms": latencies, "statuses": dict(statuses)}


def main(argv: list[str]) -> None:
    host, port, path, concurrency, bodies_file = argv
    with open(bodies_file, "rb") as f:
        bodies = [line.rstrip(b"\n") for line in f if line.strip()]
    print(json.dumps(run(host, int(port), path, int(concurrency), bodies)))


if __name__ == "__main__":
    main(sys.argv[1:])
