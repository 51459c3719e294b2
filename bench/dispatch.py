"""Dispatch benchmark: how fast do spooled jobs reach a worker, and how many go through?

Measures:

1. pickup latency — a job committed to the spool (``spool.add`` fired) → the analysis
   started in a worker process — p50/p99 over ``--jobs`` jobs sent one at a time, with
   a no-op analysis (:func:`noop`, which reports its own start time);
2. throughput — ``--burst`` no-op jobs spooled at once, through 2 workers, until every
   one is DONE in the spool with its result stored at the SPS;
3. with ``--demo``: 10 slides through a real ``twistd dpatia`` with ONE worker running
   the ``demo`` analysis at its default step time (3 × 2 s), from the first image
   notification to the last stored result (the seed took 161 s; about a minute).

1 and 2 run the supervisor in this process on a real directory spool (the daemon's
own path from ``spool.add`` to ``RunJob``), with the fake SPS in a separate process
(an SPS is another machine) and each job's "queued" result already stored, as the
front door leaves it.  Goals (issue 3): p50 <= 20 ms, p99 <= 100 ms, >= 100 jobs/s,
demo <= 65 s.

Usage: ``python bench/dispatch.py [--jobs 200] [--burst 500] [--demo]``
(``make bench-dispatch`` runs it with ``--demo``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
#: The analysis spec of :func:`noop` (workers import ``bench`` from the checkout).
NOOP = "bench.dispatch:noop"


def noop(job: Any) -> Any:
    """The no-op analysis: answers at once with its wall-clock start time."""
    from dpatia_daemon.analyses import AnalysisResult

    return AnalysisResult(display_result="noop", display_properties={"Started": time.time()})


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


# --- the fake SPS, in its own process ---------------------------------------------------


def serve_sps(slides: int) -> None:
    """``--serve-sps N``: a fake SPS with slides bench-0..N-1; prints "port P token T"."""
    from twisted.internet import reactor
    from twisted.web.server import Site

    from dpatia_daemon.simulator.fake import FakeSPS

    fake = FakeSPS(clock=reactor)
    # Each slide has a small WSI file: workers fetch metadata, label and files before
    # the analysis, as the seed's worker did.
    wsi = bytes(range(256)) * 4096  # 1 MiB
    for n in range(slides):
        fake.add_slide(f"bench-{n:05d}", files=[("slide.tif", wsi)])
    token = fake.issue_token()
    site = Site(fake.resource())
    site.noisy = False
    port = reactor.listenTCP(0, site, interface="127.0.0.1", backlog=512)  # type: ignore[attr-defined]
    print(f"port {port.getHost().port} token {token}", flush=True)
    reactor.run()  # type: ignore[attr-defined]


class _SPSProcess:
    """The fake SPS child: its output, the line naming its port, its end."""

    def __init__(self) -> None:
        from twisted.internet.defer import Deferred

        self.output = bytearray()
        self.announced: Deferred[re.Match[bytes]] = Deferred()
        self.ended: Deferred[None] = Deferred()
        self.transport: Any = None

    def protocol(self) -> Any:
        from twisted.internet.protocol import ProcessProtocol

        owner = self

        class Protocol(ProcessProtocol):
            def outReceived(self, data: bytes) -> None:
                owner.output += data
                match = re.search(rb"port (\d+) token (\S+)\n", owner.output)
                if match and not owner.announced.called:
                    owner.announced.callback(match)

            errReceived = outReceived

            def processEnded(self, reason: Any) -> None:
                if not owner.announced.called:
                    owner.announced.errback(RuntimeError(owner.output.decode(errors="replace")))
                owner.ended.callback(None)

        return Protocol()

    async def stop(self) -> None:
        try:
            self.transport.signalProcess("TERM")
        except Exception:
            pass
        await self.ended


async def start_sps(reactor: Any, slides: int) -> tuple[_SPSProcess, str, str]:
    """Spawn the fake SPS process; return (it, base URL, token)."""
    from dpatia_daemon.simulator.fake import BASE_PATH

    child = _SPSProcess()
    argv = [sys.executable, __file__, "--serve-sps", str(slides)]
    child.transport = reactor.spawnProcess(
        child.protocol(), sys.executable, argv, env=dict(os.environ), path=str(ROOT)
    )
    match = await child.announced
    port, token = int(match.group(1)), match.group(2).decode()
    return child, f"http://127.0.0.1:{port}{BASE_PATH}", token


# --- 1 and 2: the supervisor in this process -------------------------------------------


async def no_op_jobs(reactor: Any, args: argparse.Namespace, workdir: Path) -> dict[str, float]:
    from twisted.internet.defer import Deferred, gatherResults
    from twisted.python.filepath import FilePath

    from dpatia_daemon import __version__
    from dpatia_daemon.config import WorkersConfig
    from dpatia_daemon.jobs import Callback, Job, JobKind
    from dpatia_daemon.spool import DirectorySpool
    from dpatia_daemon.sps.client import SPSClient, make_http_client
    from dpatia_daemon.sps.results import Status, status_frame
    from dpatia_daemon.sps.writer import ResultWriter
    from dpatia_daemon.workers.supervisor import Supervisor, SupervisorEvent

    total = args.jobs + args.burst + 2
    sps_process, url, token = await start_sps(reactor, total)
    spool = DirectorySpool(directory=FilePath(str(workdir / "spool")), reactor=reactor)
    spool.startService()
    http = make_http_client(reactor, pool_size=8)
    sps = SPSClient(http=http.client, clock=reactor, software_version=__version__, timeout=10)
    writer = ResultWriter(sps=sps, clock=reactor, display_name="bench")
    supervisor = Supervisor(
        reactor=reactor,
        spool=spool,
        writer=writer,
        config=WorkersConfig(count=2, work_directory=FilePath(str(workdir / "work"))),
        analysis=NOOP,
    )
    ended: dict[str, Deferred[None]] = {}
    ready: list[SupervisorEvent] = []
    all_ready: Deferred[None] = Deferred()

    def on_event(event: SupervisorEvent) -> None:
        if event.kind == "worker-ready":
            ready.append(event)
            if len(ready) == 2:
                all_ready.callback(None)
        if event.kind == "job-ended" and event.detail.get("state") == "done":
            d = ended.get(event.job_id or "")
            if d is not None and not d.called:
                d.callback(None)

    supervisor.observe(on_event)
    supervisor.startService()
    await all_ready
    callback = Callback(url, token)
    serial = 0

    async def make_job() -> Job:
        """A job as the front door leaves it: its queued frame stored, its id known."""
        nonlocal serial
        slide = f"bench-{serial:05d}"
        serial += 1
        frame = status_frame(
            slide_id=slide,
            status=Status.QUEUED,
            text="bench: queued",
            job_id="0" * 32,
            application_version=__version__,
        )
        stored = await sps.create_result(callback, "dpatia", frame)
        return Job(
            slide_id=slide,
            application_id="dpatia",
            kind=JobKind.NOTIFICATION,
            callback=callback,
            created=reactor.seconds(),
            result_id=stored.id,
        )

    async def started_at(job: Job) -> float:
        assert job.result_id is not None
        result = await sps.get_result(callback, "dpatia", job.result_id)
        return float(result.displayProperties["Started"])

    try:
        # Warm-up: first jobs pay for imports and connections.
        for _ in range(2):
            job = await spool.add(await make_job())
            ended[job.job_id] = Deferred()
            await ended[job.job_id]

        latencies = []
        for _ in range(args.jobs):
            fresh = await make_job()
            d: Deferred[Job] = spool.add(fresh)
            job = await d
            spooled = time.time()
            ended[job.job_id] = Deferred()
            await ended[job.job_id]
            latencies.append((await started_at(job) - spooled) * 1000)

        burst = [await make_job() for _ in range(args.burst)]
        for job in burst:
            ended[job.job_id] = Deferred()
        begin = time.perf_counter()
        await gatherResults([spool.add(job) for job in burst])
        await gatherResults([ended[job.job_id] for job in burst])
        elapsed = time.perf_counter() - begin
    finally:
        await supervisor.stopService()
        await spool.stopService()
        await http.close()
        await sps_process.stop()
    return {
        "p50": percentile(latencies, 0.5),
        "p99": percentile(latencies, 0.99),
        "max": max(latencies),
        "rate": args.burst / elapsed,
        "elapsed": elapsed,
    }


# --- 3: demo through the real daemon ----------------------------------------------------


async def demo_slides(reactor: Any, workdir: Path, slides: int = 10) -> float:
    import treq
    from twisted.internet.defer import ensureDeferred, gatherResults

    from dpatia_daemon.simulator.daemon_process import DaemonProcess

    sps_process, url, token = await start_sps(reactor, slides)
    config = workdir / "demo.ini"
    config.write_text(
        "[app]\nanalysis = demo\n"
        f"[spool]\ndirectory = {workdir / 'demo-spool'}\n"
        f"[workers]\ncount = 1\nwork_directory = {workdir / 'demo-work'}\n"
        "[sps]\nallowed_callback_urls = http://127.0.0.1:*/\n"
    )
    daemon = DaemonProcess(reactor=reactor, config=str(config), cwd=str(workdir))
    await daemon.start()
    await daemon.wait_for(rb"worker 1\.\d+ ready", 30, since=0)
    try:
        since = len(daemon.output)
        begin = time.perf_counter()

        async def notify(n: int) -> None:
            body = {
                "action": "newImageFiles",
                "applicationId": "dpatia",
                "slideId": f"bench-{n:05d}",
                "callbackInfo": {"url": url, "token": token},
                "context": {},
                "imageInfo": {"imageSize": {"width": 4000, "height": 3000}},
            }
            response = await treq.post(
                daemon.url + "/dpatia/imagenotification",
                json.dumps(body).encode(),
                headers={"Content-Type": ["application/json"]},
            )
            await response.content()
            assert response.code == 200, response.code

        await gatherResults([ensureDeferred(notify(n)) for n in range(slides)])
        for _ in range(slides):
            match = await daemon.wait_for(rb"job \w+ done", 120, since=since)
            since = match.end()
        return time.perf_counter() - begin
    finally:
        await daemon.kill(signal.SIGTERM)
        await sps_process.stop()


# --- main -------------------------------------------------------------------------------


async def main(reactor: Any, args: argparse.Namespace) -> None:
    keep = bool(args.workdir)
    workdir = (
        Path(args.workdir)
        if keep
        else Path(tempfile.mkdtemp(prefix="dpatia-bench-", dir=os.getcwd()))
    )
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        figures = await no_op_jobs(reactor, args, workdir)
        demo = await demo_slides(reactor, workdir) if args.demo else None
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    rows = [
        (
            f"pickup latency p50 ({args.jobs} jobs)",
            f"{figures['p50']:.1f} ms",
            "<= 20 ms",
            verdict(figures["p50"] <= 20),
        ),
        (
            "pickup latency p99",
            f"{figures['p99']:.1f} ms",
            "<= 100 ms",
            verdict(figures["p99"] <= 100),
        ),
        ("pickup latency max", f"{figures['max']:.1f} ms", "", ""),
        (
            f"throughput, 2 workers ({args.burst} jobs)",
            f"{figures['rate']:.0f} jobs/s",
            ">= 100 jobs/s",
            verdict(figures["rate"] >= 100),
        ),
    ]
    if demo is not None:
        rows.append(
            (
                "10 slides, demo, 1 worker",
                f"{demo:.1f} s",
                "<= 65 s (seed 161 s)",
                verdict(demo <= 65),
            )
        )
    else:
        rows.append(("10 slides, demo, 1 worker", "skipped", "<= 65 s (--demo)", ""))
    width = max(len(r[0]) for r in rows) + 2
    print()
    print(f"{'measure':<{width}}{'value':>14}  {'goal':<22}verdict")
    print("-" * (width + 14 + 2 + 22 + 7))
    for name, value, goal, ok in rows:
        print(f"{name:<{width}}{value:>14}  {goal:<22}{ok}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="dpatia dispatch benchmark")
    parser.add_argument("--jobs", type=int, default=200, help="jobs for the latency figures")
    parser.add_argument("--burst", type=int, default=500, help="jobs for the throughput figure")
    parser.add_argument("--demo", action="store_true", help="also run 10 demo slides (~1 min)")
    parser.add_argument("--workdir", help="keep spools and work folders here")
    parser.add_argument("--serve-sps", type=int, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.serve_sps is not None:
        serve_sps(options.serve_sps)
    else:
        from twisted.internet import defer, task

        task.react(lambda reactor: defer.ensureDeferred(main(reactor, options)))
