"""The simulator's scanner formats: an Aperio SVS and a DICOM WSI series, served by the
fake SPS, downloaded by the pipeline over loopback, opened by OpenSlide as their vendor,
and analysed as accurately as the generic TIFF."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import openslide
import pytest
import pytest_twisted
from twisted.internet.defer import maybeDeferred
from twisted.internet.threads import deferToThread, deferToThreadPool
from twisted.python.filepath import FilePath
from twisted.web.server import Site

from dpatia_daemon.analyses import AnalysisJob
from dpatia_daemon.analyses.nuclei import analyse as nuclei
from dpatia_daemon.analyses.tissue import analyse as tissue
from dpatia_daemon.jobs import Callback
from dpatia_daemon.pipeline.download import download_files
from dpatia_daemon.simulator.fake import BASE_PATH, FakeSPS
from dpatia_daemon.simulator.slides import GeneratedSlide, SlideSet, load_or_generate, scanner_specs
from dpatia_daemon.sps.client import SPSClient, make_http_client

VENDORS = {"sim-svs-1": "aperio", "sim-dicom-1": "dicom"}


@pytest.fixture(scope="module")
def slide_set(tmp_path_factory: pytest.TempPathFactory) -> SlideSet:
    """The two scanner-format slides, small."""
    return load_or_generate(tmp_path_factory.mktemp("scanner") / "slides", scanner_specs(0.2))


def test_each_format_opens_as_its_vendor_with_the_same_pixels(slide_set: SlideSet) -> None:
    """OpenSlide sees the vendor, the pyramid, the pixel size and the label; level 0
    matches the generic TIFF the tiles are served from (within JPEG noise)."""
    for slide in slide_set.slides:
        path = str(slide_set.path(slide.files[0][1]))
        assert openslide.OpenSlide.detect_format(path) == VENDORS[slide.slide_id]
        with (
            openslide.OpenSlide(path) as osr,
            openslide.OpenSlide(str(slide_set.path(slide.tiff))) as generic,
        ):
            assert osr.level_dimensions == generic.level_dimensions
            assert float(osr.properties["openslide.mpp-x"]) == pytest.approx(0.5)
            assert "label" in osr.associated_images
            size = (400, 300)
            a = np.asarray(osr.read_region((200, 200), 0, size).convert("RGB"), dtype=int)
            b = np.asarray(generic.read_region((200, 200), 0, size).convert("RGB"), dtype=int)
            assert np.abs(a - b).mean() < 2


def test_the_dicom_series_is_one_file_per_level_and_the_label(slide_set: SlideSet) -> None:
    """Served as multipart: every level and the label, each its own .dcm."""
    slide = slide_set.get("sim-dicom-1")
    names = [name for name, _ in slide.files]
    levels = len(slide.truth["pyramid"])
    assert names == [f"sim-dicom-1-level-{i}.dcm" for i in range(levels)] + [
        "sim-dicom-1-label.dcm"
    ]
    assert slide.layout == "folder" and slide.info["fileFormat"]["mimeType"] == "application/dicom"


def _threads(reactor: Any) -> Any:
    return lambda f, *args: deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)


async def _download(
    reactor: Any, slide: GeneratedSlide, slide_set: SlideSet, folder: Path
) -> list[str]:
    fake = FakeSPS(clock=reactor)
    fake.add_slide(slide.slide_id).file_paths = [
        (name, slide_set.path(path)) for name, path in slide.files
    ]
    fake.tokens.add("t")
    port = reactor.listenTCP(0, Site(fake.resource()), interface="127.0.0.1")
    http = make_http_client(reactor)
    client = SPSClient(http=http.client, clock=reactor, software_version="1", timeout=10)
    callback = Callback(f"http://127.0.0.1:{port.getHost().port}{BASE_PATH}", "t")
    try:
        files = await download_files(
            client,
            callback,
            slide.slide_id,
            FilePath(str(folder)),
            clock=reactor,
            run_blocking=_threads(reactor),
        )
    finally:
        await http.close()
        await maybeDeferred(port.stopListening)
    return [f.path for f in files]


@pytest.mark.integration
@pytest.mark.parametrize("slide_id", sorted(VENDORS))
@pytest_twisted.ensureDeferred
async def test_downloaded_and_analysed_as_accurately_as_the_generic_tiff(
    reactor: Any, slide_set: SlideSet, slide_id: str, tmp_path: Path
) -> None:
    """The pipeline's download keeps every file byte for byte under its name; the tissue
    area is within 5 % and the nuclei count within 10 % of the ground truth."""
    slide = slide_set.get(slide_id)
    files = await _download(reactor, slide, slide_set, tmp_path / "wsi")
    assert [Path(f).name for f in files] == [name for name, _ in slide.files]
    for path, (_, source) in zip(files, slide.files, strict=True):
        assert Path(path).read_bytes() == slide_set.path(source).read_bytes()
    job = AnalysisJob(
        job_id="j",
        slide_id=slide_id,
        input={"type": "wholeSlide"},
        work_dir=str(tmp_path),
        slide_info=slide.info,
        files=tuple(files),
    )
    area = (await deferToThread(tissue, job)).context["tissue"]["areaMm2"]
    assert area == pytest.approx(slide.truth["tissueAreaMm2"], rel=0.05)
    count = (await deferToThread(nuclei, job)).context["nuclei"]["count"]
    assert count == pytest.approx(slide.truth["nuclei"], rel=0.1)
