"""Large-body benchmark: do 20 MiB modifies hold up the acknowledgements of others?

A real ``twistd dpatia`` subprocess (no workers) and a fake SPS on loopback.  Image
notifications are sent at concurrency 8 (``bench/loadgen.py``, its own process) twice:
alone, and while another client keeps sending ``modify`` invocations whose stored
result is about 20 MiB of polygon points (each stored at the fake SPS and answered,
as the SPS's own modify of a big result would be).  Reported: the notifications' p50
and p99 both ways, and the modifies' count and mean time.

Goal (issue 10): notification p99 during the modifies <= 2x the p99 without them.
A third round gives the machine's ceiling: the notifications' p99 beside a process
that does the same JSON work (parse and encode the body, non-stop) without the daemon.

Usage: ``python bench/bigbody.py [--requests N] [--mib M]``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ack import APP, BASE, SlideRequests, load, percentile
from twisted.internet import task, threads
from twisted.internet.defer import ensureDeferred
from twisted.web.server import Site

from dpatia_daemon.simulator.daemon_process import DaemonProcess
from dpatia_daemon.simulator.fake import FakeSPS


def _content(mib: float) -> list[dict[str, Any]]:
    """A result's content of about ``mib`` MiB (a point is about 36 bytes of JSON)."""
    points = int(mib * 1024 * 1024 / 36)
    return [
        {
            "style": {"strokeStyle": "#FF0000"},
            "polygons": [
                {
                    "points": [
                        {"x": round(0.1 + i * 1e-7, 9), "y": round(0.2 + i * 1e-7, 9)}
                        for i in range(points)
                    ]
                }
            ],
        }
    ]


class Modifier:
    """A blocking client in a thread: modify after modify until stopped."""

    def __init__(self, url: str, invocation: dict[str, Any], stored: dict[str, Any]):
        self.url = urlsplit(url)
        self.invocation = invocation
        self.stored = stored
        self.times: list[float] = []
        self.failures: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        content = self.stored["data"]["result"]["content"]
        while not self.stop.is_set():
            body = dict(self.invocation, action="modify", input=self.stored)
            data = json.dumps(body).encode()
            start = time.perf_counter()
            conn = http.client.HTTPConnection(self.url.hostname, self.url.port, timeout=120)
            conn.request("POST", "/dpatia", data, {"Content-Type": "application/json"})
            response = conn.getresponse()
            answer = response.read()
            conn.close()
            self.times.append(time.perf_counter() - start)
            if response.status != 200:
                self.failures.append(f"{response.status} {answer[:200]!r}")
                return
            # The next modify needs the new versionId; keep the content object as is.
            stored = json.loads(answer)
            stored["data"]["result"]["content"] = content
            self.stored = stored


