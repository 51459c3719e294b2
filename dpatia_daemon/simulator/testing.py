"""Helpers for tests (and anyone embedding the simulator): small slides, in-memory wiring.

``small_slide_set(directory)`` generates (once; later calls reuse it) the stock slide
set at a quarter of its size, ~2000 px wide, in well under a second.
``memory_simulator(slide_set)`` wires a :class:`~.server.Simulator` that runs entirely in
memory: a ``task.Clock``, tiles rendered inline (no threads), and an HTTP client for
the driver that you pass in (e.g. ``StubTreq`` around an app resource).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet.task import Clock

from .driver import AppDriver
from .fake import FakeSPS
from .faults import Faults
from .server import Simulator
from .slides import SlideSet, SlideSpec, default_specs, load_or_generate
from .tiles import TileServer, inline_runner

#: The scale of :func:`small_specs` (pass it as ``SimulatorConfig(scale=...)`` to reuse
#: a directory made by :func:`small_slide_set`).
SMALL_SCALE = 0.25


def small_specs() -> list[SlideSpec]:
    """The stock slides at :data:`SMALL_SCALE`."""
    return default_specs(SMALL_SCALE)


def small_slide_set(directory: str | Path) -> SlideSet:
    """Generate (or reuse) the small slide set in ``directory``."""
    return load_or_generate(directory, small_specs())


def memory_simulator(
    slide_set: SlideSet,
    *,
    clock: Clock | None = None,
    http: Any = None,
    faults: Faults | None = None,
    callback_url: str = "http://sps.test/SectraPathologyServer/external/imageanalysis/v1",
) -> Simulator:
    """A simulator with ``slide_set`` loaded that never touches the reactor."""
    clock = clock or Clock()
    sps = FakeSPS(clock=clock, faults=faults or Faults())
    simulator = Simulator(
        sps=sps,
        tiles=TileServer(run=inline_runner),
        driver=AppDriver(http=http, sps=sps, clock=clock, callback_url=callback_url),
    )
    simulator.load(slide_set)
    return simulator


__all__ = ["SMALL_SCALE", "memory_simulator", "small_slide_set", "small_specs"]
