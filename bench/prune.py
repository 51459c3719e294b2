"""History retention benchmark: a sweep and a prune over a big spool, and acks beside a prune.

Measures, in one run on one disk (issue #11, item 3):

1. a spool holding ``--history`` done/failed/cancelled records (default 100 000, all
   older than ``[spool] retention_days``) and ``--queued`` queued jobs (default
   10 000), written directly as files in the spool's format (no fsync: this is set-up);
2. the time and peak RSS of one sweep (``SpoolStore.sweep``: temp files, markers,
   recovery, the listing of the queue, as at a daemon's start) and of one whole prune
   (``prune_history``), each in a process of its own so that the RSS is its own;
3. image-notification throughput of a real ``twistd dpatia`` (no workers, as in
   ``bench/ack.py``) on that spool, first with no prune, then while the daemon's own
   retention service prunes the history (``[spool] prune_interval = 1``).

Goal: acks while the prune runs >= 0.9x the acks without it.

Usage: ``python bench/prune.py [--history N] [--queued N] [--requests N] [--workdir DIR]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ack import SlideRequests, load  # noqa: E402  (bench/ack.py: loadgen.py in its own process)
from twisted.internet import task  # noqa: E402
from twisted.internet.defer import ensureDeferred  # noqa: E402
from twisted.web.server import Site  # noqa: E402

from dpatia_daemon.jobs import Callback, Job, JobKind, JobState  # noqa: E402
from dpatia_daemon.simulator.daemon_process import DaemonProcess  # noqa: E402
from dpatia_daemon.simulator.fake import FakeSPS  # noqa: E402

APP = "dpatia"
BASE = "/SectraPathologyServer/external/imageanalysis/v1"
DAY = 86400.0
HERE = Path(__file__).resolve()


def generate(spool: Path, history: int, queued: int) -> float:
    """Write the records (one template, ids substituted); return the seconds it took."""
    start = time.perf_counter()
    for name in (
        "queued",
        "running",
        "done",
        "failed",
        "cancelled",
        "locks",
        "cancel",
        "tmp",
        "corrupt",
    ):
        (spool / name).mkdir(parents=True, exist_ok=True, mode=0o700)
    template = (
        Job(
            slide_id="SLIDE",
            application_id=APP,
            kind=JobKind.NOTIFICATION,
            callback=Callback("http://127.0.0.1:9/sps", ""),
            created=time.time() - 60 * DAY,
            key="K" * 32,
            job_id="J" * 32,
            image_info={"imageSize": {"width": 4000, "height": 3000}},
        )
        .to_json()
        .decode()
    )
    old = time.time() - 40 * DAY
    states = (JobState.DONE, JobState.FAILED, JobState.CANCELLED)
    for n in range(history + queued):
        key, job_id = uuid.uuid4().hex, uuid.uuid4().hex
        text = template.replace("K" * 32, key).replace("J" * 32, job_id).replace("SLIDE", f"s{n}")
        if n < history:
            state = states[n % 3]
            path = spool / state.value / f"{key}.{job_id}.json"
            text = text.replace('"state": "queued"', f'"state": "{state.value}"')
        else:
            path = spool / "queued" / f"{key}.json"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.write(fd, text.encode())
        os.close(fd)
        if n < history:
            os.utime(path, (old, old))
    return time.perf_counter() - start


def phase(spool: Path, name: str) -> dict[str, Any]:
    """Run one phase in a child process: its seconds, peak RSS and what it found."""
    done = subprocess.run(
        [sys.executable, str(HERE), "--phase", name, str(spool)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"phase {name} failed: {done.stderr[-2000:]}")
    return dict(json.loads(done.stdout))


def run_phase(name: str, spool: Path) -> None:
    """The child's side of :func:`phase`: prints one JSON line."""
    from twisted.python.filepath import FilePath

    from dpatia_daemon.spool import SpoolStore
    from dpatia_daemon.spool.retention import prune_history

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    store = SpoolStore(FilePath(str(spool)), owner="bench")
    store.open(time.time())
    start = time.perf_counter()
    if name == "sweep":
        recovered, queued = store.sweep(time.time())
        found = {"queued": len(queued), "recovered": len(recovered)}
    else:
        counts = prune_history(store, time.time() - 30 * DAY)
        assert counts is not None
        found = {"removed": counts.removed, "gone": counts.gone}
    seconds = time.perf_counter() - start
    store.close()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seconds": seconds, "peak_rss_kib": peak, "base_rss_kib": base, **found}))


