"""The slide as an image for any analysis: a WSI level near a resolution, or the thumbnail."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from attrs import frozen
from PIL import Image

from dpatia_daemon.analyses import AnalysisJob
from dpatia_daemon.analyses.images import SlideResolution, choose_level, get_image
from dpatia_daemon.analyses.tissue import TissueSettings


@pytest.mark.parametrize(
    ("dimensions", "downsamples", "mpp", "expected"),
    [
        # 80 000 px at 0.25 µm/px, halving levels: 8 µm/px is level 5 (÷32), as is.
        (
            [(80000 // 2**k, 60000 // 2**k) for k in range(8)],
            [2.0**k for k in range(8)],
            0.25,
            (5, 1),
        ),
        # Levels of ×4 (as in SVS): level 2 (÷16) reduced by 2 more.
        ([(80000, 60000), (20000, 15000), (5000, 3750), (1250, 938)], [1, 4, 16, 64], 0.25, (2, 2)),
        # A small slide: not coarser than min_side (1024) along its longer side.
        ([(2251, 1551), (1126, 776), (563, 388)], [1, 2, 4], 0.5, (1, 1)),
        # Only level 0 of a big slide: reduce it to max_side (4096) at most.
        ([(100000, 50000)], [1.0], 0.25, (0, 32)),
        # No pixel size: a longer side of min_side.
        ([(8192, 4096), (4096, 2048), (2048, 1024), (1024, 512)], [1, 2, 4, 8], None, (3, 1)),
    ],
)
def test_choose_level(
    dimensions: list[tuple[int, int]],
    downsamples: list[float],
    mpp: float | None,
    expected: tuple[int, int],
) -> None:
    """The level read and the reduction after it, within the side bounds (the tissue
    analysis's defaults are the plain resolution's)."""
    assert choose_level(dimensions, downsamples, mpp, TissueSettings()) == expected
    assert choose_level(dimensions, downsamples, mpp, SlideResolution()) == expected


class _Slide:
    """An OpenSlide stand-in of one opaque level."""

    def __init__(self, size: tuple[int, int], mpp: float) -> None:
        self.dimensions = size
        self.level_dimensions = [size]
        self.level_downsamples = [1.0]
        self.properties = {"openslide.mpp-x": str(mpp), "openslide.mpp-y": str(mpp)}
        self.closed = False

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> Any:
        return Image.new("RGBA", size, (200, 130, 180, 255))

    def close(self) -> None:
        self.closed = True


@frozen
class _Job(AnalysisJob):
    """An AnalysisJob whose ``open_slide`` gives a stand-in slide."""

    open_slide: Callable[[], Any] | None = None


def _job(**fields: Any) -> AnalysisJob:
    cls = _Job if "open_slide" in fields else AnalysisJob
    return cls(job_id="j", slide_id="s", input={}, work_dir="/nonexistent", **fields)


def test_a_wsi_is_read_at_the_wanted_resolution_and_closed() -> None:
    """2 µm/px at 1 µm/px: reduced by 2, its pixel size and mapping to level 0 said;
    progress reaches the whole; the slide is closed."""
    slide = _Slide((3000, 2000), mpp=1.0)
    fractions: list[float] = []
    image = get_image(
        _job(open_slide=lambda: slide),
        SlideResolution(target_mpp=2.0, min_side=16),
        progress=fractions.append,
    )
    assert image.rgb.shape == (1000, 1500, 3)
    assert image.downsample == (2.0, 2.0)
    assert (image.image_width, image.mpp) == (3000, 1.0)
    assert image.source == "WSI level 0 ÷ 2"
    assert fractions and fractions[-1] == 1.0
    assert slide.closed


def test_without_a_slide_file_the_thumbnail_is_used(tmp_path: Path) -> None:
    """No WSI: the thumbnail, reduced to max_side, mapped to the slide's size."""
    path = tmp_path / "thumbnail.png"
    Image.fromarray(np.full((300, 400, 3), 240, np.uint8)).save(path)
    job = _job(
        thumbnail_path=str(path),
        slide_info={"imageSize": {"width": 4000, "height": 3000}, "micronsPerPixel": 0.5},
    )
    image = get_image(job, SlideResolution(max_side=200))
    assert image.source == "thumbnail"
    assert image.rgb.shape == (150, 200, 3)
    assert image.downsample == (20.0, 20.0)
    assert (image.image_width, image.mpp) == (4000, 0.5)


def test_with_neither_the_error_says_why() -> None:
    """No thumbnail and no WSI: a LookupError naming why the WSI could not be opened."""
    with pytest.raises(LookupError, match="the WSI cannot be opened .NoSlideFile"):
        get_image(_job(), SlideResolution())
