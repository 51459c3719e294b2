"""What metrics and the admin listener cost the acknowledgements: on beside off.

Two ``twistd dpatia`` subprocesses on one disk, the same config but for ``[admin]
listen``: "off" has none (nothing is counted), "on" has ``tcp:0`` and is scraped
(``GET /metrics``) every second while the load runs, as a harsh Prometheus would.
Rounds of image notifications at concurrency 16 alternate between them (off, on, on,
off, ...), so that drift of the machine (other load, the disk's state) falls on both;
each round waits until every "queued" frame of the round before it was stored at the
fake SPS.  The figure is the median round's throughput, on / off, for ``[server]
processes`` 1 and 2 (with 2, the main process also aggregates the extra front door's
counts).

Goal (issue #12): on >= 0.95x off.

Usage: ``python bench/metrics.py [--requests N] [--rounds R]`` (``make bench`` runs it
after ``bench/ack.py``).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import treq
from twisted.internet import task
from twisted.internet.defer import ensureDeferred
from twisted.web.server import Site

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ack import BASE, SlideRequests, daemon_pids, load, percentile, total_cpu  # noqa: E402

from dpatia_daemon.simulator.daemon_process import DaemonProcess  # noqa: E402
from dpatia_daemon.simulator.fake import FakeSPS  # noqa: E402

ADMIN_LINE = rb"admin listener on http://127\.0\.0\.1:(\d+)/status"


async def main(reactor: Any, args: argparse.Namespace) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="dpatia-bench-metrics-", dir=os.getcwd()))
    fake = FakeSPS()
    token = fake.issue_token()
    port = reactor.listenTCP(0, Site(fake.resource()), interface="127.0.0.1", backlog=256)
    callback = f"http://127.0.0.1:{port.getHost().port}{BASE}"
    notification = SlideRequests(fake, callback, token, app="dpatia")

    async def frames_stored(timeout: float = 120.0) -> None:
        start = time.perf_counter()
        while len(fake.results) < notification.serial:
            if time.perf_counter() - start > timeout:
                raise RuntimeError(
                    f"only {len(fake.results)} of {notification.serial} frames stored"
                )
            await task.deferLater(reactor, 0.05, lambda: None)

    results: list[tuple[int, str, list[float], list[float], list[float | None], int]] = []
    try:
        for processes in args.processes:
            daemons: dict[str, DaemonProcess] = {}
            scrape_urls: dict[str, str] = {}
            for mode in ("off", "on"):
                config = workdir / f"dpatia-{processes}-{mode}.ini"
                config.write_text(
                    f"[server]\nprocesses = {processes}\n"
                    f"[spool]\ndirectory = {workdir / f'spool-{processes}-{mode}'}\n"
                    "[workers]\ncount = 0\n"
                    "[sps]\nallowed_callback_urls = http://127.0.0.1:*/\n"
                    + ("[admin]\nlisten = tcp:0\n" if mode == "on" else "")
                )
                daemon = DaemonProcess(reactor=reactor, config=str(config), cwd=str(workdir))
                await daemon.start()
                daemons[mode] = daemon
                for door in range(1, processes):
                    await daemon.wait_for(b"dpatia front door %d ready" % door, since=0)
                if mode == "on":
                    match = await daemon.wait_for(ADMIN_LINE, since=0)
                    scrape_urls[mode] = f"http://127.0.0.1:{int(match.group(1))}/metrics"
            try:
                rates: dict[str, list[float]] = {"off": [], "on": []}
                p99s: dict[str, list[float]] = {"off": [], "on": []}
                cpus: dict[str, list[float | None]] = {"off": [], "on": []}
                scrapes = 0
                for daemon in daemons.values():  # warm-up, not measured
                    url = daemon.url + "/dpatia/imagenotification"
                    await load(url, [notification() for _ in range(200)], 16, workdir)
                    await frames_stored()
                for round_ in range(args.rounds):
                    order = ("off", "on") if round_ % 2 == 0 else ("on", "off")
                    for mode in order:
                        daemon = daemons[mode]
                        pids = daemon_pids(daemon)
                        bodies = [notification() for _ in range(args.requests)]
                        scraper = None
                        if mode in scrape_urls and args.scrape_every > 0:
                            metrics_url = scrape_urls[mode]

                            async def scrape(url: str = metrics_url) -> None:
                                nonlocal scrapes
                                response = await treq.get(url)
                                await response.content()
                                scrapes += response.code == 200

                            scraper = task.LoopingCall(lambda: ensureDeferred(scrape()))
                            scraper.clock = reactor
                            scraper.start(args.scrape_every, now=False)
                        before = total_cpu(pids)
                        try:
                            url = daemon.url + "/dpatia/imagenotification"
                            rate, lat = await load(url, bodies, 16, workdir)
                        finally:
                            if scraper is not None:
                                scraper.stop()
                        after = total_cpu(pids)
                        rates[mode].append(rate)
                        p99s[mode].append(percentile(lat, 0.99))
                        cpus[mode].append(
                            None
                            if before is None or after is None
                            else (after - before) / len(bodies) * 1e6
                        )
                        await frames_stored()
                text = (await (await treq.get(scrape_urls["on"])).text()) if scrape_urls else ""
                counted = sum(
                    float(m.group(1))
                    for m in re.finditer(r"^dpatia_jobs_accepted_total\{[^}]*\} (\S+)$", text, re.M)
                )
                for mode in ("off", "on"):
                    results.append(
                        (processes, mode, rates[mode], p99s[mode], cpus[mode], int(counted))
                    )
                print(
                    f"processes {processes}: {scrapes} scrapes during the 'on' rounds; the "
                    f"'on' daemon counted {int(counted)} accepted notifications",
                    flush=True,
                )
            finally:
                for daemon in daemons.values():
                    await daemon.kill(signal.SIGTERM)
    finally:
        await port.stopListening()
        shutil.rmtree(workdir, ignore_errors=True)

    print()
    header = (
        f"{'metrics':<9}{'proc':>5}{'rounds':>7}{'n':>6}{'req/s med':>10}{'min':>8}{'max':>8}"
        f"{'p99 ms':>8}{'CPU us':>8}{'x off':>7}  goal"
    )
    print(header)
    print("-" * (len(header) + 16))
    by_key = {(p, mode): (r, q, c) for p, mode, r, q, c, _ in results}
    verdicts = []
    for processes, mode, rate_list, p99_list, cpu_list, _ in results:
        median = statistics.median(rate_list)
        off = statistics.median(by_key[processes, "off"][0])
        ratio = median / off
        known = [c for c in cpu_list if c is not None]
        cpu = f"{statistics.median(known):.0f}" if known else "-"
        goal = ""
        if mode == "on":
            met = ratio >= 0.95
            verdicts.append(met)
            goal = f">= 0.95x off: {'met' if met else 'NOT met'}"
        print(
            f"{mode:<9}{processes:>5}{len(rate_list):>7}{args.requests:>6}{median:>10.1f}"
            f"{min(rate_list):>8.1f}{max(rate_list):>8.1f}{statistics.median(p99_list):>8.2f}"
            f"{cpu:>8}{ratio:>7.2f}  {goal}"
        )
    print()
    for processes in dict.fromkeys(p for p, *_ in results):
        on, off = by_key[processes, "on"], by_key[processes, "off"]
        pairs = [a / b for a, b in zip(on[0], off[0], strict=True)]
        cpu_on = [c for c in on[2] if c is not None]
        cpu_off = [c for c in off[2] if c is not None]
        cpu_ratio = (
            f"{statistics.median(cpu_on) / statistics.median(cpu_off):.2f}x"
            if cpu_on and cpu_off
            else "-"
        )
        print(
            f"processes {processes}: throughput on/off per round {', '.join(f'{r:.2f}' for r in pairs)}"
            f" (median {statistics.median(pairs):.2f}x); CPU per request on/off {cpu_ratio}"
        )
    print()
    print(
        "Image notifications at concurrency 16, rounds alternating between a daemon without\n"
        "an admin listener ('off') and one with it, scraped every second ('on').  req/s "
        "med: the median round;\nCPU us: the daemon's CPU time (all its processes) per "
        "request; x off: on / off median throughput."
    )
    if not all(verdicts):
        print("goal NOT met for some [server] processes value")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="dpatia metrics on/off benchmark")
    parser.add_argument("--requests", type=int, default=1000, help="notifications per round")
    parser.add_argument("--rounds", type=int, default=6, help="rounds per mode")
    parser.add_argument(
        "--scrape-every",
        type=float,
        default=1.0,
        help="seconds between scrapes of the 'on' daemon during its rounds (0: none)",
    )
    parser.add_argument(
        "--processes",
        type=lambda text: [int(x) for x in text.split(",")],
        default=[1, 2],
        help="[server] processes values to measure, comma-separated (default 1,2)",
    )
    task.react(lambda reactor: ensureDeferred(main(reactor, parser.parse_args())))
