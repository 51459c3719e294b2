"""The steps a worker takes before the analysis: what the slide is and what it looks like.

Per job, in the job's work folder (named by a hash of the slide, never by PHI), on the
worker's reactor so AMP stays responsive:

1. **metadata**: ``slides/{id}/info?scope=extended`` (``includePHI=true`` only with
   ``[app] include_phi``), stored as ``slide_info.json`` (0600); beside it the case's
   slides (``slides/{id}/request/images/info``, IA-API 1.9, PHI likewise only with
   ``include_phi``) as ``case_info.json``, where the SPS has case lists (a warning,
   never a failure, where it has not);
2. **thumbnail**: the DZI level nearest ``[pipeline] thumbnail_mpp``, tiles fetched
   ``tile_concurrency`` at a time and assembled (``thumbnail.png``);
3. **label**: ``slides/{id}/label`` (``label.<ext>``; 204 means there is none);
4. **WSI files**: ``slides/{id}/files`` streamed into ``wsi/`` with bounded memory,
   resumable (``[pipeline] download_wsi``).

A thumbnail or label that cannot be had is a warning, not a failure: the analysis gets
none and decides.  Metadata and the WSI are required when asked for: their failure
fails the attempt (the daemon retries it).  A rejected token (once the fallbacks of
:mod:`dpatia_daemon.sps.tokens` are spent) fails the attempt at once.
Progress: these steps report 0–60 %; the analysis's own 0–100 % is shown as 60–100 %.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

from attrs import frozen
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.filepath import FilePath

from ..jobs import Job
from ..sps.client import SPSClient, SPSError, SPSUnauthorized
from ..sps.info import CASE_LISTS, SPSVersions
from ..workers.workfolder import (
    CASE_INFO_FILE,
    LABEL_STEM,
    SLIDE_INFO_FILE,
    THUMBNAIL_FILE,
    WSI_DIR,
)
from .download import RunBlocking, download_files
from .settings import PipelineSettings
from .thumbnail import fetch_label, fetch_thumbnail, image_extension, save_bytes, save_image

log = Logger()


#: Share of the progress bar taken by the steps before the analysis.
PREPARE_SHARE = 60


@frozen
class Prepared:
    """What the steps produced, as local paths (None where there is none)."""

    slide_info: dict[str, Any] | None
    thumbnail_path: str | None
    label_path: str | None
    files: tuple[str, ...]
    #: The slides of the case (None: not known).
    case: tuple[dict[str, Any], ...] | None = None


def analysis_progress(percent: int) -> int:
    """Map an analysis's own 0–100 % onto the part of the bar after the pipeline."""
    return PREPARE_SHARE + (max(0, min(100, percent)) * (100 - PREPARE_SHARE)) // 100


async def prepare(
    job: Job,
    folder: FilePath[str],
    settings: PipelineSettings,
    *,
    sps: SPSClient,
    clock: IReactorTime,
    run_blocking: RunBlocking,
    progress: Callable[[int, str], None],
    versions: SPSVersions | None = None,
    step: Callable[[str, float, int], None] | None = None,
) -> Prepared:
    """Fetch metadata, thumbnail, label and (if configured) the WSI files of ``job``.

    ``step(name, seconds, size)`` is told of each step that succeeded: ``metadata``,
    ``thumbnail``, ``label``, ``download`` (with the bytes of the WSI files), on
    ``clock``'s time (for the daemon's metrics).
    """
    callback, slide_id = job.callback, job.slide_id
    started = clock.seconds()

    def done(name: str, size: int = 0) -> None:
        nonlocal started
        now = clock.seconds()
        if step is not None:
            step(name, max(0.0, now - started), size)
        started = now

    progress(1, "Reading slide metadata")
    info = await sps.slide_info(callback, slide_id, extended=True, include_phi=settings.include_phi)
    data = json.dumps(info, sort_keys=True).encode("utf-8")
    await save_bytes(data, folder.child(SLIDE_INFO_FILE), run_blocking=run_blocking)
    case = await _case_images(job, sps, settings, versions)
    if case is not None:
        data = json.dumps(list(case), sort_keys=True).encode("utf-8")
        await save_bytes(data, folder.child(CASE_INFO_FILE), run_blocking=run_blocking)
    done("metadata")

    progress(5, "Fetching thumbnail")
    thumbnail_path: str | None = None
    thumbnail = await fetch_thumbnail(
        sps,
        callback,
        slide_id,
        info,
        run_blocking=run_blocking,
        target_mpp=settings.thumbnail_mpp,
        concurrency=settings.tile_concurrency,
    )
    if thumbnail is not None:
        path = await save_image(
            thumbnail.image, folder.child(THUMBNAIL_FILE), run_blocking=run_blocking
        )
        thumbnail_path = path.path
    done("thumbnail")

    progress(10, "Fetching label")
    label_path: str | None = None
    label = await fetch_label(sps, callback, slide_id)
    if label is not None:
        target = folder.child(LABEL_STEM + image_extension(label))
        label_path = (await save_bytes(label, target, run_blocking=run_blocking)).path
    done("label")

    files: tuple[str, ...] = ()
    if settings.download_wsi:
        progress(15, "Downloading slide")
        span = PREPARE_SHARE - 15

        def downloaded(received: int, total: int | None) -> None:
            if total:
                share = min(received, total) / total
                progress(15 + int(span * share), f"Downloading slide: {int(100 * share)} %")
            else:
                progress(15, f"Downloading slide: {received // (1024 * 1024)} MiB")

        paths = await download_files(
            sps,
            callback,
            slide_id,
            folder.child(WSI_DIR),
            clock=clock,
            run_blocking=run_blocking,
            idle_timeout=settings.download_idle_timeout,
            progress=downloaded,
        )
        files = tuple(p.path for p in paths)
        size = sum(os.path.getsize(p) for p in files)
        done("download", size)
        log.info(
            "job {job_id}: slide downloaded: {count} files, {size} bytes",
            job_id=job.job_id,
            count=len(files),
            size=size,
        )
    progress(PREPARE_SHARE, "Slide ready")
    return Prepared(
        slide_info=info if isinstance(info, dict) else None,
        thumbnail_path=thumbnail_path,
        label_path=label_path,
        files=files,
        case=case,
    )


async def _case_images(
    job: Job, sps: SPSClient, settings: PipelineSettings, versions: SPSVersions | None
) -> tuple[dict[str, Any], ...] | None:
    """The slides of ``job``'s case, or None where the SPS has no case lists."""
    if versions is not None and await versions.supports(job.callback, CASE_LISTS) is False:
        return None
    try:
        listed = await sps.slide_request_images(
            job.callback, job.slide_id, include_phi=settings.include_phi
        )
    except SPSUnauthorized:
        raise
    except SPSError as e:
        log.warn(
            "job {job_id}: the slides of the case could not be listed: {error}",
            job_id=job.job_id,
            error=str(e),
        )
        return None
    return tuple(listed)
