"""Full-size slides (``--scale full``): 100 000 × 80 000 px at 0.25 µm/px, strip by strip.

:mod:`.slides` renders a slide whole in memory, which is right for the few-millimetre
stock slides and impossible for a real one (24 GB of pixels).  Here a slide is a
*scene* (:class:`Scene`: the tissue polygons, two coarse noise grids for the stroma,
the nuclei placed on a coarse mask) small enough to hold, and each pyramid level is
rendered from it one block of tiles at a time (:func:`render_block`) and written as
JPEG tiles (tifffile, encoding in ``threads`` threads).  Memory is a block or two (8192 ×
256 px) plus the scene (about 100 MB at full size), whatever the size.  Each
level is a render of the same scene at its resolution (as a scanner's levels are
resamplings of the same glass), so levels agree in tissue and nuclei, not pixel for
pixel.

:func:`full_specs` gives the full-size set (a generic TIFF, an SVS and a DICOM series);
:func:`generate_large` writes one slide into a data folder, with the same manifest
entry (:class:`~.slides.GeneratedSlide`) and ground truth as a small one (tissue area
from the 4 µm mask, nucleus count exact).  :func:`load_or_generate` in :mod:`.slides`
caches the result: the first run takes minutes, later ones reuse it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from attrs import evolve, frozen
from PIL import Image, ImageDraw

from .nuclei import Nuclei, colour_of, paint_nuclei, place_nuclei

#: The full-size slide: Aperio-like 40× scan of a 25 × 20 mm area.
FULL_WIDTH, FULL_HEIGHT, FULL_MPP = 100_000, 80_000, 0.25
#: Level-0 pixels per pixel of the scene's tissue mask (4 µm at 0.25 µm/px).
SCENE_MASK_DOWNSAMPLE = 16
TILE = 256


@frozen
class Scene:
    """Everything a slide's pixels are rendered from, in level-0 pixels."""

    width: int
    height: int
    mpp: float
    polygons: list[list[tuple[float, float]]]
    coarse: npt.NDArray[np.uint8]
    coarse_cell: int
    fine: npt.NDArray[np.uint8]
    fine_cell: int
    nuclei: Nuclei
    colours: dict[str, tuple[int, int, int]]
    nucleus_colour: tuple[int, int, int]
    mask: npt.NDArray[np.bool_]


