"""A real front door for hostile-input tests: the daemon's site over a real directory
spool, a fake SPS on loopback, and raw HTTP bytes sent to the site in memory.

:func:`exchange` feeds any bytes to the site's HTTP channel through an in-memory
transport whose peer address the test chooses (no socket: nothing here is about
sockets, and the allowed-clients tests need peers such as ``::ffff:10.0.0.1``) and
waits, with a bound, for one whole answer.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import attrs
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.web.server import Site

from dpatia_daemon import __version__
from dpatia_daemon.config import Config, SPSConfig, URLPrefix
from dpatia_daemon.frontdoor.routes import IAAPI
from dpatia_daemon.frontdoor.site import make_site
from dpatia_daemon.simulator.fake import BASE_PATH, FakeSPS
from dpatia_daemon.spool import DirectorySpool
from dpatia_daemon.sps.client import SPSClient, make_http_client
from dpatia_daemon.sps.writer import ResultWriter

APP = "dpatia"

#: The longest any one answer may take (it is a bound, never a wait).
ANSWER_TIMEOUT = 20.0


@attrs.frozen
class Answer:
    """One HTTP answer: status, lower-case header names, the (de-chunked) body."""

    status: int
    headers: dict[bytes, bytes]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def _parse(raw: bytes, head_only: bool = False) -> Answer | None:
    """The first whole answer in ``raw``, or None while it is incomplete (an answer to
    HEAD, ``head_only``, has no body whatever its headers say)."""
    head, sep, rest = raw.partition(b"\r\n\r\n")
    if not sep:
        return None
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ")[1])
    if status == 100:  # 100 Continue, then the real answer
        return _parse(rest, head_only)
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    if head_only or status in (204, 304):
        return Answer(status, headers, b"")
    if b"content-length" in headers:
        length = int(headers[b"content-length"])
        return Answer(status, headers, rest[:length]) if len(rest) >= length else None
    if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        body, pos = b"", 0
        while True:
            eol = rest.find(b"\r\n", pos)
            if eol < 0:
                return None
            size = int(rest[pos:eol].split(b";")[0], 16)
            if size == 0:
                return Answer(status, headers, body)
            if len(rest) < eol + 2 + size + 2:
                return None
            body += rest[eol + 2 : eol + 2 + size]
            pos = eol + 2 + size + 2
    return None  # the body runs to the close


class _Transport(StringTransport):
    """Fires ``done`` with the first whole answer, or with what came before the close."""

    def __init__(self, peer: Any, head_only: bool) -> None:
        super().__init__(peerAddress=peer, hostAddress=IPv4Address("TCP", "127.0.0.1", 5006))
        self.done: Deferred[Answer] = Deferred()
        self.head_only = head_only

    def _check(self) -> None:
        if self.done.called:
            return
        answer = _parse(self.value(), self.head_only)
        if answer is not None:
            self.done.callback(answer)

    def write(self, data: bytes) -> None:
        super().write(data)
        self._check()

    def writeSequence(self, data: Any) -> None:
        super().writeSequence(data)
        self._check()

    def loseConnection(self) -> None:
        super().loseConnection()
        self._check()
        if not self.done.called:
            raw = self.value()
            head = raw.split(b"\r\n", 1)[0].split(b" ")
            status = int(head[1]) if len(head) > 1 and head[1].isdigit() else 0
            self.done.callback(Answer(status, {}, raw.partition(b"\r\n\r\n")[2]))


def peer(host: str) -> IPv4Address | IPv6Address:
    """A TCP peer address for ``host`` (IPv6 when it has a colon)."""
    if ":" in host:
        return IPv6Address("TCP", host, 40000)
    return IPv4Address("TCP", host, 40000)


async def exchange(reactor: Any, site: Site, raw: bytes, client: str = "127.0.0.1") -> Answer:
    """Send ``raw`` to ``site`` from ``client``; the first answer, within a bound."""
    address = peer(client)
    transport = _Transport(address, head_only=raw.startswith(b"HEAD "))
    protocol = site.buildProtocol(address)
    assert protocol is not None
    protocol.makeConnection(transport)
    protocol.dataReceived(raw)
    transport.done.addTimeout(ANSWER_TIMEOUT, reactor)
    try:
        return await transport.done
    finally:
        protocol.connectionLost(Failure(ConnectionDone()))


def request(
    method: bytes,
    path: bytes,
    body: bytes = b"",
    headers: list[tuple[bytes, bytes]] | None = None,
    content_type: bytes | None = b"application/json",
) -> bytes:
    """An HTTP/1.1 request, closing the connection after its answer."""
    lines = [method + b" " + path + b" HTTP/1.1", b"Host: dpatia.test", b"Connection: close"]
    if content_type is not None:
        lines.append(b"Content-Type: " + content_type)
    lines += [name + b": " + value for name, value in headers or []]
    lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def tree(root: Path) -> dict[str, int]:
    """Every file and directory under ``root``, with its size (0 for a directory)."""
    found = {}
    for base, dirs, files in os.walk(root):
        for name in dirs:
            found[os.path.join(base, name)] = 0
        for name in files:
            path = os.path.join(base, name)
            found[path] = os.lstat(path).st_size
    return found


@attrs.define
class FrontDoor:
    """The daemon's IA-API site over a real spool, its fake SPS and its folders."""

    reactor: Any
    root: Path
    spool_dir: Path
    work_dir: Path
    fake: FakeSPS
    callback: str
    token: str
    api: IAAPI
    site: Site
    spool: DirectorySpool
    closers: list[Any]

    async def send(self, raw: bytes, client: str = "127.0.0.1") -> Answer:
        return await exchange(self.reactor, self.site, raw, client)

    async def settle(self) -> None:
        """Wait until the background SPS writes of earlier answers, and the result
        notes they made, are done."""
        await self.api.background.drain()
        await self.api.notes_written()

    async def close(self) -> None:
        await self.settle()
        for close in reversed(self.closers):
            await close()

    def outside(self) -> dict[str, int]:
        """What exists under the test's folder outside the spool and work folders."""
        return {
            path: size
            for path, size in tree(self.root).items()
            if not path.startswith((str(self.spool_dir), str(self.work_dir)))
        }

    def spool_files(self) -> set[str]:
        return set(tree(self.spool_dir))

    def invocation(self, action: str = "create", **extra: Any) -> dict[str, Any]:
        body: dict[str, Any] = {
            "action": action,
            "applicationId": APP,
            "slideId": "slide-1",
            "callbackInfo": {"url": self.callback, "token": self.token},
            "cancellationToken": "ct-1",
            "context": {},
            "input": {"type": "wholeSlide"},
        }
        body.update(extra)
        return body

    def notification(self, **extra: Any) -> dict[str, Any]:
        body: dict[str, Any] = {
            "action": "newImageFiles",
            "applicationId": APP,
            "slideId": "slide-1",
            "callbackInfo": {"url": self.callback, "token": self.token},
            "cancellationToken": "ct-n",
            "context": {},
            "imageInfo": {"imageSize": {"width": 2000, "height": 1000}, "micronsPerPixel": 0.5},
        }
        body.update(extra)
        return body