async def main(reactor: Any, args: argparse.Namespace) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="dpatia-bigbody-"))
    fake = FakeSPS()
    token = fake.issue_token()
    port = reactor.listenTCP(0, Site(fake.resource()), interface="127.0.0.1", backlog=256)
    callback = f"http://127.0.0.1:{port.getHost().port}{BASE}"
    notification = SlideRequests(fake, callback, token)

    config = workdir / "dpatia.ini"
    config.write_text(
        f"[spool]\ndirectory = {workdir / 'spool'}\n"
        "[workers]\ncount = 0\n"
        "[sps]\nallowed_callback_urls = http://127.0.0.1:*/\ntimeout = 120\n"
    )
    daemon = DaemonProcess(reactor=reactor, config=str(config), cwd=str(workdir))
    await daemon.start()
    try:
        notify = daemon.url + "/dpatia/imagenotification"
        fake.add_slide("big-slide")
        invocation = {
            "action": "create",
            "applicationId": APP,
            "slideId": "big-slide",
            "callbackInfo": {"url": callback, "token": token},
            "cancellationToken": "ct-big",
            "context": {},
            "input": {"type": "wholeSlide"},
        }
        created = await _post(reactor, daemon.url + "/dpatia", invocation)
        created["data"]["result"] = {"type": "primitive", "content": _content(args.mib)}
        size = len(json.dumps(dict(invocation, action="modify", input=created)))
        await load(notify, [notification() for _ in range(200)], 8, workdir)  # warm up
        _, alone = await load(notify, [notification() for _ in range(args.requests)], 8, workdir)
        modifier = Modifier(daemon.url, invocation, created)
        thread = threading.Thread(target=modifier.run, daemon=True)
        thread.start()
        while not modifier.times and thread.is_alive():
            await task.deferLater(reactor, 0.5, lambda: None)  # the first one is stored
        _, during = await load(notify, [notification() for _ in range(args.requests)], 8, workdir)
        modifier.stop.set()
        await threads.deferToThread(thread.join)
        # The ceiling: the same JSON work (parse and encode the modify body, non-stop)
        # in a process of its own that has nothing to do with the daemon, to show what
        # sharing the machine's cores costs the notifications by itself.
        body_file = workdir / "modify.json"
        body_file.write_text(json.dumps(dict(invocation, action="modify", input=created)))
        burner = subprocess.Popen([sys.executable, "-c", _BURN, str(body_file)])
        try:
            _, ceiling = await load(
                notify, [notification() for _ in range(args.requests)], 8, workdir
            )
        finally:
            burner.kill()
            burner.wait()
    finally:
        await daemon.kill(signal.SIGTERM)
        await port.stopListening()
        shutil.rmtree(workdir, ignore_errors=True)
    if modifier.failures:
        raise RuntimeError(f"modify failed: {modifier.failures[0]}")
    p99_alone, p99_during = percentile(alone, 0.99), percentile(during, 0.99)
    print()
    print(f"modify body: {size / 2**20:.1f} MiB; notifications at concurrency 8")
    print(f"{'notifications':<28}{'n':>6}{'p50 ms':>9}{'p99 ms':>9}")
    print(f"{'alone':<28}{len(alone):>6}{percentile(alone, 0.5):>9.2f}{p99_alone:>9.2f}")
    print(
        f"{'while modifies run':<28}{len(during):>6}{percentile(during, 0.5):>9.2f}"
        f"{p99_during:>9.2f}"
    )
    p99_ceiling = percentile(ceiling, 0.99)
    print(
        f"{'beside a JSON-burning process':<28}{len(ceiling):>6}"
        f"{percentile(ceiling, 0.5):>9.2f}{p99_ceiling:>9.2f}"
    )
    mean = sum(modifier.times) / len(modifier.times)
    print(f"modifies: {len(modifier.times)}, {mean:.2f} s each (stored at the SPS and answered)")
    ratio = p99_during / p99_alone
    print(f"p99 ratio {ratio:.2f}x (goal <= 2x: {'met' if ratio <= 2 else 'NOT met'})")
    print(
        f"ceiling: p99 beside one process doing the same JSON work, not the daemon's: "
        f"{p99_ceiling / p99_alone:.2f}x alone"
    )


#: The ceiling's burner: parse and encode the body in the file argv[1], for ever.
_BURN = """
import json, sys
raw = open(sys.argv[1], "rb").read()
while True:
    json.dumps(json.loads(raw))
"""


async def _post(reactor: Any, url: str, body: dict[str, Any]) -> Any:
    parts = urlsplit(url)

    def post() -> Any:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
        conn.request("POST", parts.path, json.dumps(body), {"Content-Type": "application/json"})
        answer = conn.getresponse().read()
        conn.close()
        return json.loads(answer)

    return await threads.deferToThread(post)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="dpatia large-body benchmark")
    parser.add_argument("--requests", type=int, default=2000, help="notifications per round")
    parser.add_argument("--mib", type=float, default=20.0, help="size of the modify body")
    task.react(lambda reactor: ensureDeferred(main(reactor, parser.parse_args())))
