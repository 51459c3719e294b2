"""Outgoing SPS calls never follow a redirect: a loopback "SPS" on an allowed port
answers every call with a redirect to another loopback port that is not in the
allowlist, and that port never sees a request (so never a token); each call fails
with an :class:`SPSError` saying redirects are not followed."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import pytest_twisted
from twisted.web.resource import Resource
from twisted.web.server import Site

from dpatia_daemon import __version__
from dpatia_daemon.config import SPSConfig, URLPrefix
from dpatia_daemon.jobs import Callback
from dpatia_daemon.sps.client import SPSClient, SPSError, make_http_client
from dpatia_daemon.sps.results import Status, status_frame

pytestmark = pytest.mark.integration


class _Redirect(Resource):
    """Answers every request with ``code`` and ``Location: target``."""

    isLeaf = True

    def __init__(self, code: int, target: Callable[[], str]) -> None:
        super().__init__()
        self.code, self.target, self.seen = code, target, 0

    def render(self, request: Any) -> bytes:
        self.seen += 1
        request.setResponseCode(self.code)
        request.setHeader(b"Location", self.target().encode("ascii"))
        return b"{}"


class _Counter(Resource):
    """Counts requests (the place the redirects point to)."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[bytes | None] = []

    def render(self, request: Any) -> bytes:
        self.seen.append(request.getHeader(b"authorization"))
        return b"{}"


CALLS: dict[str, Callable[[SPSClient, Callback], Any]] = {
    "slide info": lambda sps, cb: sps.slide_info(cb, "slide-1"),
    "files": lambda sps, cb: sps.open_files(cb, "slide-1"),
    "store a result": lambda sps, cb: sps.create_result(
        cb,
        "dpatia",
        status_frame(
            slide_id="slide-1",
            status=Status.RUNNING,
            text="x",
            job_id="a" * 32,
            application_version="1",
        ),
    ),
    "token": lambda sps, cb: sps.fetch_token(cb.url, "dpatia", "id", "secret"),
}


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
@pytest_twisted.ensureDeferred
async def test_no_call_follows_a_redirect_off_the_allowlist(reactor: Any, code: int) -> None:
    """Every kind of SPS call, every redirect status: refused, the target unreached."""
    elsewhere = _Counter()
    far = reactor.listenTCP(0, Site(elsewhere), interface="127.0.0.1")
    far_url = f"http://127.0.0.1:{far.getHost().port}/SPS/v1/slides/slide-1/info"
    redirect = _Redirect(code, lambda: far_url)
    near = reactor.listenTCP(0, Site(redirect), interface="127.0.0.1")
    base = f"http://127.0.0.1:{near.getHost().port}/SPS/v1"
    allowlist = SPSConfig(allowed_callback_urls=(URLPrefix.parse(base),))
    assert allowlist.allows(base) and not allowlist.allows(far_url)
    http = make_http_client(reactor)
    sps = SPSClient(
        http=http.client, clock=reactor, software_version=__version__, timeout=5.0, retries=0
    )
    try:
        for name, call in CALLS.items():
            with pytest.raises(SPSError) as failed:
                await call(sps, Callback(base, "secret-token"))
            assert "redirect" in str(failed.value), name
            assert "secret-token" not in str(failed.value)
        assert redirect.seen == len(CALLS)
        assert elsewhere.seen == []
    finally:
        await http.close()
        await near.stopListening()
        await far.stopListening()
