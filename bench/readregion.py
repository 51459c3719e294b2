"""read_region benchmark: megapixels/s of a 0.5 µm/px region over the SPS's DZI tiles.

A generated slide (0.5 µm/px, served by the simulator's tile server on loopback with
``--latency`` added before every tile request, the simulator's fault injection) is
read three ways:

1. ``RegionReader.read_region`` with 16 tiles in flight (what ``job.read_region`` does);
2. the same reader with 1 in flight: the same tiles fetched one after another;
3. OpenSlide reading the same region from the slide file (the downloaded WSI).

Each way reads the region ``--repeat`` times (the simulator caches encoded tiles, so
repeats measure the client, not the renderer); the table shows the best run.  Goal
(issue 10): compare 16-in-flight with sequential (a ratio) and with the local file.

Usage: ``python bench/readregion.py [--side 4096] [--latency 0.005] [--repeat 3]``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import openslide
from treq.client import HTTPClient
from twisted.internet import task, threads
from twisted.internet.defer import ensureDeferred
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.server import Site

from dpatia_daemon.jobs import Callback
from dpatia_daemon.pipeline.regions import RegionReader
from dpatia_daemon.simulator.faults import Faults
from dpatia_daemon.simulator.server import Simulator
from dpatia_daemon.simulator.slides import SlideSpec, load_or_generate
from dpatia_daemon.sps.client import SPSClient

SLIDE = "bench-region"


def _read(reader: RegionReader, x: int, y: int, side: int, mpp: float) -> float:
    start = time.perf_counter()
    pixels = reader.read_region(x, y, side, side, resolution=mpp)
    assert pixels.shape == (side, side, 3)
    return time.perf_counter() - start


def _openslide(path: Path, x: int, y: int, side: int) -> float:
    start = time.perf_counter()
    with openslide.OpenSlide(str(path)) as slide:
        image = slide.read_region((x, y), 0, (side, side)).convert("RGB")
    assert image.size == (side, side)
    return time.perf_counter() - start


async def main(reactor: Any, args: argparse.Namespace) -> None:
    side, mpp = args.side, 0.5
    data = Path(args.data or tempfile.gettempdir()) / "dpatia-bench-readregion"
    spec = SlideSpec(SLIDE, side + 1024, side + 512, seed=7, microns_per_pixel=mpp, blobs=3)
    print(f"slide {spec.width}x{spec.height} at {mpp} µm/px (generated once in {data})")
    slides = load_or_generate(data, [spec])
    simulator = Simulator.create(reactor, faults=Faults(latency=args.latency))
    simulator.load(slides)
    port = reactor.listenTCP(0, Site(simulator.sps.resource()), interface="127.0.0.1")
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 32
    sps = SPSClient(
        http=HTTPClient(Agent(reactor, pool=pool)),
        clock=reactor,
        software_version="bench",
        timeout=60,
    )
    base = f"http://127.0.0.1:{port.getHost().port}{simulator.sps.base_path}"
    callback = Callback(base, simulator.sps.issue_token())
    info = simulator.sps.slides[SLIDE].info
    x, y = 512, 256
    rows: list[tuple[str, float, int]] = []
    try:
        for name, concurrency in (("read_region, 16 in flight", 16), ("one tile after another", 1)):
            reader = RegionReader(
                reactor=reactor,
                sps=sps,
                callback=callback,
                slide_id=SLIDE,
                info=info,
                concurrency=concurrency,
            )
            best = min(
                [
                    await threads.deferToThread(_read, reader, x, y, side, mpp)
                    for _ in range(args.repeat)
                ]
            )
            rows.append((name, best, reader.fetched // args.repeat))
        path = slides.path(slides.get(SLIDE).tiff)
        best = min(
            [await threads.deferToThread(_openslide, path, x, y, side) for _ in range(args.repeat)]
        )
        rows.append(("OpenSlide, downloaded file", best, 0))
    finally:
        await pool.closeCachedConnections()
        await port.stopListening()
        simulator.tiles.close()
    mp = side * side / 1e6
    print(f"region {side}x{side} ({mp:.1f} MP) at {mpp} µm/px, {args.latency * 1000:g} ms per tile")
    print(f"{'way':32} {'seconds':>8} {'MP/s':>8} {'tiles':>6} {'vs sequential':>14}")
    sequential = rows[1][1]
    for name, seconds, tiles in rows:
        print(
            f"{name:32} {seconds:8.3f} {mp / seconds:8.1f} {tiles or '-':>6} "
            f"{sequential / seconds:13.1f}x"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=4096, help="region side, pixels")
    parser.add_argument("--latency", type=float, default=0.005, help="seconds added per tile")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--data", default=None, help="where the slide is generated")
    options = parser.parse_args()
    task.react(lambda reactor: ensureDeferred(main(reactor, options)))
