"""Helpers of the spool tests: jobs to add, a started DirectorySpool, another daemon's store."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from twisted.python.filepath import FilePath

from dpatia_daemon.jobs import Callback, Job, JobKind
from dpatia_daemon.spool import DirectorySpool, SpoolStore


def make_job(
    slide: str = "slide-1",
    *,
    token: str = "token-1",
    kind: JobKind = JobKind.CREATE,
    created: float = 100.0,
    **kw: Any,
) -> Job:
    """Return a new queued job for ``slide``."""
    return Job(
        slide_id=slide,
        application_id="demo",
        kind=kind,
        callback=Callback("https://sps.example/cb", token),
        created=created,
        **kw,
    )


def start_directory_spool(path: Path, reactor: Any) -> DirectorySpool:
    """Start a DirectorySpool on ``path`` whose periodic sweep never fires in a test."""
    spool = DirectorySpool(
        directory=FilePath(str(path)), reactor=reactor, sweep_interval=3600.0, owner="test"
    )
    spool.startService()
    return spool


@contextmanager
def other_store(path: Path) -> Iterator[SpoolStore]:
    """An open SpoolStore on ``path``, as another daemon would have."""
    store = SpoolStore(FilePath(str(path)), owner="other")
    store.open()
    try:
        yield store
    finally:
        store.close()

