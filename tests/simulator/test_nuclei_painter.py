"""The simulator's nuclei: placed whole inside the tissue, apart, painted tile by tile."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from dpatia_daemon.simulator.nuclei import colour_of, paint_nuclei, place_nuclei


def _mask(size: tuple[int, int] = (600, 400)) -> np.ndarray:
    w, h = size
    image = Image.new("L", size, 0)
    ImageDraw.Draw(image).ellipse((w // 15, h // 13, w - w // 15, h - h // 13), fill=255)
    return np.asarray(image) > 0


def test_nuclei_lie_whole_inside_the_tissue_and_never_touch() -> None:
    """Every nucleus's box is tissue, and no two ellipses overlap."""
    mask = _mask()
    nuclei = place_nuclei(mask, 1, 0.5, np.random.default_rng(3))
    assert nuclei.count > 50
    for x, y, rx, ry in zip(nuclei.x, nuclei.y, nuclei.rx, nuclei.ry, strict=True):
        assert mask[int(y - ry), int(x)] and mask[int(y + ry), int(x)]
        assert mask[int(y), int(x - rx)] and mask[int(y), int(x + rx)]
    dx = nuclei.x[:, None] - nuclei.x[None, :]
    dy = nuclei.y[:, None] - nuclei.y[None, :]
    reach = np.maximum(nuclei.rx, nuclei.ry)
    gap = np.hypot(dx, dy) - (reach[:, None] + reach[None, :])
    np.fill_diagonal(gap, np.inf)
    assert gap.min() > 0


def test_a_coarse_mask_keeps_them_inside_too() -> None:
    """Placed on a mask at 1/8 resolution, nuclei still lie inside the full-size tissue."""
    mask = _mask((4800, 3200))
    coarse = mask[::8, ::8]
    nuclei = place_nuclei(coarse, 8, 0.5, np.random.default_rng(4))
    assert nuclei.count > 3000
    assert mask[nuclei.y.astype(int), nuclei.x.astype(int)].all()


def test_painting_tile_by_tile_equals_painting_whole() -> None:
    """Nuclei across tile edges are painted in each tile they reach, seamlessly."""
    nuclei = place_nuclei(_mask(), 1, 0.5, np.random.default_rng(5))
    colour = colour_of("H&E")
    whole = Image.new("RGB", (600, 400), (255, 255, 255))
    assert paint_nuclei(whole, (0, 0), nuclei, colour) == nuclei.count
    tiled = Image.new("RGB", (600, 400), (255, 255, 255))
    for y in range(0, 400, 128):
        for x in range(0, 600, 128):
            tile = Image.new("RGB", (128, 128), (255, 255, 255))
            paint_nuclei(tile, (x, y), nuclei, colour)
            tiled.paste(tile, (x, y))
    assert tiled.tobytes() == whole.tobytes()
