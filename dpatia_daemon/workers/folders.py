"""The daemon's side of the work folders: one private folder per job key.

:class:`WorkFolders` keeps them under ``[workers] work_directory``: ``job.json`` for the
worker, ``result.json`` from it, later the pipeline's downloads (the file names are in
:mod:`.workfolder`).  Removed when the job ends; kept when it is retried, so a job whose
analysis finished but whose result could not be stored only re-writes it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from typing import Any

import attrs
from attrs import define, frozen
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath

from ..durable import write_atomically
from ..jobs import Job
from ..models import InvalidInput, RawJSON, Result, result_from_json
from .workfolder import CONTENT_KEY, JOB_FILE, LABEL_STEM, RESULT_FILE, WSI_DIR

log = Logger()

_KEY = re.compile(r"[0-9a-f]{2,64}\Z")
_DIR_MODE = 0o700


@frozen
class Verdict:
    """A quality-control verdict of the analysis, and the ``versionId`` of the slide's QC
    state (from its metadata) to send with it (None: not known)."""

    status: str
    version_id: str | None = None

    @classmethod
    def of(cls, status: object, version_id: object = None) -> Verdict | None:
        """The verdict in a RunJob answer or a ``result.json`` record, if it has one."""
        if not isinstance(status, str) or not status:
            return None
        return cls(status, version_id if isinstance(version_id, str) and version_id else None)


@frozen
class Outcome:
    """What an analysis left in ``result.json``: its result and its QC verdict."""

    result: Result
    verdict: Verdict | None = None


class UnusableResult(Exception):
    """A ``result.json`` that cannot be stored; the message says why."""


#: Files of an ended job removed at once: the label image may show PHI.
RETIRED_PREFIXES = (LABEL_STEM + ".",)


def _remove_path(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _private_dir(path: FilePath[str]) -> None:
    if not path.isdir():
        os.makedirs(path.path, _DIR_MODE, exist_ok=True)
        os.chmod(path.path, _DIR_MODE)


@define
class WorkFolders:
    """The per-job folders under ``root`` (``[workers] work_directory``).

    A folder is named by the job's key: a hash, so it carries no PHI and is safe as a
    file name.  ``job.json`` holds the callback token, hence 0700 folders and 0600
    files.  Small reads and writes happen in the caller's thread; removals (a folder
    may hold a whole-slide image) go through ``run_blocking`` (the reactor's thread
    pool in the daemon, a plain call in tests).
    """

    root: FilePath[str]
    run_blocking: Callable[..., Deferred[Any]] | None = None
    #: Keep the downloaded WSI files when a job ends ([spool] keep_wsi).
    keep_wsi: bool = False
    #: Days an ended job's metadata, thumbnail and result are kept ([spool] retention_days).
    retention_days: float = 30.0

    def folder(self, job: Job) -> FilePath[str]:
        """The folder of ``job`` (not created)."""
        if not _KEY.match(job.key):
            raise ValueError(f"invalid job key {job.key!r}")
        return self.root.child(job.key)

    def prepare(self, job: Job) -> FilePath[str]:
        """Create the job's folder and write ``job.json``; drop another job's result."""
        folder = self.folder(job)
        _private_dir(self.root)
        _private_dir(folder)
        write_atomically(folder.child(JOB_FILE).path, job.to_json(), fsync=False)
        result = folder.child(RESULT_FILE)
        if result.exists() and self._result_job_id(result) != job.job_id:
            result.remove()
        return folder

    @staticmethod
    def _result_job_id(path: FilePath[str]) -> str | None:
        try:
            data = json.loads(path.getContent())
        except (OSError, ValueError):
            return None
        job_id = data.get("jobId") if isinstance(data, dict) else None
        return job_id if isinstance(job_id, str) else None

    def completed(self, job: Job) -> Outcome | None:
        """What a previous attempt of this very job computed, if it is there."""
        path = self.folder(job).child(RESULT_FILE)
        if not path.exists():
            return None
        try:
            return self.read_outcome(job, path.path)
        except UnusableResult as e:
            log.warn(
                "job {job_id}: ignoring {path}: {error}",
                job_id=job.job_id,
                path=path.path,
                error=str(e),
            )
            return None

    def read_result(self, job: Job, path: str) -> Result:
        """Parse the ``result.json`` a worker reported for ``job``."""
        return self.read_outcome(job, path).result

    def read_outcome(self, job: Job, path: str) -> Outcome:
        """Parse the ``result.json`` at ``path`` of ``job``: its result and the QC verdict
        the worker recorded with it (:class:`UnusableResult` if it cannot be used)."""
        expected = self.folder(job).child(RESULT_FILE)
        if os.path.abspath(path) != os.path.abspath(expected.path):
            raise UnusableResult(f"the worker reported {path!r}, not {expected.path!r}")
        try:
            data = json.loads(expected.getContent())
        except (OSError, ValueError) as e:
            raise UnusableResult(f"cannot read {RESULT_FILE}: {e}") from None
        if not isinstance(data, dict) or data.get("jobId") != job.job_id:
            raise UnusableResult(f"{RESULT_FILE} is not the result of job {job.job_id}")
        try:
            result = result_from_json(data.get("result"))
        except InvalidInput as e:
            raise UnusableResult(
                f"the analysis returned an invalid result: {e} at {e.field}"
            ) from None
        content = data.get(CONTENT_KEY)
        if content is not None:
            result = _with_content(result, content)
        return Outcome(
            result, Verdict.of(data.get("qualityControl"), data.get("qualityControlVersion"))
        )

    def remove(self, job: Job) -> Deferred[Any]:
        """Retire the job's folder (in the background) now that the job has ended.

        The token (``job.json``) and the label image (it may show PHI) go at once, the
        WSI files too unless ``keep_wsi``; metadata, thumbnail and ``result.json`` stay
        for ``retention_days`` (then :meth:`prune` removes them).
        """
        return self._blocking(self._retire, self.folder(job).path)

    def _retire(self, path: str) -> None:
        if self.retention_days <= 0 and not self.keep_wsi:
            shutil.rmtree(path, True)
            return
        try:
            names = os.listdir(path)
        except FileNotFoundError:
            return
        for name in names:
            target = os.path.join(path, name)
            if name == JOB_FILE or name.startswith(RETIRED_PREFIXES):
                _remove_path(target)
            elif name == WSI_DIR and not self.keep_wsi:
                shutil.rmtree(target, True)
        # The folder's mtime now says when the job ended: prune counts from it.
        os.utime(path)

    def prune(self, keep: set[str], now: float, min_age: float = 600.0) -> Deferred[Any]:
        """Delete job folders whose key is not in ``keep`` (the queued and running jobs).

        A folder still holding ``job.json`` was left by a crash or a stop and goes once
        it is ``min_age`` seconds old (``keep`` was read a moment ago, and a job may
        have started since); a retired one (an ended job's records) is kept for
        ``retention_days``.
        """
        stale_before = now - min_age
        retired_before = min(stale_before, now - self.retention_days * 86400)
        return self._blocking(self._prune, keep, stale_before, retired_before)

    def _prune(self, keep: set[str], stale_before: float, retired_before: float) -> list[str]:
        removed: list[str] = []
        try:
            names = os.listdir(self.root.path)
        except FileNotFoundError:
            return removed
        for name in names:
            if not _KEY.match(name) or name in keep:
                continue
            path = self.root.child(name).path
            try:
                mtime = os.stat(path).st_mtime
                active = os.path.exists(os.path.join(path, JOB_FILE))
            except OSError:
                continue
            if mtime > (stale_before if active else retired_before):
                continue
            shutil.rmtree(path, True)
            removed.append(name)
        if removed:
            log.info("removed {count} old job work folders", count=len(removed))
        return removed

    def _blocking(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        if self.run_blocking is not None:
            return self.run_blocking(f, *args)
        d: Deferred[Any] = Deferred()
        try:
            d.callback(f(*args))
        except Exception:
            d.errback(Failure())
        return d


def _with_content(result: Result, content: Any) -> Result:
    """``result`` with the content the worker serialised beside it (:data:`CONTENT_KEY`)."""
    payload = result.data.result
    text = content.strip() if isinstance(content, str) else ""
    # The worker wrote it with json.dumps: a cheap look at its ends, not a parse of MiB.
    if payload is None or payload.content is not None or text[:1] not in ("[", "{"):
        raise UnusableResult(f"{RESULT_FILE} has a {CONTENT_KEY} that is not a result's content")
    return attrs.evolve(
        result,
        data=attrs.evolve(result.data, result=attrs.evolve(payload, content=RawJSON(text))),
    )


__all__ = ["Outcome", "UnusableResult", "Verdict", "WorkFolders"]
