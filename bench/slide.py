"""End-to-end cost of a slide: from the notification to the final result, per step.

For each slide format (generic TIFF, Aperio SVS, DICOM series) and each analysis
(``tissue``, ``nuclei``), in one run on one disk:

1. **One slide, end to end, in rounds.**  The SPS simulator's slides are served by
   the simulator (its fake SPS, tile server and file streaming) in this process on
   loopback; a real ``twistd dpatia`` (one worker) gets an image notification and runs
   the pipeline and the analysis.  After a first, warming job of the same files (steady
   state, as the baselines), ``--rounds N`` (3) timed jobs, each on a new slide id of
   the same files (nothing reused) and each followed by its own baselines (below), so
   that a drift of the machine's speed over the minutes of a row weighs on the job and
   its baselines alike.  Reported per step, from the simulator's side (when each
   request arrived) and the daemon's log lines (when each was printed): metadata (info
   → first tile), thumbnail (tiles → label), label (→ files request), download (→
   "slide downloaded"), analysis ("analysis started" → "analysis done"), store (→
   "result stored"), and the total from the notification.  Peak RSS (``VmHWM`` in
   ``/proc/PID/status``, reset before the first round) of the daemon (growth over its
   RSS before the first round) and of the worker (its peak over the rounds so far).
   Beside the store: the simulator's own time over the final PUT (``sps_put``, the
   SPS's share of it, parsing and answering the result in this process).
   Each round is a line; then the rounds' median (the overhead's is the median of the
   rounds' overheads), on which the goals are checked.
2. **Baselines, same slide, same disk, after each timed job.**  The same download as a
   raw HTTP copy: a process of its own (``python -c``, urllib, 1 MiB reads, fsynced,
   timed from the request to the fsync), as the daemon's worker is one, so that it
   does not fight the simulator's reactor thread for this process's GIL; written into
   the row's daemon folder (the disk of its work folder), in the page-cache state of
   the job just timed; the best of two copies.  The same analysis alone on the
   slide's files, in one process of its own (started and warmed by a first run once
   per row, then one timed run per round).
   dpatia's overhead = total − raw copy − analysis alone.  Each row also prints the
   daemon's download beside the raw copy and the analysis in the worker (which
   includes writing its result) beside the analysis alone, so the gaps show, and the
   CPU seconds and minor page faults of each (the worker's from ``/proc``, between its
   "analysis started" and "analysis done" lines): equal CPU with a longer wall time
   means the worker waited (for the cores), not that it did more.
3. **Throughput.**  ``--throughput N`` slides (8) notified at once through 1 and 2
   workers (``[nuclei] cpu_threads = 1``, so each worker uses one core): slides per
   hour, the ratio 2 workers / 1 worker, against the tighter of two limits measured
   here: the disk's durable write rate (``dd conv=fsync``) for the downloads, and the
   analysis alone on both cores (two processes at once).

Goals (issue 14), on a 2-core machine in the same run: overhead ≤ 5 % of the total
for nuclei and ≤ 2 s for tissue; daemon RSS growth ≤ 64 MiB; worker RSS bounded
whatever the slide size; 2 workers ≥ 90 % of the tighter limit.

Usage: ``python bench/slide.py [--size full|WxH] [--formats tiff,svs,dicom]
[--analyses tissue,nuclei] [--rounds 3] [--throughput 8] [--throughput-analysis nuclei]
[--workdir DIR]``.  ``--size full`` uses (and the first time generates, for minutes)
the 100 000 × 80 000 px slides of ``python -m dpatia_daemon.simulator generate
--scale full``; ``WxH`` generates smaller ones of the same kind (cached too).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import attrs
from twisted.internet import task
from twisted.internet.defer import ensureDeferred
from twisted.internet.threads import deferToThread
from twisted.web.server import Request, Site

from dpatia_daemon.simulator.daemon_process import DaemonProcess
from dpatia_daemon.simulator.large import default_cache, full_specs
from dpatia_daemon.simulator.server import Simulator
from dpatia_daemon.simulator.slides import SlideSet, default_specs, load_or_generate

APP = "dpatia"
BASE = "/SectraPathologyServer/external/imageanalysis/v1"
MiB = 2**20


def slide_set(size: str) -> SlideSet:
    """The full-size set, or one of the same kind at ``WxH``."""
    specs = full_specs(default_specs())
    if size == "full":
        return load_or_generate(default_cache(), specs)
    width, height = (int(v) for v in size.lower().split("x"))
    specs = [attrs.evolve(s, width=width, height=height) for s in specs]
    return load_or_generate(default_cache().parent / f"bench-{width}x{height}", specs)


class TimedRequest(Request):
    """Records when each request to the simulator arrived, and how long the simulator
    took over each PUT of a result (the SPS's own share of the store)."""

    arrivals: list[tuple[float, str]] = []
    puts: list[float] = []

    def process(self) -> None:
        start = time.perf_counter()
        TimedRequest.arrivals.append((start, self.path.decode("latin-1")))
        super().process()  # the simulator's routes answer synchronously
        if self.method == b"PUT" and b"/results/" in self.path:
            TimedRequest.puts.append(time.perf_counter() - start)


def status(pid: int, field: str) -> int:
    """A ``/proc/PID/status`` field in bytes (0 if the process is gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    return int(match.group(1)) * 1024 if match else 0


def cpu_and_faults(pids: list[int]) -> tuple[float, int]:
    """CPU seconds (user + system) and minor page faults of ``pids``, summed."""
    tick = os.sysconf("SC_CLK_TCK")
    cpu, faults = 0.0, 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        faults += int(fields[7])  # minflt (field 10 of stat; 3 is the first after ")")
        cpu += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return cpu, faults


def reset_peak(pid: int) -> None:
    """Reset the peak RSS (``VmHWM``) of ``pid`` to its current RSS (Linux's
    ``clear_refs`` 5), so that a later peak is the peak since now."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def children(pid: int) -> list[int]:
    """The direct children of ``pid`` (the workers of the daemon)."""
    found = []
    for task_dir in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task_dir / "children").read_text().split()]
        except OSError:
            pass
    return found


