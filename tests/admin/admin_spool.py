"""A spool holding jobs in every state, for the admin command tests."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from attrs import frozen
from twisted.python.filepath import FilePath

from dpatia_daemon import cli
from dpatia_daemon.jobs import Callback, Deferral, DeferralKind, Job, JobKind, JobState
from dpatia_daemon.spool import SpoolStore

TOKEN = "secret-token-never-shown"


def job(slide: str, created: float) -> Job:
    return Job(
        slide_id=slide,
        application_id="dpatia",
        kind=JobKind.NOTIFICATION,
        callback=Callback("http://127.0.0.1:9/sps", TOKEN),
        created=created,
        image_info={"imageSize": {"width": 4000, "height": 3000}},
        context={"private": "context"},
    )


@frozen
class Spool:
    """The ids of a spool's jobs by what they are; ``store`` holds the running one."""

    store: SpoolStore
    queued: str
    deferred: str
    running: str
    done: str
    failed: str
    cancelled: str


@contextmanager
def spool_in_every_state(directory: Path) -> Iterator[Spool]:
    """Queued, deferred (next try in an hour), running (held by ``store``, another
    daemon of this test), done, failed (one attempt spent) and cancelled jobs."""
    now = time.time()
    store = SpoolStore(FilePath(str(directory)), owner="test daemon")
    store.open(now)
    try:
        ids: dict[str, str] = {}
        for n, name in enumerate(("done", "failed", "running", "deferred", "queued", "cancelled")):
            ids[name] = store.add(job(f"slide-{name}", now - 600 + n)).job_id
        for name, state in (("done", JobState.DONE), ("failed", JobState.FAILED)):
            assert store.claim(ids[name]) is not None
            if name == "failed":
                store.release(ids[name], count_attempt=True, error="first try failed")
                assert store.claim(ids[name]) is not None
            store.finish(
                ids[name], state, "the analysis raised ValueError" if name == "failed" else None
            )
        assert store.claim(ids["deferred"]) is not None
        store.release(
            ids["deferred"],
            count_attempt=False,
            deferral=Deferral(now + 3600, "the SPS answered 503", DeferralKind.SPS, now - 60),
        )
        store.cancel(ids["cancelled"])
        assert store.claim(ids["running"]) is not None
        yield Spool(store=store, **ids)
    finally:
        store.close()


def run(*argv: str) -> tuple[int, str]:
    """``dpatia ARGV...`` in this process: (exit status, what it printed)."""
    out = io.StringIO()
    status = cli.main(list(argv), out=out)
    return status, out.getvalue()


def run_json(*argv: str) -> tuple[int, Any]:
    status, text = run(*argv, "--json")
    return status, json.loads(text)


def record(directory: Path, state: str, job_id: str) -> Job | None:
    """The job record of ``job_id`` as it is on disk in ``state``'s directory, or None."""
    for path in (directory / state).glob("*.json"):
        found = Job.from_json(path.read_bytes())
        if found.job_id == job_id:
            return found
    return None
