"""Slide pipeline benchmark: WSI download throughput and memory, thumbnail fetch time.

(a) **Download.**  A 1 GiB single file and a 1 GiB 3-part ``multipart/related`` answer
    are served on loopback by the fake SPS in a *separate process* (its ``FileStream``
    streams from disk with a push producer), and downloaded by
    :func:`dpatia_daemon.pipeline.download.download_files` in this process (writes inline
    on the reactor thread, the only mode since writes in a thread measured no faster).
    Reported: throughput, the
    growth of this process's peak RSS (``VmHWM`` after, minus ``VmRSS`` before, the
    peak reset through ``/proc/self/clear_refs``), and its CPU time per GiB (steadier
    than throughput when the machine is shared).  Beside them, a raw copy of the
    same file on the same disk: ``cat`` (page cache only) and ``dd conv=fsync``
    (durable, as the download is).
    Goals (issue 4): >= 0.5x the raw copy; not slower than the seed's blocking
    ``requests`` download (377 MB/s single, 491 MB/s multipart, on this kind of
    machine); RSS growth <= 64 MiB whatever the size.

(b) **Thumbnail.**  The fake SPS (another process) adds 5 ms to every tile request;
    :func:`dpatia_daemon.pipeline.thumbnail.fetch_thumbnail` fetches one level's tiles with
    ``concurrency=8`` (and 16), against the same call with ``concurrency=1`` (the tiles
    one after another, same assembly), the cases taking turns; each round's speed-up
    is reported (median and range).  Goal: >= 6x faster at the shipped default (16).

Usage: ``python bench/pipeline.py [--size 1G] [--tiles 80] [--workdir DIR]``.  The
GiB files are deleted afterwards.  MB = 10^6 bytes, MiB = 2^20.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from twisted.internet import task
from twisted.internet.threads import deferToThreadPool
from twisted.python.filepath import FilePath
from twisted.web.resource import Resource

SEED_SINGLE_MBS = 377.0
SEED_MULTI_MBS = 491.0
RSS_GOAL_MIB = 64.0
SLIDE_SINGLE = "bench-single"
SLIDE_MULTI = "bench-multi"
SLIDE_TILES = "bench-tiles"
TILE = 256


def parse_size(text: str) -> int:
    """``1G``, ``256M``, ``1048576`` → bytes (binary units)."""
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def human(n: float) -> str:
    """Bytes as MiB/GiB text."""
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.0f} MiB"


# --- the server process ---------------------------------------------------------------------


def serve(config_path: str) -> None:
    """Run the fake SPS on loopback with the slides in ``config_path``; write port + token."""
    from twisted.internet import reactor
    from twisted.web.server import Site

    from dpatia_daemon.simulator.fake import FakeSPS

    config = json.loads(Path(config_path).read_text())
    fake = FakeSPS(clock=reactor)  # type: ignore[arg-type]
    fake.faults.latency = config.get("latency", 0.0)
    for slide_id, files in config.get("slides", {}).items():
        slide = fake.add_slide(slide_id)
        slide.file_paths = [(name, Path(path)) for name, path in files]
    root: Any = fake.resource()
    if "tiles" in config:
        tile = sample_tile()
        fake.add_slide(SLIDE_TILES, tiles=lambda level, col, row: tile)
        if config.get("lean"):
            root = LeanTiles(reactor, tile, config.get("latency", 0.0))
    site = Site(root)
    site.displayTracebacks = False
    port = reactor.listenTCP(0, site, interface="127.0.0.1")  # type: ignore[attr-defined]
    ready = {"port": port.getHost().port, "token": fake.issue_token()}
    Path(config["ready"]).write_text(json.dumps(ready))
    reactor.run()  # type: ignore[attr-defined]


def sample_tile() -> bytes:
    """A 256 px JPEG tile that compresses like tissue (smooth colour, some texture)."""
    from PIL import Image, ImageFilter

    noise = Image.effect_noise((TILE, TILE), 60).filter(ImageFilter.GaussianBlur(2))
    base = Image.new("RGB", (TILE, TILE), (225, 160, 200))
    tile = Image.composite(base, Image.new("RGB", (TILE, TILE), (120, 60, 140)), noise)
    out = io.BytesIO()
    tile.save(out, "JPEG", quality=80)
    return out.getvalue()


class LeanTiles(Resource):
    """Any GET answers the tile after ``latency`` seconds: a server that costs little CPU.

    The real SPS runs on its own machine; the fake SPS (Klein, request recording) spends
    more CPU per request than the client under test, and on a 2-core machine it would
    be what is measured.  (b) reports both servers.
    """

    isLeaf = True

    def __init__(self, reactor: Any, tile: bytes, latency: float) -> None:
        super().__init__()
        self.reactor = reactor
        self.tile = tile
        self.latency = latency

    def render(self, request: Any) -> Any:
        from twisted.web.server import NOT_DONE_YET

        def answer() -> None:
            request.setHeader(b"content-type", b"image/jpeg")
            request.setHeader(b"content-length", b"%d" % len(self.tile))
            request.write(self.tile)
            request.finish()

        call = self.reactor.callLater(self.latency, answer)
        request.notifyFinish().addErrback(lambda _: call.active() and call.cancel())
        return NOT_DONE_YET


class Server:
    """The fake SPS in a child process (so its memory and CPU are not ours)."""

    def __init__(self, workdir: Path, name: str, config: dict[str, Any]) -> None:
        ready = workdir / f"{name}.ready"
        ready.unlink(missing_ok=True)
        config = dict(config, ready=str(ready))
        config_path = workdir / f"{name}.json"
        config_path.write_text(json.dumps(config))
        self.process = subprocess.Popen([sys.executable, __file__, "--serve", str(config_path)])
        deadline = time.monotonic() + 30
        while not ready.exists():
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"the {name} server did not start")
            time.sleep(0.05)
        time.sleep(0.05)
        info = json.loads(ready.read_text())
        self.url = (
            f"http://127.0.0.1:{info['port']}/SectraPathologyServer/external/imageanalysis/v1"
        )
        self.token = info["token"]

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


# --- measurements --------------------------------------------------------------------------


def proc_status(field: str) -> int:
    """A ``/proc/self/status`` field in bytes (``VmRSS``, ``VmHWM``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


def make_file(path: Path, size: int) -> None:
    """Write ``size`` bytes of incompressible-looking data quickly (a random MiB repeated)."""
    block = os.urandom(1 << 20)
    with path.open("wb") as f:
        left = size
        while left > 0:
            f.write(block[: min(left, len(block))])
            left -= len(block)


def raw_copy(src: Path, dst: Path, *, fsync: bool) -> float:
    """Seconds to copy with ``cat`` (page cache) or ``dd conv=fsync`` (durable)."""
    start = time.perf_counter()
    if fsync:
        subprocess.run(
            ["dd", f"if={src}", f"of={dst}", "bs=1M", "conv=fsync", "status=none"], check=True
        )
    else:
        with dst.open("wb") as out:
            subprocess.run(["cat", str(src)], stdout=out, check=True)
    elapsed = time.perf_counter() - start
    dst.unlink()
    return elapsed


async def timed_download(
    reactor: Any, server: Server, slide_id: str, folder: Path
) -> tuple[float, int, int, float]:
    """(seconds, bytes, peak RSS growth, CPU seconds) of one download into a fresh folder.

    The CPU time (this process, all threads) is steadier than the wall time on a shared
    machine, and it is what the download takes from everything else running there.
    """
    from dpatia_daemon.jobs import Callback
    from dpatia_daemon.pipeline.download import download_files
    from dpatia_daemon.sps.client import SPSClient, make_http_client

    http = make_http_client(reactor)
    client = SPSClient(http=http.client, clock=reactor, software_version="bench", timeout=30)
    callback = Callback(server.url, server.token)
    pool = reactor.getThreadPool()

    def run_blocking(f: Any, *args: Any) -> Any:
        return deferToThreadPool(reactor, pool, f, *args)

    shutil.rmtree(folder, ignore_errors=True)
    before = proc_status("VmRSS")
    reset_peak_rss()
    start = time.perf_counter()
    cpu = time.process_time()
    files = await download_files(
        client,
        callback,
        slide_id,
        FilePath(str(folder)),
        clock=reactor,
        run_blocking=run_blocking,
    )
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu
    growth = proc_status("VmHWM") - before
    size = sum(f.getsize() for f in files)
    await http.close()
    shutil.rmtree(folder, ignore_errors=True)
    return elapsed, size, growth, cpu


async def timed_tiles(
    reactor: Any, client: Any, server: Server, info: dict[str, Any], concurrency: int, bare: bool
) -> float:
    """Seconds to fetch the thumbnail level at ``concurrency``: the whole
    :func:`fetch_thumbnail` (assembly included), or with ``bare`` only the
    ``SPSClient.tile`` calls (the HTTP client's own ceiling, nothing decoded)."""
    from twisted.internet.defer import DeferredSemaphore, ensureDeferred, gatherResults

    from dpatia_daemon.jobs import Callback
    from dpatia_daemon.pipeline.thumbnail import fetch_thumbnail, plan_thumbnail

    pool = reactor.getThreadPool()
    callback = Callback(server.url, server.token)

    def run_blocking(f: Any, *args: Any) -> Any:
        return deferToThreadPool(reactor, pool, f, *args)

    start = time.perf_counter()
    if bare:
        plan = plan_thumbnail(info)
        semaphore = DeferredSemaphore(concurrency)
        await gatherResults(
            [
                semaphore.run(
                    lambda c=c, r=r: ensureDeferred(
                        client.tile(callback, SLIDE_TILES, plan.level, c, r)
                    )
                )
                for c, r, _ in plan.dzi.tiles(plan.level)
            ]
        )
    else:
        result = await fetch_thumbnail(
            client, callback, SLIDE_TILES, info, run_blocking=run_blocking, concurrency=concurrency
        )
        assert result is not None, "thumbnail failed"
    return time.perf_counter() - start


# --- the run --------------------------------------------------------------------------------


async def main(reactor: Any, args: argparse.Namespace) -> None:
    size = parse_size(args.size)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="dpatia-bench-", dir="/tmp"))
    workdir.mkdir(parents=True, exist_ok=True)
    source = workdir / "source"
    source.mkdir(exist_ok=True)
    rows: list[tuple[str, float, str, str, str, str]] = []
    thumb_rows: list[tuple[str, int, float, float, str]] = []
    servers: list[Server] = []
    try:
        # (a) downloads ------------------------------------------------------------
        single = source / "single.svs"
        thirds = [size // 3, size // 3, size - 2 * (size // 3)]
        multi = [source / f"part{i}.dcm" for i in range(3)]
        print(f"writing {human(size)} single + {human(size)} in 3 parts under {workdir} ...")
        make_file(single, size)
        for path, n in zip(multi, thirds, strict=True):
            make_file(path, n)
        server = Server(
            workdir,
            "files",
            {
                "slides": {
                    SLIDE_SINGLE: [["single.svs", str(single)]],
                    SLIDE_MULTI: [[p.name, str(p)] for p in multi],
                }
            },
        )
        servers.append(server)
        # Round robin over the cases, so drift on the shared disk hits them alike.
        configs = [
            (SLIDE_SINGLE, "single", SEED_SINGLE_MBS),
            (SLIDE_MULTI, "3-part", SEED_MULTI_MBS),
        ]
        copies: dict[str, list[float]] = {"cat": [], "dd conv=fsync": []}
        runs: dict[Any, list[tuple[float, int, int, float]]] = {c: [] for c in configs}
        for _ in range(args.repeat):
            copies["cat"].append(raw_copy(single, workdir / "copy", fsync=False))
            copies["dd conv=fsync"].append(raw_copy(single, workdir / "copy", fsync=True))
            for config in configs:
                slide, _label, _seed = config
                runs[config].append(await timed_download(reactor, server, slide, workdir / "dl"))
        raw = {k: size / statistics.median(v) / 1e6 for k, v in copies.items()}
        for name, times in copies.items():
            rows.append(
                (
                    f"raw copy ({name})",
                    raw[name],
                    f"{size / max(times) / 1e6:.0f}-{size / min(times) / 1e6:.0f}",
                    "",
                    "",
                    "",
                )
            )
        for config in configs:
            slide, label, seed = config
            got = runs[config][0][1]
            assert got == size, f"downloaded {got} bytes, expected {size}"
            mbs = size / statistics.median(r[0] for r in runs[config]) / 1e6
            spread = (
                f"{size / max(r[0] for r in runs[config]) / 1e6:.0f}-"
                f"{size / min(r[0] for r in runs[config]) / 1e6:.0f}"
            )
            growth = max(r[2] for r in runs[config])
            cpu = statistics.median(r[3] for r in runs[config]) / (size / (1 << 30))
            ok = (
                mbs >= 0.5 * raw["dd conv=fsync"]
                and mbs >= seed
                and growth <= RSS_GOAL_MIB * (1 << 20)
            )
            rows.append(
                (
                    f"download {label}, inline writes",
                    mbs,
                    spread,
                    f"{growth / (1 << 20):.1f}",
                    f"{cpu:.2f}",
                    f"{mbs / raw['dd conv=fsync']:.2f}x dd, {mbs / raw['cat']:.2f}x cat, "
                    f"{mbs / seed:.2f}x seed  {'OK' if ok else 'MISS'}",
                )
            )
        server.stop()
        servers.remove(server)
        shutil.rmtree(source, ignore_errors=True)

        # (b) thumbnail --------------------------------------------------------------
        from dpatia_daemon.sps.client import SPSClient, make_http_client

        # A slide whose 16 µm/px level has about --tiles tiles of 256 px.
        cols = max(1, round((args.tiles * 4 / 3) ** 0.5))
        rows_ = max(1, round(args.tiles / cols))
        info = {
            "imageSize": {"width": cols * TILE * 64, "height": rows_ * TILE * 64},
            "tileSize": {"width": TILE, "height": TILE},
            "micronsPerPixel": 0.25,
            "availableTileFormats": [{"extension": "jpg"}],
        }
        for kind, lean in (("lean server", True), ("fake SPS", False)):
            server = Server(
                workdir, "tiles", {"tiles": True, "lean": lean, "latency": args.latency}
            )
            servers.append(server)
            # One client for the whole series, as the worker has one pool (warm connections).
            http = make_http_client(reactor, pool_size=32)
            client = SPSClient(
                http=http.client, clock=reactor, software_version="bench", timeout=30
            )
            await timed_tiles(reactor, client, server, info, 16, False)  # warm-up
            cases = [(1, False), (8, False), (16, False), (1, True), (8, True)]
            # Round robin, so load from elsewhere on the machine hits every case alike;
            # each round's speed-up compares runs made moments apart.
            times: dict[tuple[int, bool], list[float]] = {case: [] for case in cases}
            for _ in range(args.repeat):
                for case in cases:
                    times[case].append(await timed_tiles(reactor, client, server, info, *case))
            for (c, bare), ts in times.items():
                what = "bare tile requests" if bare else "fetch_thumbnail"
                ratios = [b / t for b, t in zip(times[(1, bare)], ts, strict=True)]
                thumb_rows.append(
                    (
                        f"{kind}: {what}, concurrency {c}",
                        cols * rows_,
                        statistics.median(ts),
                        statistics.median(ratios),
                        f"{min(ratios):.1f}-{max(ratios):.1f}",
                    )
                )
            await http.close()
            server.stop()
            servers.remove(server)
    finally:
        for s in servers:
            s.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    print()
    print(f"(a) download on loopback, {human(size)}, median and range of {args.repeat}")
    header = f"{'':36}{'MB/s':>7}{'range':>10}{'peak RSS +MiB':>15}{'CPU s/GiB':>11}  median vs"
    print(header)
    print("-" * (len(header) + 40))
    for name, mbs, spread, growth, cpu_text, verdict in rows:
        print(f"{name:36}{mbs:>7.0f}{spread:>10}{growth:>15}{cpu_text:>11}  {verdict}")
    print(
        f"goals: >= 0.5x raw copy (dd conv=fsync), >= seed ({SEED_SINGLE_MBS:.0f} single / "
        f"{SEED_MULTI_MBS:.0f} multipart MB/s), RSS growth <= {RSS_GOAL_MIB:.0f} MiB"
    )
    print()
    print(
        f"(b) thumbnail, {args.latency * 1000:.0f} ms added per tile, median and range of "
        f"{args.repeat} rounds"
    )
    header = f"{'':55}{'tiles':>7}{'seconds':>10}{'speed-up':>10}{'range':>10}"
    print(header)
    print("-" * len(header))
    for name, tiles, seconds, speedup, spread in thumb_rows:
        print(f"{name:55}{tiles:>7}{seconds:>10.3f}{speedup:>9.1f}x{spread:>10}")
    from dpatia_daemon.pipeline.prepare import PipelineSettings

    default = PipelineSettings().tile_concurrency
    print(
        f"goal: fetch_thumbnail >= 6x faster than one tile after another "
        f"(dpatia fetches [pipeline] tile_concurrency = {default} tiles at a time by default)"
    )


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="1G", help="download size (default 1G; e.g. 256M)")
    parser.add_argument("--tiles", type=int, default=80, help="tiles in the thumbnail level")
    parser.add_argument("--latency", type=float, default=0.005, help="seconds added per tile")
    parser.add_argument("--repeat", type=int, default=5, help="runs per measurement")
    parser.add_argument("--workdir", help="where the files go (default: a temp dir in /tmp)")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return
    task.react(lambda reactor: task.Deferred.fromCoroutine(main(reactor, args)))  # type: ignore[attr-defined]


if __name__ == "__main__":
    cli()
