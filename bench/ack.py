"""Acknowledgement benchmark: how fast does dpatia accept work, durably?

Measures, in one run on one disk:

1. the raw rate of durable file creates (write + fsync + rename + directory fsync, one
   after another) beside the spool — the baseline the daemon's image notification
   throughput is compared with;
2. image notifications against a real ``twistd dpatia`` subprocess on loopback at
   concurrency 1, 16 and 64: throughput and acknowledgement latency p50/p99;
3. ``create`` invocations at concurrency 16 against a fake SPS on loopback (each
   create stores an in-progress result at the SPS before answering).

Goals (issue #2): notification throughput >= 1.0x the raw durable-create rate,
p99 <= 20 ms at concurrency 64; create p99 <= 25 ms at concurrency 16.
Seed for reference: 96 acks/s p99 900 ms (Flask), 207/s p99 392 ms (gunicorn);
create p99 125-269 ms.

Usage: ``python bench/ack.py [--requests N] [--workdir DIR]`` (``make bench``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import treq
from twisted.internet import defer, task
from twisted.internet.defer import ensureDeferred
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.server import Site

from dpatia_daemon.simulator.daemon_process import DaemonProcess
from dpatia_daemon.simulator.fake import FakeSPS

APP = "dpatia"
BASE = "/SectraPathologyServer/external/imageanalysis/v1"


def raw_durable_creates(directory: Path, count: int) -> float:
    """Creates per second: write, fsync, rename, fsync dir — one at a time."""
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / "tmp"
    tmp.mkdir(exist_ok=True)
    payload = b"x" * 700  # about the size of a job file
    dir_fd = os.open(directory, os.O_RDONLY)
    start = time.perf_counter()
    for i in range(count):
        name = f"{i:08d}.json"
        fd = os.open(tmp / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, payload)
        os.fsync(fd)
        os.close(fd)
        os.rename(tmp / name, directory / name)
        os.fsync(dir_fd)
    elapsed = time.perf_counter() - start
    os.close(dir_fd)
    shutil.rmtree(directory)
    return count / elapsed


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


async def load(
    reactor: Any, url: str, bodies: list[dict[str, Any]], concurrency: int
) -> tuple[float, list[float]]:
    """POST every body with ``concurrency`` clients; return (requests/s, latencies ms)."""
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = concurrency
    client = treq.client.HTTPClient(Agent(reactor, pool=pool))
    latencies: list[float] = []
    queue = list(reversed(bodies))

    async def worker() -> None:
        while queue:
            data = json.dumps(queue.pop()).encode()
            t0 = time.perf_counter()
            response = await client.post(url, data, headers={"Content-Type": ["application/json"]})
            await response.content()
            latencies.append((time.perf_counter() - t0) * 1000)
            if response.code != 200:
                raise RuntimeError(f"HTTP {response.code} from {url}")

    start = time.perf_counter()
    await defer.gatherResults(
        [ensureDeferred(worker()) for _ in range(concurrency)], consumeErrors=True
    )
    elapsed = time.perf_counter() - start
    await pool.closeCachedConnections()
    return len(bodies) / elapsed, latencies


async def main(reactor: Any, args: argparse.Namespace) -> None:
    keep = bool(args.workdir)
    workdir = (
        Path(args.workdir)
        if keep
        else Path(tempfile.mkdtemp(prefix="dpatia-bench-", dir=os.getcwd()))
    )
    workdir.mkdir(parents=True, exist_ok=True)
    spool = workdir / "spool"
    raw_rate = raw_durable_creates(workdir / "raw", args.raw)

    fake = FakeSPS()
    token = fake.issue_token()
    port = reactor.listenTCP(0, Site(fake.resource()), interface="127.0.0.1", backlog=256)
    callback = f"http://127.0.0.1:{port.getHost().port}{BASE}"
    config = workdir / "dpatia.ini"
    # Acceptance alone: no local workers competing for the cores ([workers] count = 0,
    # a front-door daemon whose jobs other daemons sharing the spool would run).
    config.write_text(
        f"[spool]\ndirectory = {spool}\n[workers]\ncount = 0\n"
        "[sps]\nallowed_callback_urls = http://127.0.0.1:*/\n"
    )
    daemon = DaemonProcess(reactor=reactor, config=str(config), cwd=str(workdir))
    await daemon.start()
    serial = 0

    def body(action: str) -> dict[str, Any]:
        nonlocal serial
        serial += 1
        slide = f"bench-{serial:06d}"
        common = {
            "applicationId": APP,
            "slideId": slide,
            "callbackInfo": {"url": callback, "token": token},
            "cancellationToken": f"ct-{serial}",
            "context": {},
        }
        if action == "create":
            fake.add_slide(slide)
            return {"action": "create", "input": {"type": "wholeSlide"}, **common}
        return {
            "action": "newImageFiles",
            "imageInfo": {"imageSize": {"width": 4000, "height": 3000}},
            **common,
        }

    rows: list[tuple[str, int, int, float, float, float, float | None]] = []
    try:
        notify = daemon.url + "/dpatia/imagenotification"
        await load(reactor, notify, [body("notify") for _ in range(50)], 8)  # warm-up
        for concurrency in (1, 16, 64):
            n = args.requests if concurrency > 1 else max(100, args.requests // 4)
            rate, lat = await load(reactor, notify, [body("notify") for _ in range(n)], concurrency)
            goal = 20.0 if concurrency == 64 else None
            rows.append(
                (
                    "notification",
                    concurrency,
                    n,
                    rate,
                    percentile(lat, 0.5),
                    percentile(lat, 0.99),
                    goal,
                )
            )
            # Let this round's background frame writes drain before the next round.
            await task.deferLater(reactor, 1.0, lambda: None)
        creates = [body("create") for _ in range(args.creates)]
        rate, lat = await load(reactor, daemon.url + "/dpatia", creates, 16)
        rows.append(
            ("create", 16, len(creates), rate, percentile(lat, 0.5), percentile(lat, 0.99), 25.0)
        )
    finally:
        await daemon.kill(signal.SIGTERM)
        await port.stopListening()
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)

    print()
    print(
        f"raw durable creates (write+fsync+rename+dir fsync, serial) on this disk: {raw_rate:.1f}/s"
    )
    print()
    header = f"{'request':<13}{'conc':>5}{'n':>6}{'req/s':>10}{'x raw':>8}{'p50 ms':>9}{'p99 ms':>9}  goal"
    print(header)
    print("-" * len(header))
    for name, conc, n, rate, p50, p99, goal in rows:
        ratio = f"{rate / raw_rate:.2f}x" if name == "notification" else "-"
        verdict = (
            "" if goal is None else f"p99 <= {goal:g} ms: {'met' if p99 <= goal else 'NOT met'}"
        )
        print(f"{name:<13}{conc:>5}{n:>6}{rate:>10.1f}{ratio:>8}{p50:>9.2f}{p99:>9.2f}  {verdict}")
    best = max(r[3] for r in rows if r[0] == "notification")
    print()
    print(
        f"best notification throughput / raw durable-create rate: {best / raw_rate:.2f}x (goal >= 1.0x)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="dpatia acknowledgement benchmark")
    parser.add_argument(
        "--requests", type=int, default=2000, help="notifications per concurrency level"
    )
    parser.add_argument("--creates", type=int, default=500, help="create invocations")
    parser.add_argument("--raw", type=int, default=1000, help="raw durable creates to time")
    parser.add_argument(
        "--workdir", help="keep the run's files here (default: a temp dir, removed)"
    )
    task.react(lambda reactor: ensureDeferred(main(reactor, parser.parse_args())))