def durable_write_rate(directory: Path, size: int) -> float:
    """MB/s of ``dd conv=fsync`` writing ``size`` bytes (the download's disk ceiling)."""
    target = directory / "dd.bin"
    start = time.perf_counter()
    subprocess.run(
        ["dd", "if=/dev/zero", f"of={target}", "bs=4M", f"count={max(1, size // (4 * MiB))}",
         "conv=fsync", "status=none"],
        check=True,
    )
    seconds = time.perf_counter() - start
    target.unlink()
    return size / seconds / 1e6


RAW_COPY = """
import os, sys, time, urllib.request
url, token, target = sys.argv[1:4]
start = time.perf_counter()
request = urllib.request.Request(url, headers={"Authorization": "Bearer " + token})
with urllib.request.urlopen(request) as answer, open(target, "wb") as out:
    while chunk := answer.read(1 << 20):
        out.write(chunk)
    out.flush()
    os.fsync(out.fileno())
print(time.perf_counter() - start)
os.unlink(target)
"""


def raw_copy(url: str, token: str, target: Path) -> float:
    """Seconds to copy ``url`` to ``target`` as raw bytes (1 MiB reads), fsynced, in a
    process of its own (blocking: run it in a thread).

    Its own process, as the daemon's worker is: a copy in a thread of this process
    would fight for the GIL with the reactor thread that serves the file.  Timed from
    the request to the fsync, without the interpreter's start."""
    answer = subprocess.run(
        [sys.executable, "-c", RAW_COPY, url, token, str(target)],
        check=True, stdout=subprocess.PIPE,
    )
    return float(answer.stdout.decode().split()[-1])


