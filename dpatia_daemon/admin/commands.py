"""The spool commands: ``status``, ``jobs``, ``show``, ``retry``, ``cancel``, ``purge``.

Each is ``(options, out) -> exit status``; see :mod:`dpatia_daemon.admin` for what
they do and :mod:`.spoolview` for how they reach the spool.
"""

from __future__ import annotations

import argparse
import time
from typing import Any, TextIO

from ..jobs import Job, JobState
from ..spool import SpoolStore
from ..spool.interface import ACTIVE, HEX_ID
from ..spool.retention import corrupt_count, prune_history
from ..spool.transitions import JobFilter
from ..workers.folders import WorkFolders
from .output import ago, clip, size, span, table, until, write_json
from .spoolview import FAILED, OK, AdminError, all_jobs, job_view, open_spool, read_config

#: What ``dpatia cancel`` writes as the job's reason.
CANCEL_REASON = "cancelled by an operator (dpatia cancel)"
#: How many recent failures ``dpatia status`` lists.
RECENT_FAILURES = 5
_DAY = 86400.0


def _note(view: dict[str, Any], now: float, job: Job) -> str:
    """The NOTE column: the deferral and its next try, a cancellation, the last error."""
    if view["deferred"]:
        return f"deferred, next try {until(job.not_before, now)}: {clip(job.deferred_reason, 50)}"
    if view["cancel_requested"]:
        return "cancellation requested"
    return clip(job.last_error)


def _rows(store: SpoolStore, jobs: list[Job], now: float) -> list[dict[str, Any]]:
    return [
        job_view(
            job,
            now,
            cancel_requested=job.state is JobState.RUNNING and store.cancel_requested(job.job_id),
        )
        for job in jobs
    ]


def _job_table(out: TextIO, jobs: list[Job], views: list[dict[str, Any]], now: float) -> None:
    table(
        out,
        ("JOB", "STATE", "SLIDE", "ATTEMPTS", "UPDATED", "NOTE"),
        [
            (
                j.job_id,
                j.state.value,
                clip(j.slide_id, 32),
                j.attempts,
                ago(j.updated, now),
                _note(v, now, j),
            )
            for j, v in zip(jobs, views, strict=True)
        ],
    )


def _job_id(text: str) -> str:
    if not HEX_ID.match(text):
        raise AdminError(f"{text!r} is not a job id (lowercase hex, as `dpatia jobs` shows)")
    return text


# --- status ---------------------------------------------------------------------------


def status(options: argparse.Namespace, out: TextIO) -> int:
    """Counts by state, the deferred and running jobs, recent failures, corrupt files."""
    config = read_config(options.config)
    now = time.time()
    with open_spool(config) as store:
        counts = store.counts()
        queued = store.queued()
        running = store.find(_states(JobState.RUNNING))
        failed = sorted(store.find(_states(JobState.FAILED)), key=lambda j: j.updated, reverse=True)
        corrupt = corrupt_count(store)
        free = store.room().free_bytes
        deferred = [j for j in queued if j.not_before is not None]
        deferred.sort(key=lambda j: j.not_before or 0.0)
        running_views = _rows(store, running, now)
    oldest = min((j.created for j in queued), default=None)
    report = {
        "spool": config.spool.directory.path,
        "free_bytes": free,
        "min_free_bytes": config.spool.min_free_bytes,
        "counts": {state.value: counts.get(state, 0) for state in JobState},
        "deferred": len(deferred),
        "oldest_queued_age": None if oldest is None else round(now - oldest, 1),
        "corrupt": corrupt,
        "retention_days": config.spool.retention_days,
        "running_jobs": running_views,
        "deferred_jobs": [job_view(j, now) for j in deferred],
        "recent_failures": [job_view(j, now) for j in failed[:RECENT_FAILURES]],
    }
    if options.json:
        write_json(out, report)
        return OK
    out.write(f"spool {report['spool']}: {size(free)} free")
    out.write(
        " (below [spool] min_free_bytes: new jobs are refused)\n"
        if free < config.spool.min_free_bytes
        else "\n"
    )
    rows: list[tuple[str, Any, str]] = []
    for state in JobState:
        note = ""
        if state is JobState.QUEUED:
            parts = []
            if oldest is not None:
                parts.append(f"oldest {ago(oldest, now)}")
            if deferred:
                parts.append(
                    f"{len(deferred)} deferred, next try {until(deferred[0].not_before, now)}"
                )
            note = ", ".join(parts)
        elif state.terminal:
            note = f"kept {config.spool.retention_days:g} days"
        rows.append((state.value, counts.get(state, 0), note))
    rows.append(("corrupt", corrupt, "kept: look at corrupt/, then delete" if corrupt else ""))
    table(out, ("STATE", "JOBS", ""), rows)
    if running:
        out.write("\nrunning:\n")
        _job_table(out, running, running_views, now)
    if deferred:
        out.write("\ndeferred:\n")
        _job_table(out, deferred, report["deferred_jobs"], now)
    if failed:
        out.write("\nrecent failures:\n")
        _job_table(out, failed[:RECENT_FAILURES], report["recent_failures"], now)
    return OK