def vm_hwm(pid: int | None) -> int | None:
    """The peak RSS (KiB) of process ``pid`` so far (Linux), else None."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, TypeError):
        return None
    return None


async def acks(
    reactor: Any, args: argparse.Namespace, workdir: Path, spool: Path
) -> list[dict[str, Any]]:
    fake = FakeSPS()
    token = fake.issue_token()
    port = reactor.listenTCP(0, Site(fake.resource()), interface="127.0.0.1", backlog=256)
    callback = f"http://127.0.0.1:{port.getHost().port}{BASE}"
    bodies = SlideRequests(fake, callback, token).many

    rows: list[dict[str, Any]] = []
    try:
        # Pairs of runs, one without the prune and one beside it, one after the other:
        # the ratio of each pair, so that the machine's drift (other work on it) does
        # not pass for the prune's cost.  The history is written again for each prune.
        for pair in range(args.pairs):
            for pruning in (False, True):
                if pruning and pair:
                    shutil.rmtree(spool)
                    generate(spool, args.history, args.queued)
                rows.append(await one_run(reactor, args, workdir, spool, pruning, bodies))
    finally:
        await port.stopListening()
    return rows


async def one_run(
    reactor: Any, args: argparse.Namespace, workdir: Path, spool: Path, pruning: bool, bodies: Any
) -> dict[str, Any]:
    """One daemon on ``spool``: its ack rate, with its retention pruning or not."""
    config = workdir / "dpatia.ini"
    config.write_text(
        f"[spool]\ndirectory = {spool}\nretention_days = 30\n"
        f"prune_interval = {1 if pruning else 86400}\n"
        "[workers]\ncount = 0\n"
        "[sps]\nallowed_callback_urls = http://127.0.0.1:*/\n"
    )
    daemon = DaemonProcess(reactor=reactor, config=str(config), cwd=str(workdir))
    await daemon.start(timeout=120)
    try:
        notify = daemon.url + "/dpatia/imagenotification"
        await load(notify, bodies(200), 16, workdir)  # warm up
        if pruning:
            await daemon.wait_for(rb"pruning history records", timeout=60, since=0)
        mark = len(daemon.output)
        rate, _ = await load(notify, bodies(args.requests), 16, workdir)
        overlapped = None
        prune_seconds = None
        if pruning:
            # Still pruning when the load ended? (else the figure is not "beside").
            overlapped = b"pruned " not in bytes(daemon.output[mark:])
            started = time.perf_counter()
            await daemon.wait_for(rb"pruned \d+ history records", timeout=900, since=0)
            prune_seconds = time.perf_counter() - started
        return {
            "pruning": pruning,
            "rate": rate,
            "overlapped": overlapped,
            "prune_left_s": prune_seconds,
            "hwm_kib": vm_hwm(daemon.pid),
        }
    finally:
        await daemon.kill(signal.SIGTERM)
        await task.deferLater(reactor, 0.2, lambda: None)


async def main(reactor: Any, args: argparse.Namespace) -> None:
    keep = bool(args.workdir)
    workdir = (
        Path(args.workdir)
        if keep
        else Path(tempfile.mkdtemp(prefix="dpatia-prune-", dir=os.getcwd()))
    )
    workdir.mkdir(parents=True, exist_ok=True)
    spool = workdir / "spool"
    try:
        made = generate(spool, args.history, args.queued)
        sweep = phase(spool, "sweep")
        prune = phase(spool, "prune")
        # The history again, for the acks beside the daemon's own prune.
        shutil.rmtree(spool)
        generate(spool, args.history, args.queued)
        rows = await acks(reactor, args, workdir, spool)
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)

    print()
    print(
        f"spool: {args.history} history records (all older than retention_days) and "
        f"{args.queued} queued jobs, written in {made:.1f} s"
    )
    print()
    print(f"{'operation':<10}{'seconds':>9}{'peak RSS MiB':>14}  found")
    print("-" * 60)
    for name, r in (("sweep", sweep), ("prune", prune)):
        found = {k: v for k, v in r.items() if k not in ("seconds", "peak_rss_kib", "base_rss_kib")}
        print(f"{name:<10}{r['seconds']:>9.2f}{r['peak_rss_kib'] / 1024:>14.1f}  {found}")
    print(
        f"(peak RSS of the whole process, interpreter and imports included: "
        f"{sweep['base_rss_kib'] / 1024:.1f} MiB before the store was opened)"
    )
    print()
    ratios = []
    print(f"{'acks (conc 16)':<24}{'req/s':>9}{'ratio':>8}{'daemon peak RSS MiB':>21}")
    print("-" * 62)
    for pair in range(args.pairs):
        base, pruned = rows[2 * pair], rows[2 * pair + 1]
        ratios.append(pruned["rate"] / base["rate"])
        for label, r in (
            (f"{pair + 1}: no prune", base),
            (f"{pair + 1}: beside the prune", pruned),
        ):
            hwm = "-" if r["hwm_kib"] is None else f"{r['hwm_kib'] / 1024:.1f}"
            ratio = f"{ratios[-1]:.2f}x" if r["pruning"] else ""
            print(f"{label:<24}{r['rate']:>9.1f}{ratio:>8}{hwm:>21}")
    ratio = sorted(ratios)[len(ratios) // 2]
    print()
    print(
        f"acks beside the prune / without, median of {args.pairs} pairs: {ratio:.2f}x (goal >= 0.9x: "
        f"{'met' if ratio >= 0.9 else 'NOT met'})"
    )
    for r in rows[1::2]:
        print(
            f"  the prune was {'still running' if r['overlapped'] else 'OVER'} when the load "
            f"ended, and finished {r['prune_left_s']:.1f} s after it"
        )
    print(f"({args.requests} notifications per measurement, concurrency 16, [workers] count = 0)")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--phase":
        run_phase(sys.argv[2], Path(sys.argv[3]))
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--history", type=int, default=100_000)
    parser.add_argument("--queued", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--pairs", type=int, default=3, help="runs without/with the prune")
    parser.add_argument("--workdir", help="keep the files here (default: a temp dir, removed)")
    options = parser.parse_args()
    task.react(lambda reactor: ensureDeferred(main(reactor, options)))