def build_scene(
    spec: Any,
    polygons: list[list[tuple[float, float]]],
    rng: np.random.Generator,
    colours: dict[str, tuple[int, int, int]],
) -> Scene:
    """The scene of ``spec`` (a :class:`~.slides.SlideSpec`) with these tissue polygons."""
    d = SCENE_MASK_DOWNSAMPLE
    mw, mh = -(-spec.width // d), -(-spec.height // d)
    mask_image = Image.new("L", (mw, mh), 0)
    draw = ImageDraw.Draw(mask_image)
    for points in polygons:
        draw.polygon([(x / d, y / d) for x, y in points], fill=255)
    mask = np.asarray(mask_image) > 127
    coarse_cell = max(8, round(40 / spec.microns_per_pixel))
    fine_cell = max(3, coarse_cell // 8)

    def grid(cell: int) -> npt.NDArray[np.uint8]:
        return rng.integers(
            0, 256, (spec.height // cell + 4, spec.width // cell + 4), dtype=np.uint8
        )

    coarse, fine = grid(coarse_cell), grid(fine_cell)
    nuclei = place_nuclei(mask, d, spec.microns_per_pixel, rng)
    order = np.argsort(nuclei.y)
    nuclei = Nuclei(*(getattr(nuclei, f)[order] for f in ("x", "y", "rx", "ry", "shade")))
    return Scene(
        spec.width,
        spec.height,
        spec.microns_per_pixel,
        polygons,
        coarse,
        coarse_cell,
        fine,
        fine_cell,
        nuclei,
        colours,
        colour_of(spec.stain),
        mask,
    )


def _noise(
    grid: npt.NDArray[np.uint8], cell: int, d: int, box: tuple[int, int, int, int]
) -> Image.Image:
    """``box`` (x0, y0, cols, rows) of level ``1/d``'s smooth noise: the grid upsampled
    bicubically (a margin of two cells, so blocks meet without a seam)."""
    x0, y0, cols, rows = box
    r0 = max(0, (y0 * d) // cell - 2)
    r1 = min(grid.shape[0], ((y0 + rows) * d) // cell + 3)
    c0 = max(0, (x0 * d) // cell - 2)
    c1 = min(grid.shape[1], ((x0 + cols) * d) // cell + 3)
    patch = Image.fromarray(np.ascontiguousarray(grid[r0:r1, c0:c1]), "L")
    scale = cell / d
    size = (max(1, round(patch.width * scale)), max(1, round(patch.height * scale)))
    up = patch.resize(size, Image.Resampling.BICUBIC)
    left, top = round(x0 - c0 * scale), round(y0 - r0 * scale)
    return up.crop((left, top, left + cols, top + rows))


def render_block(scene: Scene, d: int, box: tuple[int, int, int, int]) -> Image.Image:
    """``box`` (x0, y0, cols, rows, in its pixels) of the level at downsample ``d``."""
    x0, y0, cols, rows = box
    size = (cols, rows)
    mask = Image.new("L", size, 0)
    draw = ImageDraw.Draw(mask)
    for points in scene.polygons:
        xs = [x / d - x0 for x, _ in points]
        ys = [y / d - y0 for _, y in points]
        if max(ys) >= 0 and min(ys) < rows and max(xs) >= 0 and min(xs) < cols:
            draw.polygon(list(zip(xs, ys, strict=True)), fill=255)
    image = Image.new("RGB", size, (243, 243, 241))
    if mask.getbbox() is None:
        return image
    tissue = Image.new("RGB", size, scene.colours["dark"])
    tissue.paste(scene.colours["light"], mask=_noise(scene.coarse, scene.coarse_cell, d, box))
    fibres = _noise(scene.fine, scene.fine_cell, d, box)
    tissue.paste(scene.colours["fibre"], mask=fibres.point(lambda v: 255 if v > 170 else v // 3))
    image.paste(tissue, mask=mask)
    n = scene.nuclei
    reach = float(n.rx.max()) if n.count else 0.0
    lo = int(np.searchsorted(n.y, y0 * d - reach))
    hi = int(np.searchsorted(n.y, (y0 + rows) * d + reach))
    if hi > lo:
        k = np.float32(1 / d)
        scaled = Nuclei(
            n.x[lo:hi] * k, n.y[lo:hi] * k, n.rx[lo:hi] * k, n.ry[lo:hi] * k, n.shade[lo:hi]
        )
        paint_nuclei(image, (x0, y0), scaled, scene.nucleus_colour)
    return image


#: The camera's noise, ± this many grey levels: scanned glass is never flat, and its
#: grain is what makes real slides' JPEG tiles weigh what they do.
GRAIN = 4
_GRAIN_BLOCK = np.random.default_rng(0).integers(0, 2 * GRAIN + 1, (TILE, 1024, 3), np.uint8)


def _add_grain(strip: npt.NDArray[np.uint8]) -> None:
    """Add the camera noise in place (no pixel is within GRAIN of 0 or 255)."""
    rows = strip.shape[0]
    for x0 in range(0, strip.shape[1], 1024):
        part = strip[:, x0 : x0 + 1024]
        part += _GRAIN_BLOCK[:rows, : part.shape[1]]
        part -= np.uint8(GRAIN)


#: Columns rendered at once (a multiple of the tile): what bounds memory on a wide level.
BLOCK = 32 * TILE


def level_tiles(scene: Scene, d: int) -> Iterator[npt.NDArray[np.uint8]]:
    """The tiles of the level at downsample ``d``, row by row, edges padded; rendered a
    block of :data:`BLOCK` × :data:`TILE` pixels at a time."""
    width, height = -(-scene.width // d), -(-scene.height // d)
    for y0 in range(0, height, TILE):
        rows = min(TILE, height - y0)
        for x0 in range(0, width, BLOCK):
            cols = min(BLOCK, width - x0)
            block = np.full((TILE, -(-cols // TILE) * TILE, 3), 243, np.uint8)
            block[:rows, :cols] = np.asarray(render_block(scene, d, (x0, y0, cols, rows)))
            _add_grain(block)
            for tx in range(0, cols, TILE):
                yield block[:, tx : tx + TILE]


def write_large_pyramid(
    scene: Scene, path: Path, smallest: int, threads: int = 2
) -> list[tuple[int, int]]:
    """Write the scene as a tiled JPEG TIFF pyramid (ceil-halved levels); the sizes."""
    import tifffile

    sizes = []
    d = 1
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        while True:
            width, height = -(-scene.width // d), -(-scene.height // d)
            sizes.append((width, height))
            pixels_per_cm = 1e4 / (scene.mpp * d)
            tif.write(
                level_tiles(scene, d),
                shape=(height, width, 3),
                dtype=np.uint8,
                tile=(TILE, TILE),
                compression="jpeg",
                compressionargs={"level": 90},
                photometric="rgb",
                resolution=(pixels_per_cm, pixels_per_cm),
                resolutionunit="CENTIMETER",
                subfiletype=0 if d == 1 else 1,
                description="dpatia SPS simulator full-size slide" if d == 1 else None,
                software="dpatia",
                metadata=None,
                maxworkers=threads,
                buffersize=16 * 2**20,
            )
            if max(width, height) <= smallest:
                break
            d *= 2
    return sizes


def full_specs(specs: list[Any]) -> list[Any]:
    """The scanner-format and generic specs made full size: 100 000 × 80 000 px at
    0.25 µm/px, four fragments, one slide per format (generic TIFF, SVS, DICOM)."""
    chosen: dict[str, Any] = {}
    for spec in specs:
        chosen.setdefault(spec.file_format, spec)
    return [
        evolve(
            spec,
            slide_id=f"full-{fmt}-1",
            width=FULL_WIDTH,
            height=FULL_HEIGHT,
            microns_per_pixel=FULL_MPP,
            blobs=4,
            layout="single",
            stain="H&E",
        )
        for fmt, spec in chosen.items()
    ]


def default_cache() -> Path:
    """Where full-size slides are cached: ``$DPATIA_SLIDE_CACHE``, else
    ``$XDG_CACHE_HOME/dpatia/full-slides`` (``~/.cache/dpatia/full-slides``)."""
    if os.environ.get("DPATIA_SLIDE_CACHE"):
        return Path(os.environ["DPATIA_SLIDE_CACHE"])
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "dpatia" / "full-slides"


def is_large(spec: Any) -> bool:
    """Whether ``spec`` is too big to render whole (more than 64 Mpx)."""
    return spec.width * spec.height > 64 * 2**20


def tissue_truth(scene: Scene) -> tuple[int, float]:
    """Tissue pixels at level 0 (from the 4 µm mask) and mm²."""
    d = SCENE_MASK_DOWNSAMPLE
    pixels = int(scene.mask.sum()) * d * d
    return pixels, pixels * (scene.mpp / 1000) ** 2


__all__ = [
    "FULL_HEIGHT",
    "FULL_MPP",
    "FULL_WIDTH",
    "Scene",
    "build_scene",
    "default_cache",
    "full_specs",
    "is_large",
    "level_tiles",
    "render_block",
    "tissue_truth",
    "write_large_pyramid",
]
