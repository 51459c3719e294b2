"""Thumbnail from DZI tiles and the label image (:mod:`dpatia_daemon.pipeline.thumbnail`).

The SPS is the fake (or a small resource) in memory through ``RequestTraversalAgent``;
tiles are cut from a synthetic numpy image with :mod:`dpatia_daemon.pipeline.dzi` and Pillow, so
the assembled thumbnail can be compared with a plain downscale of the source.  One test
uses the simulator's generated pyramidal TIFF.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
from attrs import define, field
from conftest import failure_result_of, no_result, success_result_of
from PIL import Image, ImageDraw
from treq.client import HTTPClient
from treq.testing import RequestTraversalAgent
from twisted.internet.defer import Deferred, ensureDeferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.python.filepath import FilePath
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from dpatia_daemon.jobs import Callback
from dpatia_daemon.pipeline.dzi import DZI
from dpatia_daemon.pipeline.thumbnail import (
    Thumbnail,
    fetch_label,
    fetch_thumbnail,
    image_extension,
    plan_thumbnail,
    save_bytes,
    save_image,
)
from dpatia_daemon.simulator.fake import BASE_PATH, FakeSPS
from dpatia_daemon.sps.client import SPSClient, SPSUnauthorized

SLIDE = "slide-1"
BASE = "http://sps.test" + BASE_PATH


def inline(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
    """run_blocking for unit tests: run at once, on this thread."""
    return maybeDeferred(f, *args)


# --- a synthetic slide -----------------------------------------------------------------------


def synthetic(width: int = 3001, height: int = 1703, seed: int = 7) -> Image.Image:
    """An RGB image with a gradient, noise-free shapes and sharp edges."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack(
        [(x * 255 // width), (y * 255 // height), ((x + y) * 255 // (width + height))], axis=-1
    ).astype(np.uint8)
    image = Image.fromarray(rgb, "RGB")
    draw = ImageDraw.Draw(image)
    rng = np.random.default_rng(seed)
    for _ in range(25):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        size = int(rng.integers(max(2, width // 50), max(3, width // 7)))
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        if rng.random() < 0.5:
            draw.ellipse((x0, y0, x0 + size, y0 + size // 2), fill=colour)
        else:
            draw.rectangle((x0, y0, x0 + size // 2, y0 + size), fill=colour)
    return image


def tile_source(
    source: Image.Image,
    dzi: DZI,
    *,
    fmt: str = "JPEG",
    full_size_edges: bool = False,
    mode: str = "RGB",
) -> Callable[[int, int, int], bytes | None]:
    """A FakeSPS ``tiles`` callable cutting DZI tiles from ``source``."""

    def tile(level: int, col: int, row: int) -> bytes | None:
        try:
            rect = dzi.tile_rect(level, col, row)
        except IndexError:
            return None
        full = dzi.tile_rect_full(level, col, row)
        region = source.crop((full.x, full.y, full.right, full.bottom))
        region = region.resize((rect.width, rect.height), Image.Resampling.BOX)
        if full_size_edges:
            padded = Image.new("RGB", (dzi.tile_size, dzi.tile_size), (0, 0, 0))
            padded.paste(region, (0, 0))
            region = padded
        out = io.BytesIO()
        region.convert(mode).save(out, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        return out.getvalue()

    return tile


def info_for(width: int, height: int, **overrides: Any) -> dict[str, Any]:
    info: dict[str, Any] = {
        "imageSize": {"width": width, "height": height},
        "tileSize": {"width": 128, "height": 128},
        "micronsPerPixel": 4.0,
        "focalPlanes": [{"id": "0", "offsetUm": 0.0}],
        "availableTileFormats": [{"mimeType": "image/jpeg", "extension": "jpg"}],
    }
    info.update(overrides)
    return {k: v for k, v in info.items() if v is not None}


def mean_abs_error(a: Image.Image, b: Image.Image) -> float:
    assert a.size == b.size
    return float(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).mean())


@define
class Env:
    fake: FakeSPS
    agent: RequestTraversalAgent
    client: SPSClient
    callback: Callback


def make_env(resource: Resource | None = None, fake: FakeSPS | None = None) -> Env:
    fake = fake or FakeSPS()
    agent = RequestTraversalAgent(resource if resource is not None else fake.resource())
    client = SPSClient(
        http=HTTPClient(agent), clock=Clock(), software_version="1", retries=0, random=lambda: 0.5
    )
    return Env(fake, agent, client, Callback(BASE, fake.issue_token()))


def thumbnail(env: Env, info: dict[str, Any], **kwargs: Any) -> Deferred[Thumbnail | None]:
    kwargs.setdefault("run_blocking", inline)
    return ensureDeferred(fetch_thumbnail(env.client, env.callback, SLIDE, info, **kwargs))


def tile_paths(fake: FakeSPS) -> list[str]:
    return [r.path.rsplit("/", 2)[-2] + "/" + r.path.rsplit("/", 1)[-1] for r in fake.requests]


# --- planning -------------------------------------------------------------------------------


def test_plan_by_mpp_never_coarser_than_asked() -> None:
    """With micronsPerPixel: the coarsest level at least as fine as the target."""
    info = info_for(100_000, 80_000, micronsPerPixel=0.25, tileSize={"width": 256})
    plan = plan_thumbnail(info, target_mpp=16.0)
    assert plan.downsample == 64 and plan.mpp == 16.0
    assert plan.size == (1563, 1250)
    plan = plan_thumbnail(info_for(100_000, 80_000, micronsPerPixel=0.2527), target_mpp=16.0)
    assert plan.downsample == 32 and plan.mpp is not None and plan.mpp <= 16.0


def test_plan_capped_by_max_side() -> None:
    """A target finer than max_side allows gives a coarser level (bounded memory)."""
    plan = plan_thumbnail(
        info_for(200_000, 100_000, micronsPerPixel=0.25), target_mpp=1.0, max_side=4096
    )
    assert max(plan.size) <= 4096 and max(plan.dzi.level_size(plan.level + 1)) > 4096


def test_plan_without_mpp_by_size() -> None:
    """Without micronsPerPixel: the finest level whose longer side is at most 2048."""
    plan = plan_thumbnail(info_for(100_000, 30_000, micronsPerPixel=None))
    assert plan.mpp is None
    assert max(plan.size) <= 2048 < max(plan.dzi.level_size(plan.level + 1))


@pytest.mark.parametrize(
    ("formats", "ext"),
    [
        ([{"extension": "png"}, {"extension": "jpg"}], "jpg"),
        ([{"extension": "JPEG"}, {"extension": "png"}], "jpeg"),
        ([{"extension": "png"}], "png"),
        ([{"extension": "jp2"}], "jpg"),
        ([], "jpg"),
        (None, "jpg"),
    ],
)
def test_plan_tile_format(formats: Any, ext: str) -> None:
    """jpg, then jpeg, then png among availableTileFormats; jpg by default."""
    assert plan_thumbnail(info_for(1000, 1000, availableTileFormats=formats)).ext == ext


def test_plan_focal_plane() -> None:
    """focalPlanes[0].id when present, else no focal plane."""
    assert plan_thumbnail(info_for(10, 10)).focal_plane == "0"
    assert plan_thumbnail(info_for(10, 10, focalPlanes=[{"id": 3}])).focal_plane == "3"
    assert plan_thumbnail(info_for(10, 10, focalPlanes=None)).focal_plane is None
    assert plan_thumbnail(info_for(10, 10, focalPlanes=[])).focal_plane is None


def test_plan_optical_path() -> None:
    """The first optical path of a multichannel slide; none for one path, or none."""
    channels = [{"id": "dapi", "description": "DAPI"}, {"id": "fitc", "description": "FITC"}]
    assert plan_thumbnail(info_for(10, 10, opticalPaths=channels)).optical_path == "dapi"
    one = [{"id": "0", "description": "Brightfield"}]
    assert plan_thumbnail(info_for(10, 10, opticalPaths=one)).optical_path is None
    assert plan_thumbnail(info_for(10, 10)).optical_path is None


# --- fetching -------------------------------------------------------------------------------


def test_thumbnail_equals_downscale_of_source() -> None:
    """The assembled thumbnail matches the source downscaled to the level's size
    (JPEG tiles: small mean error), with non-square size and cropped edge tiles."""
    source = synthetic()
    info = info_for(*source.size)
    dzi = DZI(*source.size, 128, microns_per_pixel=4.0)
    env = make_env()
    env.fake.add_slide(SLIDE, tiles=tile_source(source, dzi))
    result = success_result_of(thumbnail(env, info, target_mpp=16.0))
    assert isinstance(result, Thumbnail)
    assert result.downsample == 4 and result.mpp == 16.0
    assert result.image.size == (751, 426) == dzi.level_size(result.level)
    expected = source.resize(result.image.size, Image.Resampling.BOX)
    assert mean_abs_error(result.image, expected) < 3.0
    cols, rows = dzi.tile_grid(result.level)
    assert len(env.fake.requests) == cols * rows == 24
    assert all(p.endswith("_0.jpg") for p in tile_paths(env.fake))


def test_a_multichannel_thumbnail_names_its_optical_path() -> None:
    """Every tile of a multichannel slide's thumbnail is asked for with ?opticalPath= of
    its first channel (IA-API.md §2.5)."""
    source = synthetic(256, 128)
    channels = [{"id": "DAPI", "description": "DAPI"}, {"id": "FITC", "description": "F"}]
    info = info_for(*source.size, opticalPaths=channels)
    dzi = DZI(*source.size, 128, microns_per_pixel=4.0)
    env = make_env()
    env.fake.add_slide(SLIDE, tiles=tile_source(source, dzi))
    result = success_result_of(thumbnail(env, info, target_mpp=16.0))
    assert isinstance(result, Thumbnail)
    assert env.fake.requests
    assert all(r.query.get("opticalPath") == ["DAPI"] for r in env.fake.requests)


def test_full_size_edge_tiles_are_cropped() -> None:
    """Edge tiles sent padded to the full tile size are cropped (PNG: near-exact); tiles
    in other modes (RGBA) are converted."""
    source = synthetic(1000, 700)
    dzi = DZI(1000, 700, 128, microns_per_pixel=4.0)
    env = make_env()
    env.fake.add_slide(
        SLIDE, tiles=tile_source(source, dzi, fmt="PNG", full_size_edges=True, mode="RGBA")
    )
    info = info_for(1000, 700, availableTileFormats=[{"extension": "png"}], focalPlanes=None)
    result = success_result_of(thumbnail(env, info, target_mpp=8.0))
    assert result is not None and result.image.size == (500, 350) and result.image.mode == "RGB"
    assert mean_abs_error(result.image, source.resize((500, 350), Image.Resampling.BOX)) < 0.5
    assert all(re.fullmatch(r"\d+/\d+_\d+\.png", p) for p in tile_paths(env.fake))


@define(eq=False)
class Held(Resource):
    """Holds every tile request until released; records how many are open at once."""

    tile: bytes
    open: list[IRequest] = field(factory=list)
    peak: int = 0
    isLeaf = True

    def __attrs_post_init__(self) -> None:
        Resource.__init__(self)

    def render_GET(self, request: IRequest) -> Any:
        self.open.append(request)
        self.peak = max(self.peak, len(self.open))
        return NOT_DONE_YET

    def release(self, status: int = 200) -> None:
        request = self.open.pop(0)
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"image/png")
        request.write(self.tile)
        request.finish()


def test_concurrency_is_bounded() -> None:
    """No more than `concurrency` tile requests are in flight at once."""
    out = io.BytesIO()
    Image.new("RGB", (128, 128), (1, 2, 3)).save(out, "PNG")
    held = Held(out.getvalue())
    env = make_env(held)
    info = info_for(1280, 1280, micronsPerPixel=1.0, availableTileFormats=[{"extension": "png"}])
    d = thumbnail(env, info, target_mpp=1.0, concurrency=3)
    released = 0
    while held.open or released == 0:
        env.agent.flush()
        assert held.peak <= 3
        if held.open:
            held.release()
            released += 1
            env.agent.flush()
    result = success_result_of(d)
    assert released == 100 and held.peak == 3
    assert result is not None and result.image.getpixel((1279, 1279)) == (1, 2, 3)


def test_missing_tile_gives_none_with_warning() -> None:
    """A 404 tile means no thumbnail (one warning), and the tiles not yet requested are
    not requested at all."""
    held = Held(b"")
    env = make_env(held)
    d = thumbnail(env, info_for(1280, 1280, micronsPerPixel=1.0), target_mpp=1.0, concurrency=2)
    env.agent.flush()
    assert len(held.open) == 2
    with capturedLogs() as events:
        held.release(status=404)
        env.agent.flush()
        assert success_result_of(d) is None
    warnings = [e for e in events if e["log_level"].name == "warn"]
    assert len(warnings) == 1 and warnings[0]["slide_id"] == SLIDE
    assert "404" in warnings[0]["reason"]
    assert len(held.open) + 1 <= 3  # of 100 tiles


def test_tiles_not_served_gives_none() -> None:
    """A slide whose tiles are not served at all: None, not an exception."""
    env = make_env()
    env.fake.add_slide(SLIDE)
    assert success_result_of(thumbnail(env, info_for(5000, 5000))) is None


def test_undecodable_tile_gives_none() -> None:
    """Tile bytes that are not an image: None with a warning."""
    env = make_env()
    env.fake.add_slide(SLIDE, tiles=lambda lv, c, r: b"not an image")
    with capturedLogs() as events:
        assert success_result_of(thumbnail(env, info_for(300, 300))) is None
    assert any(e["log_level"].name == "warn" for e in events)


def test_info_without_size_gives_none_without_requests() -> None:
    """Slide info without imageSize: None with a warning, no tile requested."""
    env = make_env()
    env.fake.add_slide(SLIDE)
    with capturedLogs() as events:
        assert success_result_of(thumbnail(env, {"micronsPerPixel": 0.25})) is None
    assert env.fake.requests == []
    assert any("imageSize" in e.get("reason", "") for e in events)


def test_rejected_token_is_raised() -> None:
    """A 401 is the job's problem: raised, not a missing thumbnail."""
    env = make_env()
    env.fake.add_slide(SLIDE, tiles=lambda lv, c, r: b"x")
    env.callback = Callback(BASE, "wrong")
    failure_result_of(thumbnail(env, info_for(300, 300)), SPSUnauthorized)
    failure_result_of(ensureDeferred(fetch_label(env.client, env.callback, SLIDE)), SPSUnauthorized)


def test_cancel_cancels_tile_requests() -> None:
    """Cancelling the thumbnail cancels the requests in flight."""
    held = Held(b"")
    env = make_env(held)
    d = thumbnail(env, info_for(1280, 1280, micronsPerPixel=1.0), target_mpp=1.0, concurrency=4)
    env.agent.flush()
    no_result(d)
    assert len(held.open) == 4
    d.cancel()
    failure_result_of(d)
    env.agent.flush()
    assert len(held.open) == 4  # no tile was started after the cancel
    assert all(r._disconnected for r in held.open)  # type: ignore[attr-defined]


# --- label ----------------------------------------------------------------------------------


def test_label_bytes_and_204() -> None:
    """The label's bytes as sent; 204 (no label) is None without a warning."""
    env = make_env()
    env.fake.add_slide(SLIDE, label=b"\xff\xd8\xffLABEL")
    env.fake.add_slide("no-label")
    assert success_result_of(ensureDeferred(fetch_label(env.client, env.callback, SLIDE))) == (
        b"\xff\xd8\xffLABEL"
    )
    with capturedLogs() as events:
        none = ensureDeferred(fetch_label(env.client, env.callback, "no-label"))
        assert success_result_of(none) is None
    assert not [e for e in events if e["log_level"].name == "warn"]


def test_label_error_is_none_with_warning() -> None:
    """A 404 (or another SPS error) is None with a warning."""
    env = make_env()
    env.fake.fail_next = [500]
    with capturedLogs() as events:
        assert success_result_of(ensureDeferred(fetch_label(env.client, env.callback, "x"))) is None
    assert [e["status"] for e in events if e["log_level"].name == "warn"] == [500]
    with capturedLogs() as events:
        assert success_result_of(ensureDeferred(fetch_label(env.client, env.callback, "x"))) is None
    assert [e["status"] for e in events if e["log_level"].name == "warn"] == [404]


# --- saving ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["thumbnail.png", "thumbnail.jpg", "t.JPEG"])
def test_save_image(tmp_path: Path, name: str) -> None:
    """Saved atomically by extension; no temporary file left behind."""
    image = synthetic(300, 200)
    path = FilePath(str(tmp_path)).child(name)
    success_result_of(ensureDeferred(save_image(image, path, run_blocking=inline)))
    with Image.open(path.path) as saved:
        assert saved.size == (300, 200)
        assert mean_abs_error(saved.convert("RGB"), image) < 3.0
    assert [p.name for p in tmp_path.iterdir()] == [name]


def test_save_image_unknown_extension(tmp_path: Path) -> None:
    """An extension we cannot encode is a ValueError, nothing written."""
    path = FilePath(str(tmp_path)).child("t.webp2")
    failure_result_of(
        ensureDeferred(save_image(synthetic(10, 10), path, run_blocking=inline)), ValueError
    )
    assert list(tmp_path.iterdir()) == []


def test_save_bytes_and_extension(tmp_path: Path) -> None:
    """A label is saved as sent, its extension sniffed from its bytes."""
    out = io.BytesIO()
    synthetic(20, 10).save(out, "PNG")
    data = out.getvalue()
    assert image_extension(data) == ".png"
    assert image_extension(b"\xff\xd8\xff\xe0") == ".jpg"
    assert image_extension(b"II*\x00") == ".tiff"
    assert image_extension(b"???") == ".bin"
    path = FilePath(str(tmp_path)).child("label" + image_extension(data))
    success_result_of(ensureDeferred(save_bytes(data, path, run_blocking=inline)))
    assert path.getContent() == data


# --- against the simulator's generated pyramidal TIFF ---------------------------------------


def test_thumbnail_of_generated_pyramid(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Against the simulator serving a real generated pyramidal TIFF: the thumbnail
    matches the full-resolution image downscaled to the same size."""
    from dpatia_daemon.simulator.testing import memory_simulator, small_slide_set

    slide_set = small_slide_set(tmp_path_factory.getbasetemp() / "sps-slides")
    simulator = memory_simulator(slide_set)
    try:
        generated = slide_set.slides[0]
        info = generated.info
        agent = RequestTraversalAgent(simulator.resource())
        client = SPSClient(http=HTTPClient(agent), clock=Clock(), software_version="1", retries=0)
        callback = Callback(BASE, simulator.sps.issue_token())
        mpp = info["micronsPerPixel"]
        d = ensureDeferred(
            fetch_thumbnail(
                client, callback, generated.slide_id, info, run_blocking=inline, target_mpp=mpp * 8
            )
        )
        for _ in range(100):
            agent.flush()
        result = success_result_of(d)
        assert result is not None and result.downsample == 8
        full = Image.fromarray(tifffile.imread(str(slide_set.path(generated.tiff)), key=0))
        expected = full.convert("RGB").resize(result.image.size, Image.Resampling.BOX)
        assert mean_abs_error(result.image, expected) < 4.0
    finally:
        simulator.tiles.close()
