"""DZI level and tile maths (:mod:`dpatia_daemon.pipeline.dzi`): ceil sizes, edge tiles, mpp."""

from __future__ import annotations

import math

import pytest

from dpatia_daemon.pipeline.dzi import DZI, Rect, ceil_div_pow2, max_level


@pytest.mark.parametrize(
    ("width", "height", "expected"),
    [
        (1, 1, 0),
        (2, 1, 1),
        (3, 1, 2),
        (256, 100, 8),
        (257, 100, 9),
        (9001, 6201, 14),
        (87647, 40000, 17),
    ],
)
def test_max_level_is_ceil_log2_of_the_longer_side(width: int, height: int, expected: int) -> None:
    """max_level = ceil(log2(max(W, H))), computed exactly for any size."""
    assert max_level(width, height) == expected
    assert max_level(height, width) == expected
    if max(width, height) > 1:
        assert expected == math.ceil(math.log2(max(width, height)))


def test_level_sizes_round_up() -> None:
    """Each level halves with ceil (43824 for the 87647 example in IA-API.md §2.5)."""
    dzi = DZI(87647, 40000)
    assert dzi.level_size(dzi.max_level) == (87647, 40000)
    assert dzi.level_size(dzi.max_level - 1) == (43824, 20000)
    assert dzi.level_size(dzi.max_level - 2) == (21912, 10000)
    for level in range(dzi.max_level):
        w, h = dzi.level_size(level + 1)
        assert dzi.level_size(level) == (math.ceil(w / 2), math.ceil(h / 2))


def test_level_zero_is_one_by_one_for_any_shape() -> None:
    """The top of the pyramid is 1×1, for square, wide and tall images."""
    for size in [(1, 1), (5000, 7003), (9001, 6201), (1, 300), (4096, 4096)]:
        dzi = DZI(*size)
        assert dzi.level_size(0) == (1, 1)
        assert dzi.level_count == dzi.max_level + 1
        assert dzi.tile_grid(0) == (1, 1)
        assert dzi.tile_rect(0, 0, 0) == Rect(0, 0, 1, 1)


def test_one_pixel_image_has_one_level() -> None:
    """A 1×1 image has a single level whose only tile is 1×1."""
    dzi = DZI(1, 1)
    assert (dzi.max_level, dzi.level_count) == (0, 1)
    assert list(dzi.tiles(0)) == [(0, 0, Rect(0, 0, 1, 1))]


def test_tile_grid_and_edge_tiles_of_a_non_aligned_non_square_image() -> None:
    """A 9001×6201 image: 36×25 tiles at full size, the last column 41 px, the last row 57 px."""
    dzi = DZI(9001, 6201, 256)
    top = dzi.max_level
    assert dzi.tile_grid(top) == (36, 25)
    assert dzi.tile_count(top) == 900
    assert dzi.tile_rect(top, 0, 0) == Rect(0, 0, 256, 256)
    assert dzi.tile_rect(top, 35, 24) == Rect(8960, 6144, 41, 57)
    assert dzi.tile_rect(top, 35, 0).width == 41
    assert dzi.tile_rect(top, 0, 24).height == 57
    # One level down: 4501×3101 → 18×13 tiles, edges 149 and 29 px.
    assert dzi.tile_grid(top - 1) == (18, 13)
    assert dzi.tile_rect(top - 1, 17, 12) == Rect(4352, 3072, 149, 29)


def test_tiles_cover_each_level_exactly_once() -> None:
    """The tiles of every level partition it (overlap 0): their areas add up."""
    dzi = DZI(1000, 333, 128)
    for level in range(dzi.level_count):
        w, h = dzi.level_size(level)
        assert sum(r.width * r.height for _, _, r in dzi.tiles(level)) == w * h


def test_tile_aligned_image_has_full_edge_tiles() -> None:
    """8192×5120 with 256 tiles: every full-resolution tile is 256×256."""
    dzi = DZI(8192, 5120, 256)
    assert {(r.width, r.height) for _, _, r in dzi.tiles(dzi.max_level)} == {(256, 256)}