ALONE = """
import json, resource, sys, time
from dpatia_daemon.analyses import AnalysisJob
from dpatia_daemon.analyses.loader import load_analysis
spec, files, info, settings = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), json.loads(sys.argv[4])
analysis = load_analysis(spec)
job = AnalysisJob(job_id="alone", slide_id="alone", input={"type": "wholeSlide"},
                  work_dir="/tmp", slide_info=info, files=tuple(files), settings=settings)
analysis(job)  # warm: imports done, files in the page cache, as for a worker's later jobs
print("ready", flush=True)
for line in sys.stdin:  # one timed run per line
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    analysis(job)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"seconds": seconds, "rss": after.ru_maxrss * 1024,
                      "cpu": after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime,
                      "faults": after.ru_minflt - before.ru_minflt}), flush=True)
"""


@attrs.frozen
class AloneRun:
    """One run of :class:`Alone`: the seconds in each process, the largest peak RSS
    among them, and their CPU seconds and minor page faults, summed."""

    seconds: list[float]
    rss: int
    cpu: float
    faults: int


class Alone:
    """The analysis alone on the slide's files, in ``copies`` processes of their own,
    warmed by a first run at the start; :meth:`run` times one more run in each at once
    (blocking: call it in a thread), as often as the rounds need, so that the
    baseline is taken beside each timed job, not once before or after them all."""

    def __init__(self, spec: str, files: list[str], info: dict[str, Any],
                 settings: dict[str, str], copies: int = 1) -> None:
        self.procs = [
            subprocess.Popen(
                [sys.executable, "-c", ALONE, spec, json.dumps(files), json.dumps(info),
                 json.dumps(settings)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            )
            for _ in range(copies)
        ]
        for proc in self.procs:
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError("the analysis alone did not start")

    def run(self) -> AloneRun:
        """One warm run in each process, all at once."""
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.write("run\n")
            proc.stdin.flush()
        outs = []
        for proc in self.procs:
            assert proc.stdout is not None
            outs.append(json.loads(proc.stdout.readline()))
        return AloneRun(
            seconds=[o["seconds"] for o in outs], rss=max(o["rss"] for o in outs),
            cpu=sum(o["cpu"] for o in outs), faults=sum(o["faults"] for o in outs),
        )

    def close(self) -> None:
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.close()
            proc.wait()


def alias(fake: Any, slide_id: str, suffix: str) -> str:
    """A new slide id for the simulator's slide ``slide_id`` (the same files), so that
    each job is a new slide's: nothing reused from an earlier job's result."""
    new = f"{slide_id}-{suffix}"
    base = fake.slides[slide_id]
    fake.slides[new] = attrs.evolve(base, slide_id=new, info=dict(base.info, id=new))
    return new


def median_row(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The rounds' medians, column by column (the overhead's is the median of the
    rounds' own overheads, each against the baselines taken right after its job);
    the largest RSS figures."""
    row: dict[str, Any] = dict(rounds[0], round="median")
    for key, value in rounds[0].items():
        if isinstance(value, float) and key != "MiB":
            values = [r[key] for r in rounds]
            row[key] = max(values) if key.endswith("_MiB") else statistics.median(values)
    return row


def first(arrivals: list[tuple[float, str]], fragment: str) -> float:
    """When the first request whose path holds ``fragment`` arrived."""
    return min(t for t, p in arrivals if fragment in p)


def write_config(path: Path, workdir: Path, analysis: str, workers: int, threads: int) -> None:
    path.write_text(
        f"[app]\nanalysis = {analysis}\n"
        f"[spool]\ndirectory = {workdir / 'spool'}\n"
        f"[workers]\ncount = {workers}\nwork_directory = {workdir / 'work'}\n"
        "job_timeout = 36000\nprogress_interval = 2\n"
        "[sps]\nallowed_callback_urls = http://127.0.0.1:*/\n"
        "[pipeline]\ndownload_wsi = true\n"
        f"[nuclei]\ncpu_threads = {threads}\n"
    )


async def main(reactor: Any, args: argparse.Namespace) -> None:
    """The run, in ``--workdir`` (kept) or a temporary folder (removed at the end: the
    downloads of full-size slides are many GB)."""
    if args.workdir:
        workdir = Path(args.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        await _run(reactor, args, workdir)
        return
    workdir = Path(tempfile.mkdtemp(prefix="dpatia-bench-slide-", dir=os.getcwd()))
    try:
        await _run(reactor, args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


async def _run(reactor: Any, args: argparse.Namespace, workdir: Path) -> None:
    print(f"slides: {args.size} (generating or reusing) ...", flush=True)
    slides = await deferToThread(slide_set, args.size)
    simulator = Simulator.create(reactor)
    simulator.load(slides)
    fake = simulator.sps
    token = fake.issue_token()
    site = Site(simulator.resource())
    site.requestFactory = TimedRequest  # type: ignore[assignment]
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    callback = f"http://127.0.0.1:{port.getHost().port}{BASE}"
    serial = [0]

    async def notify(daemon: DaemonProcess, slide_id: str) -> None:
        serial[0] += 1
        body = {
            "action": "newImageFiles", "applicationId": APP, "slideId": slide_id,
            "callbackInfo": {"url": callback, "token": token},
            "cancellationToken": f"ct-{serial[0]}", "context": {},
            "imageInfo": fake.slides[slide_id].info,
        }
        data = json.dumps(body).encode()

        def post() -> None:
            request = urllib.request.Request(
                daemon.url + "/dpatia/imagenotification", data=data,
                headers={"Content-Type": "application/json"},
            )
            urllib.request.urlopen(request).read()

        await deferToThread(post)

    async def start_daemon(analysis: str, workers: int, threads: int, name: str) -> DaemonProcess:
        folder = workdir / name
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        config = folder / "dpatia.ini"
        write_config(config, folder, analysis, workers, threads)
        daemon = DaemonProcess(reactor=reactor, config=str(config), cwd=str(folder))
        await daemon.start(timeout=120)
        while len(re.findall(rb"spawned", bytes(daemon.output))) < workers:
            await task.deferLater(reactor, 0.1, lambda: None)
        await task.deferLater(reactor, 1.0, lambda: None)  # let the workers import
        return daemon

    rows = []
    for fmt in args.formats if args.rounds else []:  # --rounds 0: the throughput only
        slide = next(s for s in slides.slides if s.slide_id == f"full-{fmt}-1")
        files = [str(slides.path(p)) for _, p in slide.files]
        size = sum(os.path.getsize(f) for f in files)
        for analysis in args.analyses:
            name = f"{fmt}-{analysis}"
            settings = {"cpu_threads": "2"} if analysis == "nuclei" else {}
            daemon = await start_daemon(analysis, 1, 2, name)
            alone: Alone | None = None
            rounds = []
            try:
                pid = daemon.pid
                assert pid is not None
                # A first job (the same files under another id) warms the worker, as
                # the analysis alone is warmed: only steady-state costs are compared.
                mark = len(daemon.output)
                await notify(daemon, alias(fake, slide.slide_id, "warm"))
                await daemon.wait_for(rb"result \d+ stored", since=mark, timeout=36000)
                alone = await deferToThread(Alone, analysis, files, slide.info, settings)
                rss_before = status(pid, "VmRSS")
                # The peaks from here on: the warm-up job's are not the rounds'.
                for process in (pid, *children(pid)):
                    reset_peak(process)
                for number in range(1, args.rounds + 1):
                    # Each round: a timed job (a new slide id, so nothing is reused),
                    # then the baselines right after it, in its page-cache state.
                    slide_id = alias(fake, slide.slide_id, f"r{number}")
                    mark = len(daemon.output)
                    TimedRequest.arrivals.clear()
                    TimedRequest.puts.clear()
                    t0 = time.perf_counter()
                    await notify(daemon, slide_id)
                    events = {}
                    usage: dict[str, tuple[float, int]] = {}
                    for event, pattern in (
                        ("downloaded", rb"slide downloaded"),
                        ("started", rb"analysis started"),
                        ("done", rb"analysis done"),
                        ("stored", rb"result \d+ stored"),
                    ):
                        await daemon.wait_for(pattern, since=mark, timeout=36000)
                        events[event] = time.perf_counter()
                        if event in ("started", "done"):
                            usage[event] = cpu_and_faults(children(pid))
                    worker_rss = max((status(w, "VmHWM") for w in children(pid)), default=0)
                    daemon_hwm = status(pid, "VmHWM")
                    info_at, tile_at, label_at, files_at = (
                        first(TimedRequest.arrivals, fragment)
                        for fragment in (f"/slides/{slide_id}/info", "/images/", "/label",
                                         "/files")
                    )
                    sps_put = TimedRequest.puts[-1] if TimedRequest.puts else 0.0
                    # The best of two raw copies, beside the daemon's work folder.
                    raw = min([
                        await deferToThread(
                            raw_copy, f"{callback}/slides/{slide_id}/files", token,
                            workdir / name / "raw.bin",
                        )
                        for _ in range(2)
                    ])
                    baseline = await deferToThread(alone.run)
                    (alone_s,) = baseline.seconds
                    total = events["stored"] - t0
                    rounds.append({
                        "format": fmt, "analysis": analysis, "round": str(number),
                        "MiB": size / MiB,
                        "metadata": tile_at - info_at, "thumbnail": label_at - tile_at,
                        "label": files_at - label_at,
                        "download": events["downloaded"] - files_at,
                        "analysis_s": events["done"] - events["started"],
                        "store": events["stored"] - events["done"],
                        "sps_put": sps_put, "total": total,
                        "raw_copy": raw, "alone": alone_s, "overhead": total - raw - alone_s,
                        # CPU seconds and minor faults over the analysis, in the worker
                        # (from its log lines) and alone: extra work, or waiting?
                        "analysis_cpu": usage["done"][0] - usage["started"][0],
                        "alone_cpu": baseline.cpu,
                        "analysis_kfaults": (usage["done"][1] - usage["started"][1]) / 1e3,
                        "alone_kfaults": baseline.faults / 1e3,
                        # Growth over every round so far, from before the first.
                        "daemon_growth_MiB": (daemon_hwm - rss_before) / MiB,
                        "worker_MiB": worker_rss / MiB, "alone_MiB": baseline.rss / MiB,
                    })
                    print_row(rounds[-1])
            finally:
                await daemon.kill()
                if alone is not None:
                    await deferToThread(alone.close)
            rows += rounds
            if len(rounds) > 1:
                rows.append(median_row(rounds))

    if rows:
        print_table(rows)
    if args.throughput:
        await throughput(args, slides, fake, start_daemon, notify, workdir)
    await port.stopListening()


async def throughput(args: Any, slides: SlideSet, fake: Any, start_daemon: Any, notify: Any,
                     workdir: Path) -> None:
    """``args.throughput`` copies of the first format's slide through 1 and 2 workers."""
    from twisted.internet import reactor

    fmt, analysis, n = args.formats[0], args.throughput_analysis, args.throughput
    slide = next(s for s in slides.slides if s.slide_id == f"full-{fmt}-1")
    files = [str(slides.path(p)) for _, p in slide.files]
    size = sum(os.path.getsize(f) for f in files)
    rates = {}
    for workers in (1, 2):
        ids = [alias(fake, slide.slide_id, f"w{workers}-{i}") for i in range(n)]
        daemon = await start_daemon(analysis, workers, 1, f"throughput-{workers}")
        try:
            mark = len(daemon.output)
            t0 = time.perf_counter()
            for slide_id in ids:
                await notify(daemon, slide_id)
            while len(re.findall(rb"result \d+ stored", bytes(daemon.output[mark:]))) < n:
                await task.deferLater(reactor, 0.2, lambda: None)
            rates[workers] = n * 3600 / (time.perf_counter() - t0)
        finally:
            await daemon.kill()
    disk = durable_write_rate(workdir, size)
    disk_rate = disk * 1e6 / size * 3600
    settings = {"cpu_threads": "1"} if analysis == "nuclei" else {}
    pair = await deferToThread(Alone, analysis, files, slide.info, settings, 2)
    try:
        both = (await deferToThread(pair.run)).seconds
    finally:
        await deferToThread(pair.close)
    cores_rate = sum(3600 / seconds for seconds in both)  # the two ran at the same time
    limit = min(disk_rate, cores_rate)
    print(f"\nthroughput: {n} x {fmt} / {analysis}, {size / MiB:.0f} MiB each")
    print(f"  1 worker : {rates[1]:8.1f} slides/h")
    print(f"  2 workers: {rates[2]:8.1f} slides/h   (x{rates[2] / rates[1]:.2f} of 1 worker)")
    print(f"  disk durable write {disk:.0f} MB/s = {disk_rate:.0f} slides/h; analysis alone "
          f"on both cores = {cores_rate:.1f} slides/h")
    print(f"  2 workers / tighter limit = {rates[2] / limit:.2f} (goal >= 0.90)")


COLUMNS = ("format", "analysis", "round", "MiB", "metadata", "thumbnail", "label", "download",
           "raw_copy", "analysis_s", "alone", "store", "sps_put", "total", "overhead",
           "daemon_growth_MiB", "worker_MiB", "alone_MiB", "analysis_cpu", "alone_cpu",
           "analysis_kfaults", "alone_kfaults")


def print_row(row: dict[str, Any]) -> None:
    print("  " + "  ".join(
        f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
    ), flush=True)


def print_table(rows: list[dict[str, Any]]) -> None:
    print("\n" + " | ".join(COLUMNS))
    for row in rows:
        print(" | ".join(
            f"{row[c]:.2f}" if isinstance(row[c], float) else str(row[c]) for c in COLUMNS
        ))
    # The goals are checked on each row's median of rounds (or its one round).
    medians = {(r["format"], r["analysis"]) for r in rows if r["round"] == "median"}
    for row in rows:
        if row["round"] != "median" and (row["format"], row["analysis"]) in medians:
            continue
        goal = 0.05 * row["total"] if row["analysis"] == "nuclei" else 2.0
        print(f"{row['format']}/{row['analysis']} ({row['round']}): overhead {row['overhead']:.2f} s = "
              f"{100 * row['overhead'] / row['total']:.1f} % of {row['total']:.1f} s "
              f"(goal <= {goal:.2f} s: {'met' if row['overhead'] <= goal else 'NOT met'}); "
              f"daemon RSS growth {row['daemon_growth_MiB']:.0f} MiB (goal <= 64)")
        print(f"  download {row['download']:.2f} s (raw copy {row['raw_copy']:.2f} s, "
              f"{row['download'] - row['raw_copy']:+.2f}); analysis in the worker "
              f"{row['analysis_s']:.2f} s (alone {row['alone']:.2f} s, "
              f"{row['analysis_s'] - row['alone']:+.2f}; CPU {row['analysis_cpu']:.1f} s against "
              f"{row['alone_cpu']:.1f} s); metadata+thumbnail+label "
              f"{row['metadata'] + row['thumbnail'] + row['label']:.2f} s; store "
              f"{row['store']:.2f} s (of which the simulator's PUT {row['sps_put']:.2f} s)")


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="full", help="full, or WxH (e.g. 25000x20000)")
    parser.add_argument("--formats", default="tiff,svs,dicom", type=lambda s: s.split(","))
    parser.add_argument("--analyses", default="tissue,nuclei", type=lambda s: s.split(","))
    parser.add_argument("--rounds", type=int, default=3,
                        help="timed jobs per row, each with its baselines (median reported); "
                             "0: no rows, the throughput only")
    parser.add_argument("--throughput", type=int, default=8, help="slides; 0 to skip")
    parser.add_argument("--throughput-analysis", default="nuclei")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    task.react(lambda reactor: ensureDeferred(main(reactor, args)))


if __name__ == "__main__":
    cli()
