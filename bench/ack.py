"""Acknowledgement benchmark: how fast does dpatia accept work, durably?

Measures, in one run on one disk:

1. the raw rate of durable file creates (write + fsync + rename + directory fsync, one
   after another) beside the spool — the baseline the daemon's image notification
   throughput is compared with;
2. image notifications against a real ``twistd dpatia`` subprocess on loopback at
   concurrency 1, 16 and 64: throughput, acknowledgement latency p50/p99, and the
   daemon's own CPU time per acknowledgement;
3. ``create`` invocations at concurrency 16 against a fake SPS on loopback (each
   create stores an in-progress result at the SPS before answering);
4. the ceiling the stack itself sets: the same load against a Klein route on the same
   Twisted site that only reads the body and answers ``{}`` (no parsing, no spool, no
   log line).  No acknowledgement can be faster than this on the machine.

The load comes from ``bench/loadgen.py``, a lean client in its own process: a client
in this process's reactor cost about as much CPU as the daemon it measured.  The fake
SPS runs here (the daemon stores each notification's "queued" frame there afterwards).

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
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from twisted.internet import task, threads
from twisted.internet.defer import ensureDeferred
from twisted.web.server import Site

from dpatia_daemon.simulator.daemon_process import DaemonProcess
from dpatia_daemon.simulator.fake import FakeSPS

APP = "dpatia"
BASE = "/SectraPathologyServer/external/imageanalysis/v1"


HERE = Path(__file__).resolve().parent


def raw_durable_creates(directory: Path, count: int) -> float:
    """Creates per second: write, fsync, rename, fsync dir — one at a time.

    The files are left in place until the whole run is over: on an ext4 without a
    journal, inodes freed in the last minutes are skipped by every new allocation in
    their group, so deleting a thousand files here would slow the daemon's creates
    that follow for reasons that are this benchmark's, not the daemon's.
    """
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
    return count / elapsed


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU time of process ``pid`` so far (Linux), else None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, TypeError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def load(
    url: str, bodies: list[dict[str, Any]], concurrency: int, workdir: Path
) -> tuple[float, list[float]]:
    """POST every body with ``concurrency`` clients (``loadgen.py`` in its own process);
    return (requests/s, latencies in ms).  Any answer but 200 stops the benchmark."""
    parts = urlsplit(url)
    file = workdir / "bodies.jsonl"
    file.write_text("".join(json.dumps(body) + "\n" for body in bodies))
    argv = [sys.executable, str(HERE / "loadgen.py"), parts.hostname or "127.0.0.1"]
    argv += [str(parts.port), parts.path, str(concurrency), str(file)]

    done = await threads.deferToThread(subprocess.run, argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"load generator failed: {done.stderr.strip()[-2000:]}")
    out = json.loads(done.stdout)
    bad = {code: n for code, n in out["statuses"].items() if code != "200"}
    if bad:
        raise RuntimeError(f"answers other than 200 from {url}: {bad}")
    return len(bodies) / out["seconds"], out["latencies_ms"]


def serve_empty() -> None:
    """The ceiling server: dpatia's own Site and request class, a Klein route that only
    reads the body and answers ``{}``.  Prints the line DaemonProcess waits for."""
    from klein import Klein
    from twisted.internet import reactor

    from dpatia_daemon.api import make_site
    from dpatia_daemon.config import Config

    app = Klein()

    @app.route("/dpatia/imagenotification", methods=["POST"])
    def notification(request: Any) -> bytes:
        request.content.read()
        return b"{}"

    port = reactor.listenTCP(  # type: ignore[attr-defined]
        0, make_site(app.resource(), Config()), interface="127.0.0.1", backlog=256
    )
    print(f"Site starting on {port.getHost().port}", flush=True)
    print("dpatia ready", flush=True)
    reactor.run()  # type: ignore[attr-defined]


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
    empty = DaemonProcess(
        reactor=reactor,
        config="",
        cwd=str(workdir),
        command=[str(HERE / "ack.py"), "--serve-empty"],
    )
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

    rows: list[tuple[Any, ...]] = []
    try:
        notify = daemon.url + "/dpatia/imagenotification"
        await load(notify, [body("notify") for _ in range(100)], 8, workdir)  # warm-up
        for concurrency in (1, 16, 64):
            n = args.requests if concurrency > 1 else max(100, args.requests // 4)
            bodies = [body("notify") for _ in range(n)]
            before = cpu_seconds(daemon.pid)
            rate, lat = await load(notify, bodies, concurrency, workdir)
            after = cpu_seconds(daemon.pid)
            cpu = None if before is None or after is None else (after - before) / n * 1e6
            goal = 20.0 if concurrency == 64 else None
            p50, p99 = percentile(lat, 0.5), percentile(lat, 0.99)
            rows.append(("notification", concurrency, n, rate, p50, p99, cpu, goal))
            # Let this round's background frame writes drain before the next round.
            await task.deferLater(reactor, 2.0, lambda: None)
        creates = [body("create") for _ in range(args.creates)]
        before = cpu_seconds(daemon.pid)
        rate, lat = await load(daemon.url + "/dpatia", creates, 16, workdir)
        after = cpu_seconds(daemon.pid)
        cpu = None if before is None or after is None else (after - before) / len(creates) * 1e6
        p50, p99 = percentile(lat, 0.5), percentile(lat, 0.99)
        rows.append(("create", 16, len(creates), rate, p50, p99, cpu, 25.0))
        await daemon.kill(signal.SIGTERM)
        # The ceiling, measured with the daemon stopped so that both had the machine.
        await empty.start()
        url = empty.url + "/dpatia/imagenotification"
        for concurrency in (1, 64):
            n = args.requests if concurrency > 1 else max(100, args.requests // 4)
            bodies = [body("notify") for _ in range(n)]
            before = cpu_seconds(empty.pid)
            rate, lat = await load(url, bodies, concurrency, workdir)
            after = cpu_seconds(empty.pid)
            cpu = None if before is None or after is None else (after - before) / n * 1e6
            p50, p99 = percentile(lat, 0.5), percentile(lat, 0.99)
            rows.append(("empty route", concurrency, n, rate, p50, p99, cpu, None))
    finally:
        if daemon.exit_code is None and daemon.exit_signal is None:
            await daemon.kill(signal.SIGTERM)
        if empty.pid is not None and empty.exit_code is None and empty.exit_signal is None:
            await empty.kill(signal.SIGTERM)
        await port.stopListening()
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)

    print()
    print(
        f"raw durable creates (write+fsync+rename+dir fsync, serial) on this disk: {raw_rate:.1f}/s"
    )
    print()
    header = (
        f"{'request':<13}{'conc':>5}{'n':>6}{'req/s':>9}{'x raw':>7}{'p50 ms':>8}{'p99 ms':>8}"
        f"{'CPU us':>8}  goal"
    )
    print(header)
    print("-" * (len(header) + 24))
    for name, conc, n, rate, p50, p99, cpu, goal in rows:
        ratio = f"{rate / raw_rate:.2f}x" if name != "create" else "-"
        verdict = (
            "" if goal is None else f"p99 <= {goal:g} ms: {'met' if p99 <= goal else 'NOT met'}"
        )
        cpu_text = "-" if cpu is None else f"{cpu:.0f}"
        print(
            f"{name:<13}{conc:>5}{n:>6}{rate:>9.1f}{ratio:>7}{p50:>8.2f}{p99:>8.2f}"
            f"{cpu_text:>8}  {verdict}"
        )
    best = max(r[3] for r in rows if r[0] == "notification")
    print()
    print(
        f"best notification throughput / raw durable-create rate: {best / raw_rate:.2f}x "
        f"(goal >= 1.0x: {'met' if best >= raw_rate else 'NOT met'})"
    )
    print(
        "CPU us: the server's own CPU time (user + system) per request.  'empty route' is "
        "the same Site answering {} without\nparsing, spooling or logging: the ceiling this "
        "stack sets on this machine for any acknowledgement."
    )


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve-empty"]:
        serve_empty()
        sys.exit(0)
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
