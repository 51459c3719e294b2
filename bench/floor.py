"""The floor of a click on this machine: the least a Twisted + treq server takes to
answer a ``create`` with the IA-API's two sequential SPS calls, and nothing else.

``python bench/floor.py PORT_FILE`` serves ``POST /create`` on 127.0.0.1 (an ephemeral
port, written to ``PORT_FILE``): it parses the JSON body, reads the slide's results
(``GET applications/{app}/results/slide/{slide}``), stores a "queued" result (``POST
applications/{app}/results``, a small fixed body) with treq over one persistent
connection pool, and answers with what the SPS stored.  No validation, spool, logging,
reuse rule or metrics: what is left is Python, Twisted's HTTP server and client and
the JSON, the stack dpatia is built on.  ``bench/click.py --floor`` measures it beside
dpatia against the same stand-in, with the same load generator, so the gap between the
two is dpatia's own work and the floor is what no work of dpatia's can go below.
"""

from __future__ import annotations

import json
import sys
from typing import Any
from urllib.parse import quote

import treq
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.web.client import HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

_pool = HTTPConnectionPool(reactor, persistent=True)
_pool.maxPersistentPerHost = 32


async def _create(raw: bytes) -> bytes:
    call = json.loads(raw)
    base = call["callbackInfo"]["url"].rstrip("/")
    headers = {"Authorization": "Bearer " + call["callbackInfo"]["token"]}
    app, slide = quote(call["applicationId"], safe=""), quote(call["slideId"], safe="")
    listed = await treq.get(
        f"{base}/applications/{app}/results/slide/{slide}", headers=headers, pool=_pool
    )
    json.loads(await listed.content())
    body = {
        "slideId": call["slideId"],
        "displayResult": "Queued",
        "displayProperties": {"Status": "queued"},
        "data": {"context": {}, "result": None},
    }
    stored = await treq.post(
        f"{base}/applications/{app}/results",
        data=json.dumps(body).encode(),
        headers={**headers, "Content-Type": "application/json"},
        pool=_pool,
    )
    return json.dumps(json.loads(await stored.content())).encode()


class _Create(Resource):
    isLeaf = True

    def render_POST(self, request: Request) -> Any:
        assert request.content is not None

        def answer(body: bytes) -> None:
            request.setHeader(b"content-type", b"application/json")
            request.write(body)
            request.finish()

        def failed(failure: Any) -> None:
            request.setResponseCode(500)
            request.write(failure.getErrorMessage().encode())
            request.finish()

        ensureDeferred(_create(request.content.read())).addCallbacks(answer, failed)
        return NOT_DONE_YET


def main(port_file: str) -> None:
    root = Resource()
    root.putChild(b"create", _Create())
    port = reactor.listenTCP(0, Site(root), interface="127.0.0.1", backlog=256)  # type: ignore[attr-defined]
    with open(port_file, "w") as f:
        f.write(str(port.getHost().port))
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main(sys.argv[1])
