"""The admin commands' way into the spool: the config, an open store, jobs as views.

The commands work on the spool directory itself (:class:`~dpatia_daemon.spool.SpoolStore`,
the daemon's blocking core), so they work while the daemon is down and are safe while
it runs: every change is one of the spool's transitions, under the same stripe locks.
A view of a job (:func:`job_view`) never holds its callback token, its context or
the slide's image info beyond its size: what an operator may paste in a ticket.
"""

from __future__ import annotations

import os
import pwd
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ..config import Config, ConfigError, load_config
from ..jobs import Job, JobState
from ..spool import SpoolStore
from ..spool.transitions import JobFilter
from .output import iso

#: Exit statuses: done; nothing done (not found, refused, a check failed); bad usage
#: (a config or spool that cannot be used).
OK, FAILED, USAGE = 0, 1, 2


class AdminError(Exception):
    """A problem that stops a command; ``status`` is its exit status."""

    def __init__(self, message: str, status: int = USAGE) -> None:
        super().__init__(message)
        self.status = status


def read_config(path: str) -> Config:
    """The daemon's config at ``path``, or :class:`AdminError` naming the problem."""
    try:
        return load_config(path)
    except ConfigError as e:
        raise AdminError(f"configuration error: {e}") from None


def _owner_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


@contextmanager
def open_spool(config: Config, *, changes: bool = False) -> Iterator[SpoolStore]:
    """The spool of ``config``, open; it must exist (the daemon creates it).

    ``changes``: the command will write (temp files, lock files): only as the user
    owning the spool, so that no file the daemon needs ends up owned by root.
    """
    directory = config.spool.directory
    if not directory.isdir():
        raise AdminError(
            f"no spool at {directory.path} ([spool] directory of {config.source}); "
            "has the daemon run yet?"
        )
    owner = os.stat(directory.path).st_uid
    if changes and os.geteuid() != owner:
        name = _owner_name(owner)
        raise AdminError(
            f"the spool {directory.path} belongs to {name}: run this as that user "
            f"(sudo -u {name} dpatia ...), so that its files stay the daemon's"
        )
    store = SpoolStore(directory, owner=f"dpatia-admin:{os.getpid()}")
    try:
        store.open(time.time())
    except PermissionError as e:
        raise AdminError(
            f"cannot open the spool {directory.path}: {e.strerror} ({e.filename}); run "
            f"as {_owner_name(owner)}"
        ) from None
    try:
        yield store
    finally:
        store.close()


def image_size(job: Job) -> str | None:
    """``W x H`` of the slide as its notification or request told, if it did."""
    info = job.image_info or {}
    found = info.get("imageSize") if isinstance(info, dict) else None
    if isinstance(found, dict) and {"width", "height"} <= found.keys():
        return f"{found['width']} x {found['height']}"
    return None


def job_view(job: Job, now: float, *, cancel_requested: bool = False) -> dict[str, Any]:
    """What the admin commands show of ``job`` (no token, no context, no PHI)."""
    deferred = job.state is JobState.QUEUED and job.not_before is not None
    return {
        "job_id": job.job_id,
        "state": job.state.value,
        "slide_id": job.slide_id,
        "application_id": job.application_id,
        "kind": job.kind.value,
        "key": job.key,
        "input_type": (job.input or {}).get("type", "wholeSlide"),
        "image_size": image_size(job),
        "priority": job.priority,
        "attempts": job.attempts,
        "result_id": job.result_id,
        "created": iso(job.created),
        "updated": iso(job.updated),
        "last_error": job.last_error,
        "deferred": deferred,
        "next_try": iso(job.not_before) if deferred else None,
        "next_try_in": max(0.0, round(job.not_before - now, 1))
        if deferred and job.not_before is not None
        else None,
        "deferred_reason": job.deferred_reason if deferred else None,
        "deferral_kind": job.deferral_kind.value if deferred and job.deferral_kind else None,
        "deferred_since": iso(job.deferred_since),
        "cancel_requested": cancel_requested,
        "callback_url": job.callback.url,
    }


def all_jobs(store: SpoolStore, states: frozenset[JobState]) -> list[Job]:
    """The jobs in ``states``: the queue in dispatch order, then the running jobs,
    then history newest first."""
    queued = store.queued() if JobState.QUEUED in states else []
    rest = store.find(JobFilter(states=states - {JobState.QUEUED}))
    running = [j for j in rest if j.state is JobState.RUNNING]
    ended = sorted((j for j in rest if j.state.terminal), key=lambda j: j.updated, reverse=True)
    return [*queued, *running, *ended]