def _states(*states: JobState) -> JobFilter:
    return JobFilter(states=frozenset(states))


# --- jobs, show -----------------------------------------------------------------------


def jobs(options: argparse.Namespace, out: TextIO) -> int:
    """The jobs in ``--state`` (default: queued and running), of ``--slide`` if given."""
    config = read_config(options.config)
    if options.state == "all":
        states = frozenset(JobState)
    elif options.state is None:
        states = ACTIVE
    else:
        states = frozenset({JobState(options.state)})
    now = time.time()
    with open_spool(config) as store:
        found = [j for j in all_jobs(store, states) if options.slide in (None, j.slide_id)]
        views = _rows(store, found, now)
    if options.json:
        write_json(out, views)
    elif found:
        _job_table(out, found, views, now)
    else:
        out.write("no jobs\n")
    return OK


def show(options: argparse.Namespace, out: TextIO) -> int:
    """Every field of one job (no token)."""
    config = read_config(options.config)
    job_id = _job_id(options.job)
    now = time.time()
    with open_spool(config) as store:
        job = store.get(job_id)
        if job is None:
            raise AdminError(f"no job {job_id} in the spool", FAILED)
        [view] = _rows(store, [job], now)
    if options.json:
        write_json(out, view)
        return OK
    if view["deferred"]:
        view["next_try"] = f"{view['next_try']} ({until(job.not_before, now)})"
    table(out, ("FIELD", "VALUE"), [(k, "-" if v is None else v) for k, v in view.items()])
    return OK


# --- retry, cancel --------------------------------------------------------------------


def _retry_one(store: SpoolStore, job_id: str) -> tuple[int, str]:
    job = store.get(job_id)
    if job is None:
        return FAILED, f"job {job_id}: not in the spool"
    if job.state is not JobState.FAILED and not (
        job.state is JobState.QUEUED and job.not_before is not None
    ):
        return (
            FAILED,
            f"job {job_id} is {job.state.value}: only failed and deferred jobs are retried",
        )
    outcome = store.retry(job_id)
    if outcome is None:
        return FAILED, f"job {job_id}: it changed meanwhile (see dpatia show {job_id})"
    queued, changed = outcome
    if not changed and queued.job_id != job_id:
        return (
            FAILED,
            f"job {job_id}: its slide already has a queued job ({queued.job_id}); left as it is",
        )
    if not changed:
        return OK, f"job {job_id}: already queued and not deferred"
    if job.state is JobState.QUEUED:
        return OK, f"job {job_id}: deferral lifted, it runs as soon as a worker is free"
    return OK, (
        f"job {job_id}: queued again (attempts from 0); a daemon picks it up at its next "
        "sweep ([spool] sweep_interval)"
    )


