"""Backlog benchmark: does a large queue slow the daemon down?

For each queue size (0, 10 000 and 100 000 queued jobs by default; ``--sizes`` adds
1 000 000, for time and RSS only), in one run on one disk:

1. the spool is filled by a documented *fast fill* (:func:`fast_fill`): the daemon's own
   :class:`~dpatia_daemon.spool.SpoolStore` writing queued notification records (and
   their index entries) in batches, with fsync turned off — the records are what the
   front door would have written, only faster to make;
2. a real ``twistd dpatia`` (one worker running the ``demo`` analysis with 10-minute
   steps, so that dispatched jobs stay running) is started on that spool, and we take
   the time from spawning it to its "dpatia ready" line, and from "ready" to its first
   claim ("job ... claimed by", the first dispatch); the worker's own start-up (a
   Python process importing the analysis) is reported beside it, as the floor;
3. the main process's RSS (``VmRSS``) after the first dispatch and after the load;
4. image notifications at concurrency 16 (``bench/loadgen.py``), whose rate is
   compared with the same run's rate on the empty spool.

Goals (issue 15): with 100 000 queued, start to ready and to first dispatch <= 2 s,
main-process RSS <= 2x the empty spool's, acks at c=16 >= 0.9x the empty spool's.

``--outage N`` adds a row for memory per *waiting* job: N queued jobs whose SPS refuses
connections (a closed loopback port).  The first job's SPS call fails, the SPS is
marked failing, and the dispatcher walks the whole queue into its waiting room (a note
per job, not the job).  Reported: the time from "ready" to the dispatcher's "walked the
queue" line (the first job's failing SPS calls, about 5 s of retries, included), the CPU
the main process spent meanwhile, and its RSS then, against the empty spool's.

Usage: ``python bench/backlog.py [--sizes 0,10000,100000] [--requests 2000]``.
Run it on the disk the spool would live on (``--workdir``; the default is a temp dir
in the current directory).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from twisted.internet import task
from twisted.internet.defer import ensureDeferred
from twisted.python.filepath import FilePath
from twisted.web.server import Site

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ack import SlideRequests, load, percentile  # noqa: E402

from dpatia_daemon.jobs import Callback, Job, JobKind  # noqa: E402
from dpatia_daemon.simulator.daemon_process import DaemonProcess  # noqa: E402
from dpatia_daemon.simulator.fake import FakeSPS  # noqa: E402
from dpatia_daemon.spool import SpoolStore  # noqa: E402

APP = "dpatia"
BASE = "/SectraPathologyServer/external/imageanalysis/v1"


def fast_fill(directory: Path, count: int, callback: str, token: str) -> float:
    """Queue ``count`` notification jobs (slides ``backlog-N``, oldest first) through
    the spool's own store, fsync off; return the seconds it took."""
    store = SpoolStore(FilePath(str(directory)), owner="bench-fill", fsync=lambda fd: None)
    store.open()
    start = time.perf_counter()
    base = time.time() - count * 0.001 - 60
    try:
        for first in range(0, count, 1000):
            jobs = [
                Job(
                    slide_id=f"backlog-{n:07d}",
                    application_id=APP,
                    kind=JobKind.NOTIFICATION,
                    callback=Callback(callback, token),
                    created=base + n * 0.001,
                    image_info={"imageSize": {"width": 4000, "height": 3000}},
                )
                for n in range(first, min(count, first + 1000))
            ]
            store.commit_batch(jobs, store.write_temps(jobs))
    finally:
        store.close()
    return time.perf_counter() - start


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU seconds of process ``pid`` (Linux), else None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, TypeError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int | None) -> int | None:
    """The resident set of process ``pid`` in KiB (Linux), else None."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, TypeError):
        return None
    return None


async def main(reactor: Any, args: argparse.Namespace) -> None:
    keep = bool(args.workdir)
    workdir = (
        Path(args.workdir)
        if keep
        else Path(tempfile.mkdtemp(prefix="dpatia-backlog-", dir=os.getcwd()))
    )
    workdir.mkdir(parents=True, exist_ok=True)
    fake = FakeSPS()
    token = fake.issue_token()
    port = reactor.listenTCP(0, Site(fake.resource()), interface="127.0.0.1", backlog=256)
    callback = f"http://127.0.0.1:{port.getHost().port}{BASE}"
    for n in range(50):  # the first backlog jobs to run find their slide
        fake.add_slide(f"backlog-{n:07d}")
    body = SlideRequests(fake, callback, token)

    # A port that refuses connections: listened on, then closed (the outage row's SPS).
    closed = reactor.listenTCP(0, Site(fake.resource()), interface="127.0.0.1")
    dead = f"http://127.0.0.1:{closed.getHost().port}{BASE}"
    await closed.stopListening()

    rows: list[dict[str, Any]] = []
    runs = [(size, False) for size in args.sizes]
    if args.outage:
        runs.append((args.outage, True))
    try:
        for size, outage in runs:
            spool = workdir / f"spool-{size}{'-outage' if outage else ''}"
            fill = fast_fill(spool, size, dead if outage else callback, token) if size else 0.0
            config = workdir / f"dpatia-{size}.ini"
            config.write_text(
                "[app]\nanalysis = demo\n[demo]\nstep_seconds = 600\n"
                f"[spool]\ndirectory = {spool}\n"
                f"[workers]\ncount = 1\nwork_directory = {workdir / f'work-{size}'}\n"
                "[sps]\nallowed_callback_urls = http://127.0.0.1:*/\n"
            )
            daemon = DaemonProcess(reactor=reactor, config=str(config), cwd=str(workdir))
            spawned = time.perf_counter()
            await daemon.start(timeout=600.0)
            ready, ready_cpu = time.perf_counter(), cpu_seconds(daemon.pid) or 0.0
            row: dict[str, Any] = {
                "size": size,
                "fill": fill,
                "ready": ready - spawned,
                "outage": outage,
            }
            try:
                worker = await daemon.wait_for(rb"worker 1\.\d+ ready", 600, since=0)
                row["worker"] = time.perf_counter() - ready
                del worker
                if size:
                    await daemon.wait_for(rb"job \w+ claimed by", 600, since=0)
                    row["dispatch"] = time.perf_counter() - ready
                row["rss_start"] = rss_kib(daemon.pid)
                if outage:
                    # The dispatcher's line at the end of its walk into the waiting room.
                    await daemon.wait_for(rb"walked the queue: \d+ queued jobs wait", 900, since=0)
                    row["walk"] = time.perf_counter() - ready
                    row["walk_cpu"] = (cpu_seconds(daemon.pid) or 0.0) - ready_cpu
                    row["rss_start"] = rss_kib(daemon.pid)
                elif size <= args.max_load_size:
                    notify = daemon.url + "/dpatia/imagenotification"
                    await load(notify, [body() for _ in range(100)], 8, workdir)
                    rate, lat = await load(
                        notify, [body() for _ in range(args.requests)], 16, workdir
                    )
                    row["rate"], row["p99"] = rate, percentile(lat, 0.99)
                row["rss_end"] = rss_kib(daemon.pid)
                if size == 0:
                    # The empty spool's first dispatch: the first notification's job.
                    match = re.search(rb"job \w+ claimed by", bytes(daemon.output))
                    row["dispatch"] = None if match is None else 0.0
            finally:
                await daemon.kill(signal.SIGTERM)
            rows.append(row)
            if not keep:
                shutil.rmtree(spool, ignore_errors=True)
    finally:
        await port.stopListening()
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)

    empty = next((r for r in rows if r["size"] == 0 and not r["outage"]), None)

    def ratio(row: dict[str, Any], name: str) -> str:
        if empty is None or row.get(name) is None or not empty.get(name):
            return "-"
        return f"{row[name] / empty[name]:.2f}x"

    print()
    header = (
        f"{'queued':>9}{'fill s':>8}{'ready s':>9}{'worker s':>9}{'1st disp s':>11}"
        f"{'RSS MiB':>9}{'x empty':>8}{'RSS end':>9}{'acks/s':>9}{'x empty':>8}{'p99 ms':>8}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        if r["outage"]:
            continue
        disp = "-" if r.get("dispatch") is None else f"{r['dispatch']:.2f}"
        rss = r.get("rss_start") or 0
        rss_end = r.get("rss_end") or 0
        rate = "-" if r.get("rate") is None else f"{r['rate']:.0f}"
        p99 = "-" if r.get("p99") is None else f"{r['p99']:.1f}"
        print(
            f"{r['size']:>9}{r['fill']:>8.1f}{r['ready']:>9.2f}{r['worker']:>9.2f}{disp:>11}"
            f"{rss / 1024:>9.1f}{ratio(r, 'rss_start'):>8}{rss_end / 1024:>9.1f}"
            f"{rate:>9}{ratio(r, 'rate'):>8}{p99:>8}"
        )
    print()
    print(
        "ready s: spawn to 'dpatia ready'.  worker s: 'ready' to the first worker's "
        "'ready' (a Python process starting:\nno dispatch can be earlier).  1st disp s: "
        "'ready' to the first claim.  RSS: the main process after the\nfirst dispatch "
        "(x empty: against the empty spool's) and after the load.  acks/s: image "
        f"notifications at\nconcurrency 16 ({args.requests} requests; x empty: against "
        "the empty spool in this run).\nGoals with 100 000 queued: ready and 1st dispatch "
        "<= 2 s, RSS <= 2x empty, acks >= 0.9x empty."
    )
    for r in rows:
        if not r["outage"]:
            continue
        print(
            f"\nOutage: {r['size']} queued for an SPS that refuses connections.  From 'ready' "
            f"to 'walked the queue' (the first job failing,\nthe walk into the waiting room): {r['walk']:.2f} s, "
            f"{r['walk_cpu']:.2f} s of CPU; RSS then {(r['rss_start'] or 0) / 1024:.1f} MiB "
            f"({ratio(r, 'rss_start')} the empty spool's)."
        )
    for r in rows:
        if r["size"] < 100_000 or r["outage"]:
            continue
        verdicts = [
            ("ready <= 2 s", r["ready"] <= 2.0),
            ("1st dispatch <= 2 s", r.get("dispatch") is not None and r["dispatch"] <= 2.0),
        ]
        if empty is not None and empty.get("rss_start") and r.get("rss_start"):
            verdicts.append(("RSS <= 2x", r["rss_start"] <= 2 * empty["rss_start"]))
        if empty is not None and empty.get("rate") and r.get("rate"):
            verdicts.append(("acks >= 0.9x", r["rate"] >= 0.9 * empty["rate"]))
        text = ", ".join(f"{name}: {'met' if ok else 'NOT met'}" for name, ok in verdicts)
        print(f"{r['size']} queued: {text}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="dpatia backlog benchmark")
    parser.add_argument(
        "--sizes",
        type=lambda text: [int(x) for x in text.split(",")],
        default=[0, 10_000, 100_000],
        help="queue sizes, comma-separated (default 0,10000,100000; 0 is the baseline)",
    )
    parser.add_argument("--requests", type=int, default=2000, help="notifications at c=16")
    parser.add_argument(
        "--max-load-size",
        type=int,
        default=100_000,
        help="no ack load above this queue size (1 000 000: time and RSS only)",
    )
    parser.add_argument(
        "--outage",
        type=int,
        default=0,
        help="also N queued jobs whose SPS refuses connections: memory per waiting job",
    )
    parser.add_argument("--workdir", help="keep the run's files here (default: a temp dir)")
    task.react(lambda reactor: ensureDeferred(main(reactor, parser.parse_args())))
