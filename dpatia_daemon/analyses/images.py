"""The slide as an image, for any analysis: a WSI level near a resolution, or the thumbnail.

:func:`get_image` gives an analysis the whole slide at about ``target_mpp`` µm per
pixel, its longer side kept within ``[min_side, max_side]``: read from the downloaded
WSI with OpenSlide (:func:`read_slide`, in bounded memory), or, when there is no file
it can open, the pipeline's thumbnail (:func:`read_thumbnail`).  The result, an
:class:`AnalysisImage`, says how its pixels map to level 0 and how big they are, so
areas and width-normalised coordinates come out right whichever source it was.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
from attrs import frozen
from PIL import Image

from . import AnalysisJob


class Resolution(Protocol):
    """The image an analysis wants: about ``target_mpp`` µm per pixel, its longer side
    within ``[min_side, max_side]`` pixels (:class:`SlideResolution`, or any settings
    with these three, such as the tissue analysis's)."""

    @property
    def target_mpp(self) -> float: ...

    @property
    def min_side(self) -> int: ...

    @property
    def max_side(self) -> int: ...


@frozen
class SlideResolution:
    """A :class:`Resolution` for an analysis of one's own: ``get_image(job,
    SlideResolution(target_mpp=4))``."""

    target_mpp: float = 8.0
    min_side: int = 1024
    max_side: int = 4096


def _nothing() -> None:
    return None


@frozen
class AnalysisImage:
    """An image of the whole slide to analyse and how it maps to level 0.

    ``downsample`` is level-0 pixels per image pixel along x and y; ``image_width``
    the level-0 width; ``mpp`` the level-0 pixel size in µm if known; ``source`` a
    short description for the result ("WSI level 2", "thumbnail").
    """

    rgb: npt.NDArray[np.uint8]
    downsample: tuple[float, float]
    image_width: int
    mpp: float | None
    source: str


def choose_level(
    level_dimensions: Sequence[tuple[int, int]],
    level_downsamples: Sequence[float],
    mpp: float | None,
    resolution: Resolution,
) -> tuple[int, int]:
    """The pyramid level to read and the integer factor to reduce it by.

    The wanted downsample is ``target_mpp / mpp`` (or the one giving a longer side of
    ``min_side`` without a pixel size), then bounded so the image's longer side lies
    in ``[min_side, max_side]`` where the slide allows.  The level is the coarsest at
    least that fine; the factor brings it to the wanted downsample (never coarser).
    """
    width, height = level_dimensions[0]
    longer = max(width, height)
    wanted = resolution.target_mpp / mpp if mpp else longer / resolution.min_side
    wanted = min(wanted, longer / resolution.min_side)
    wanted = max(wanted, longer / resolution.max_side, 1.0)
    level = 0
    for index, downsample in enumerate(level_downsamples):
        if downsample <= wanted * 1.001 and downsample >= level_downsamples[level]:
            level = index
    factor = max(1, math.floor(wanted / level_downsamples[level] + 1e-6))
    return level, factor


def read_slide(
    slide: Any,
    resolution: Resolution,
    *,
    fallback_mpp: float | None = None,
    checkpoint: Callable[[], None] = _nothing,
    progress: Callable[[float], None] = lambda fraction: None,
) -> AnalysisImage:
    """Read a low-resolution image of an OpenSlide slide, in bounded memory.

    The level comes from :func:`choose_level`; it is read in chunks that are reduced
    (box filter) and composited on white as they come, so a sparse pyramid never
    makes a whole fine level sit in memory.
    """
    mpp = _openslide_mpp(slide) or fallback_mpp
    level, factor = choose_level(
        list(slide.level_dimensions), list(slide.level_downsamples), mpp, resolution
    )
    level_width, level_height = slide.level_dimensions[level]
    level_downsample = float(slide.level_downsamples[level])
    out_width, out_height = math.ceil(level_width / factor), math.ceil(level_height / factor)
    canvas = Image.new("RGB", (out_width, out_height), (255, 255, 255))
    chunk = 256 * factor  # level pixels per chunk side; a multiple of the factor
    rows = range(0, level_height, chunk)
    for row_number, y in enumerate(rows):
        checkpoint()
        for x in range(0, level_width, chunk):
            size = (min(chunk, level_width - x), min(chunk, level_height - y))
            location = (round(x * level_downsample), round(y * level_downsample))
            region = slide.read_region(location, level, size)
            # Transparent pixels are outside the scanned area: glass, i.e. white.
            # Composite before reducing, or their (0, 0, 0) would darken the edges.
            opaque = Image.new("RGB", size, (255, 255, 255))
            opaque.paste(region.convert("RGB"), (0, 0), region.getchannel("A"))
            canvas.paste(
                opaque.reduce(factor) if factor > 1 else opaque, (x // factor, y // factor)
            )
        progress((row_number + 1) / len(rows))
    width, height = slide.dimensions
    return AnalysisImage(
        rgb=np.asarray(canvas),
        downsample=(width / out_width, height / out_height),
        image_width=int(width),
        mpp=mpp,
        source=f"WSI level {level}" + (f" ÷ {factor}" if factor > 1 else ""),
    )


def _openslide_mpp(slide: Any) -> float | None:
    """The geometric mean of ``openslide.mpp-x`` and ``-y``, if both are usable."""
    try:
        mx = float(slide.properties["openslide.mpp-x"])
        my = float(slide.properties["openslide.mpp-y"])
    except (KeyError, TypeError, ValueError):
        return None
    return math.sqrt(mx * my) if mx > 0 and my > 0 and math.isfinite(mx * my) else None


def read_thumbnail(
    path: str,
    image_size: tuple[int, int] | None,
    mpp: float | None,
    resolution: Resolution,
) -> AnalysisImage:
    """Read the pipeline's thumbnail; reduce it if its longer side exceeds ``max_side``.

    Without the slide's ``image_size`` the thumbnail is taken as level 0 (coordinates
    stay right, being width-normalised, but the pixel size and so areas are unknown).
    """
    with Image.open(path) as opened:
        image = opened.convert("RGBA") if "A" in opened.getbands() else opened.convert("RGB")
    factor = math.ceil(max(image.size) / resolution.max_side)
    if factor > 1:
        image = image.reduce(factor)
    rgb = np.asarray(image)
    thumb_width, thumb_height = image.size
    if image_size is None:
        return AnalysisImage(
            rgb=rgb, downsample=(1.0, 1.0), image_width=thumb_width, mpp=None, source="thumbnail"
        )
    width, height = image_size
    return AnalysisImage(
        rgb=rgb,
        downsample=(width / thumb_width, height / thumb_height),
        image_width=width,
        mpp=mpp,
        source="thumbnail",
    )


def _info_mpp(info: Mapping[str, Any] | None) -> float | None:
    """``micronsPerPixel`` from slide info, if usable."""
    try:
        mpp = float((info or {})["micronsPerPixel"])
    except (KeyError, TypeError, ValueError):
        return None
    return mpp if mpp > 0 and math.isfinite(mpp) else None


def get_image(
    job: AnalysisJob,
    resolution: Resolution,
    *,
    progress: Callable[[float], None] = lambda fraction: None,
) -> AnalysisImage:
    """The image to analyse: a WSI level if the job has a WSI, else its thumbnail.

    The pipeline gives jobs ``open_slide()`` (raising when there is no WSI) and
    ``thumbnail_path``; both are looked up defensively so any job object works.
    Reading a WSI checks for cancellation between chunks and calls ``progress`` with
    the fraction read.
    """
    info_mpp = _info_mpp(job.slide_info)
    why_not_wsi = "the job offers no WSI"
    open_slide = getattr(job, "open_slide", None)
    if callable(open_slide):
        try:
            slide = open_slide()
        except Exception as e:  # whatever the reason (no WSI, unreadable), try the thumbnail
            why_not_wsi = f"the WSI cannot be opened ({type(e).__name__}: {e})"
        else:
            try:
                return read_slide(
                    slide,
                    resolution,
                    fallback_mpp=info_mpp,
                    checkpoint=job.check_cancelled,
                    progress=progress,
                )
            finally:
                close = getattr(slide, "close", None)
                if callable(close):
                    close()
    thumbnail_path = getattr(job, "thumbnail_path", None)
    if thumbnail_path:
        return read_thumbnail(str(thumbnail_path), job.image_size, info_mpp, resolution)
    raise LookupError(f"no thumbnail and no WSI to analyse ({why_not_wsi})")


# --- the analysis ---------------------------------------------------------------------


__all__ = [
    "AnalysisImage",
    "Resolution",
    "SlideResolution",
    "choose_level",
    "get_image",
    "read_slide",
    "read_thumbnail",
]
