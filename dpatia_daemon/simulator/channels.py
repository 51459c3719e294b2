"""A multichannel (fluorescence-like) slide: one image per optical path (IA-API.md §2.2).

``sim-fluo-1`` shares the geometry of the first generated slide and lists three
optical paths (``DAPI``, ``FITC``, ``TRITC``); a tile request names one with
``?opticalPath=`` (the first when it names none, 404 for any other).  Each path's
tile is one colour channel of the source slide's tile, inverted (dense stain becomes
bright signal) and served as a grey image, so the three paths differ visibly and
repeatably.  The slide has a case of its own and no files to download: it is a
streaming-only slide, for apps that read tiles (``job.read_region``).
"""

from __future__ import annotations

import copy
import io
from typing import Any

import numpy as np
from PIL import Image
from twisted.internet.defer import Deferred, succeed

from ..pipeline.dzi import DZI
from .fake import FakeSlide
from .slides import SlideSet
from .tiles import encode

#: The multichannel slide's id.
SLIDE_ID = "sim-fluo-1"
#: Its optical paths, in order: each is that colour channel of the source slide.
OPTICAL_PATHS = (("DAPI", "DAPI (nuclei)"), ("FITC", "FITC"), ("TRITC", "TRITC"))


def channel_tile(data: bytes, channel: int, ext: str) -> bytes:
    """The grey tile of colour ``channel`` (inverted) of the encoded RGB tile ``data``."""
    with Image.open(io.BytesIO(data)) as image:
        rgb = np.asarray(image.convert("RGB"))
    grey = Image.fromarray(255 - rgb[..., channel], mode="L")
    return encode(grey.convert("RGB"), ext)


def add_multichannel(simulator: Any, slide_set: SlideSet) -> str | None:
    """Serve :data:`SLIDE_ID` from the first slide of ``slide_set``; its id (None: none)."""
    if not slide_set.slides:
        return None
    source = slide_set.slides[0]
    info = copy.deepcopy(source.info)
    info.update(
        id=SLIDE_ID,
        opticalPaths=[{"id": i, "description": d} for i, d in OPTICAL_PATHS],
        staining={"displayName": "IF DAPI/FITC/TRITC"},
        block={"displayName": "F1"},
        accessionNumber="SIM-2025-0003",
        lisSlideId="SIM-2025-0003-F1-1",
    )
    tiles = simulator.tiles
    # The page's thumbnail of the slide: its source's (the channels are tiles only).
    size = info["imageSize"]
    tiles.add(
        SLIDE_ID,
        slide_set.path(source.tiff),
        DZI(
            size["width"],
            size["height"],
            info["tileSize"]["width"],
            microns_per_pixel=info["micronsPerPixel"],
        ),
    )

    def render(level: int, col: int, row: int, ext: str, path: str) -> Deferred[bytes | None]:
        channel = [i for i, _ in OPTICAL_PATHS].index(path)

        def split(data: bytes | None) -> Deferred[bytes | None]:
            if data is None:
                return succeed(None)
            result: Deferred[bytes | None] = tiles.run(channel_tile, data, channel, ext)
            return result

        return tiles.tile(source.slide_id, level, col, row, "png").addCallback(split)

    simulator.sps.slides[SLIDE_ID] = FakeSlide(
        slide_id=SLIDE_ID, info=info, label=None, channel_renderer=render
    )
    return SLIDE_ID


__all__ = ["OPTICAL_PATHS", "SLIDE_ID", "add_multichannel", "channel_tile"]