async def start_front_door(reactor: Any, root: Path, **server: Any) -> FrontDoor:
    """A :class:`FrontDoor` under ``root``; ``server`` overrides ``[server]`` keys."""
    from twisted.internet.defer import maybeDeferred

    fake = FakeSPS(clock=reactor)
    fake.add_slide("slide-1")
    token = fake.issue_token()
    sps_port = reactor.listenTCP(0, Site(fake.resource()), interface="127.0.0.1")
    callback = f"http://127.0.0.1:{sps_port.getHost().port}{BASE_PATH}"
    spool_dir, work_dir = root / "spool", root / "work"
    defaults = Config()
    config = attrs.evolve(
        defaults,
        server=attrs.evolve(defaults.server, max_body_bytes=8192, **server),
        spool=attrs.evolve(defaults.spool, directory=FilePath(str(spool_dir)), min_free_bytes=0),
        workers=attrs.evolve(defaults.workers, work_directory=FilePath(str(work_dir))),
        sps=SPSConfig(allowed_callback_urls=(URLPrefix.parse(callback),), timeout=5.0, retries=0),
    )
    spool = DirectorySpool(
        directory=FilePath(str(spool_dir)), reactor=reactor, owner="test", sweep_interval=3600
    )
    spool.startService()
    http = make_http_client(reactor)
    sps = SPSClient(
        http=http.client, clock=reactor, software_version=__version__, timeout=5.0, retries=0
    )
    writer = ResultWriter(sps=sps, clock=reactor, display_name=config.app.display_name)
    api = IAAPI(config=config, spool=spool, sps=sps, clock=reactor, writer=writer)
    site = make_site(api.resource(), config)
    closers = [
        lambda: maybeDeferred(spool.stopService),
        http.close,
        lambda: maybeDeferred(sps_port.stopListening),
    ]
    return FrontDoor(
        reactor=reactor,
        root=root,
        spool_dir=spool_dir,
        work_dir=work_dir,
        fake=fake,
        callback=callback,
        token=token,
        api=api,
        site=site,
        spool=spool,
        closers=closers,
    )