def retry(options: argparse.Namespace, out: TextIO) -> int:
    """Failed job(s) back to the queue; a deferred job's wait lifted."""
    if (options.job is None) == (not options.failed):
        raise AdminError("name one JOB, or --failed for every failed job")
    config = read_config(options.config)
    results: list[tuple[str, int, str]] = []
    with open_spool(config, changes=True) as store:
        if options.failed:
            failed = sorted(
                store.find(_states(JobState.FAILED)), key=lambda j: j.updated, reverse=True
            )
            # The newest failure of each key: an older one of the same slide is history.
            newest: dict[str, str] = {}
            for failure in failed:
                newest.setdefault(failure.key, failure.job_id)
            ids = list(newest.values())
        else:
            ids = [_job_id(options.job)]
        for job_id in ids:
            code, message = _retry_one(store, job_id)
            results.append((job_id, code, message))
    return _report(options, out, results, "retried")


def cancel(options: argparse.Namespace, out: TextIO) -> int:
    """Cancel a queued job; ask the daemon running a running one to stop it."""
    config = read_config(options.config)
    job_id = _job_id(options.job)
    with open_spool(config, changes=True) as store:
        code, message = _cancel_one(store, job_id)
    return _report(options, out, [(job_id, code, message)], "cancelled")


def _cancel_one(store: SpoolStore, job_id: str) -> tuple[int, str]:
    # As the front door's cancel: a queued job at once, a running one by a marker its
    # holder polls (whichever the job is by the time we act: claims do not wait for us).
    if store.cancel(job_id, CANCEL_REASON) is not None:
        return OK, f"job {job_id}: cancelled (it was queued; the SPS is not told)"
    job = store.get(job_id)
    if job is None:
        return FAILED, f"job {job_id}: not in the spool"
    if job.state is JobState.RUNNING:
        store.request_cancel(job_id)
        after = store.get(job_id)
        if after is not None and after.state is JobState.CANCELLED:
            return OK, f"job {job_id}: cancelled"
        return (
            OK,
            f"job {job_id}: running; cancellation requested, its daemon stops it within seconds",
        )
    return FAILED, f"job {job_id} is {job.state.value}: nothing to cancel"


def _report(
    options: argparse.Namespace, out: TextIO, results: list[tuple[str, int, str]], verb: str
) -> int:
    worst = max((code for _, code, _ in results), default=OK)
    if options.json:
        write_json(out, [{"job_id": j, "ok": code == OK, "message": m} for j, code, m in results])
    elif not results:
        out.write(f"no jobs to be {verb}\n")
    else:
        for _, _, message in results:
            out.write(message + "\n")
    return worst


# --- purge ----------------------------------------------------------------------------


def purge(options: argparse.Namespace, out: TextIO) -> int:
    """History records and ended jobs' work folders (WSI files too) older than DAYS."""
    if options.older_than < 0:
        raise AdminError("--older-than must be 0 or more days")
    config = read_config(options.config)
    now = time.time()
    cutoff = now - options.older_than * _DAY
    with open_spool(config, changes=True) as store:
        counts = prune_history(store, cutoff)
        if counts is None:
            raise AdminError("a daemon is pruning the history right now; try again later", FAILED)
        keep = {j.key for j in store.find(JobFilter(states=ACTIVE))}
        folders = WorkFolders(config.workers.work_directory, retention_days=options.older_than)
        removed_folders: list[str] = []
        d = folders.prune(keep, now)
        d.addCallback(removed_folders.extend)
        d.addErrback(lambda f: removed_folders.append(f"error: {f.getErrorMessage()}"))
    if any(name.startswith("error: ") for name in removed_folders):
        raise AdminError(f"work folders: {removed_folders[-1][7:]}", FAILED)
    report = {
        "older_than_days": options.older_than,
        "history_removed": counts.removed,
        "history_gone_meanwhile": counts.gone,
        "work_folders_removed": len(removed_folders),
        "work_directory": config.workers.work_directory.path,
    }
    if options.json:
        write_json(out, report)
    else:
        out.write(
            f"removed {counts.removed} history records and {len(removed_folders)} work folders "
            f"of jobs that ended more than {span(options.older_than * _DAY)} ago\n"
        )
    return OK