def test_out_of_range_levels_and_tiles_raise() -> None:
    """Levels and tiles outside the pyramid raise IndexError."""
    dzi = DZI(1000, 500)
    with pytest.raises(IndexError):
        dzi.level_size(dzi.max_level + 1)
    with pytest.raises(IndexError):
        dzi.level_size(-1)
    cols, rows = dzi.tile_grid(dzi.max_level)
    with pytest.raises(IndexError):
        dzi.tile_rect(dzi.max_level, cols, 0)
    with pytest.raises(IndexError):
        dzi.tile_rect(dzi.max_level, 0, rows)


def test_invalid_sizes_are_refused() -> None:
    """Zero sizes, zero tiles and negative overlap are errors."""
    for args in [(0, 10), (10, 0)]:
        with pytest.raises(ValueError):
            DZI(*args)
    with pytest.raises(ValueError):
        DZI(10, 10, tile_size=0)
    with pytest.raises(ValueError):
        DZI(10, 10, overlap=-1)


def test_overlap_extends_tiles_into_neighbours() -> None:
    """With overlap 1 inner tiles grow by one pixel on each side; edges stay cropped."""
    dzi = DZI(600, 300, 256, overlap=1)
    top = dzi.max_level
    assert dzi.tile_rect(top, 0, 0) == Rect(0, 0, 257, 257)
    assert dzi.tile_rect(top, 1, 0) == Rect(255, 0, 258, 257)
    assert dzi.tile_rect(top, 2, 1) == Rect(511, 255, 89, 45)


def test_tile_rect_full_maps_to_full_resolution_and_clips() -> None:
    """A tile's full-resolution rectangle is its rect times the downsample, clipped."""
    dzi = DZI(9001, 6201, 256)
    level = dzi.max_level - 2  # downsample 4
    assert dzi.tile_rect_full(level, 0, 0) == Rect(0, 0, 1024, 1024)
    cols, rows = dzi.tile_grid(level)
    last = dzi.tile_rect_full(level, cols - 1, rows - 1)
    assert (last.right, last.bottom) == (9001, 6201)


def test_mpp_per_level_and_level_for_mpp() -> None:
    """mpp doubles per level down; level_for_mpp picks the coarsest level at least as fine."""
    dzi = DZI(9001, 6201, microns_per_pixel=0.25)
    top = dzi.max_level
    assert dzi.level_mpp(top) == 0.25
    assert dzi.level_mpp(top - 6) == 16.0
    assert dzi.level_for_mpp(16.0) == top - 6
    assert dzi.level_for_mpp(20.0) == top - 6  # 16 is finer than 20; 32 would not be
    assert dzi.level_for_mpp(0.1) == top  # never finer than the scan
    assert dzi.level_for_mpp(1e9) == 0
    assert dzi.level_for_mpp(23.0, mode="nearest") == top - 7  # 32 is nearer 23 than 16 in log2
    assert dzi.level_for_mpp(22.0, mode="nearest") == top - 6


def test_mpp_helpers_need_the_pixel_size() -> None:
    """Without microns_per_pixel the mpp helpers raise ValueError."""
    dzi = DZI(100, 100)
    with pytest.raises(ValueError):
        dzi.level_mpp(1)
    with pytest.raises(ValueError):
        dzi.level_for_mpp(8.0)


def test_level_for_size_picks_the_smallest_level_big_enough() -> None:
    """level_for_size(512) is the first level whose longer side reaches 512."""
    dzi = DZI(9001, 6201)
    level = dzi.level_for_size(512)
    assert max(dzi.level_size(level)) >= 512
    assert max(dzi.level_size(level - 1)) < 512
    assert dzi.level_for_size(10**6) == dzi.max_level


def test_ceil_div_pow2() -> None:
    """ceil(value / 2**shift) without floats."""
    assert [ceil_div_pow2(v, 2) for v in (0, 1, 4, 5, 8)] == [0, 1, 1, 2, 2]
    assert ceil_div_pow2(2**60 + 1, 60) == 2
