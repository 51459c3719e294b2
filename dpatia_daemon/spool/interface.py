"""The spool's interface, its errors, and the id checks every implementation applies.

:class:`ISpool` is what the rest of the daemon sees of the spool; the package
docstring (``dpatia_daemon.spool``) says what its operations guarantee.  Ids from the
network become path segments in :class:`~dpatia_daemon.spool.DirectorySpool`, so both
implementations validate them with :func:`check_id` / :func:`check_job` first.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Container

from attrs import frozen
from twisted.internet.defer import Deferred
from zope.interface import Interface

from ..jobs import Deferral, Job, JobState

#: The states ``find`` looks at unless told otherwise: the jobs still to be done.
ACTIVE: frozenset[JobState] = frozenset({JobState.QUEUED, JobState.RUNNING})
#: Lookups read states in the order jobs move through them, so a job moving forward
#: while we look is found in the later state.
FORWARD: tuple[JobState, ...] = (JobState.QUEUED, JobState.RUNNING)
TERMINAL: tuple[JobState, ...] = (JobState.DONE, JobState.FAILED, JobState.CANCELLED)
#: A job id or key: lowercase hex, safe as a path segment.
HEX_ID = re.compile(r"[0-9a-f]{2,64}\Z")

# --- errors ---------------------------------------------------------------------------


class SpoolError(Exception):
    """Base class of the spool's own errors."""


class JobMoved(SpoolError):
    """The job is no longer in the state the caller thought (e.g. claimed meanwhile)."""


class JobChanged(JobMoved):
    """A queued job was changed by someone else (a merge) since the caller read it.

    Re-read it with ``get`` and apply the change again; writing the stale copy would
    throw away the newer request's callback token.
    """


class NotHeld(SpoolError):
    """The job is RUNNING but not held by this spool instance (or not running at all)."""


class SpoolNotRunning(SpoolError):
    """The spool service is not running (not started yet, or stopped)."""


def check_id(value: object, what: str = "job id") -> str:
    """Return ``value`` if it is a lowercase hex id safe as a path segment; else ValueError."""
    if not isinstance(value, str) or not HEX_ID.match(value):
        raise ValueError(f"invalid {what}: {value!r}")
    return value


def check_job(job: Job) -> None:
    """Validate the parts of ``job`` that become path segments."""
    check_id(job.job_id)
    check_id(job.key, "job key")


@frozen
class SpoolRoom:
    """How much room the spool has for new jobs (what the front door checks first)."""

    #: Bytes free to this (unprivileged) process on the spool's filesystem.
    free_bytes: int
    #: QUEUED records (one per key: a merge adds none); None when not counted.
    queued: int | None = None


# --- the interface --------------------------------------------------------------------


class ISpool(Interface):
    """A durable job spool.  Every method returns a Deferred firing in the reactor thread."""

    def add(job: Job) -> Deferred[Job]:
        """Persist a new QUEUED job durably, merging into a queued job with the same key.

        Fires with the stored job (the merged one, keeping the existing job id, if a job
        with ``job.key`` was already queued).
        """

    def get(job_id: str) -> Deferred[Job | None]:
        """Return the job with ``job_id`` in any state, or None."""

    def find(
        *,
        slide_id: str | None = None,
        result_id: int | None = None,
        cancellation_token: str | None = None,
        states: frozenset[JobState] = ACTIVE,
    ) -> Deferred[list[Job]]:
        """Return the jobs in ``states`` matching every given criterion."""

    def queued() -> Deferred[list[Job]]:
        """Return all QUEUED jobs in dispatch order (:meth:`Job.sort_key`)."""

    def queued_head(
        limit: int, skip: Container[str] = (), after: Job | None = None
    ) -> Deferred[list[Job]]:
        """Return the best ``limit`` QUEUED jobs in dispatch order whose ids are not in
        ``skip`` (and, with ``after``, that come after the job ``after`` in dispatch
        order: the next window of a walk): the first ``limit`` of :meth:`queued`
        without those, reading neither the rest of the queue nor the skipped jobs'
        records.  A head ``after`` a job may miss a job queued by another process in
        the last seconds; a head from the start does not."""

    def active_keys() -> Deferred[set[str]]:
        """Return the keys of every QUEUED or RUNNING job (no record need be read)."""

    def update(job: Job) -> Deferred[Job]:
        """Rewrite a QUEUED or RUNNING job's record durably.

        Fails with :class:`JobMoved` if the job is no longer in ``job.state``, with
        :class:`JobChanged` if a queued job was merged meanwhile, and with
        :class:`NotHeld` for a RUNNING job this spool does not hold.
        """

    def claim(job_id: str, now: float | None = None) -> Deferred[Job | None]:
        """Move a QUEUED job to RUNNING, held by this spool; None if not possible.

        None if the job is gone, claimed by someone else, or another job with the same
        key is running; with ``now``, also if the job is deferred past ``now`` (its
        ``not_before``: every daemon on the spool passes its clock).
        """

    def finish(job_id: str, state: JobState, error: str | None = None) -> Deferred[Job]:
        """End a held RUNNING job as DONE, FAILED or CANCELLED with ``last_error``."""

    def release(
        job_id: str,
        *,
        count_attempt: bool,
        error: str | None = None,
        deferral: Deferral | None = None,
    ) -> Deferred[Job]:
        """Put a held RUNNING job back to QUEUED (merging with a newer queued job).

        With a ``deferral`` the queued job waits until its ``not_before`` (the record
        keeps it, see :func:`~.transitions.requeued`).  A job whose cancellation was
        requested is CANCELLED instead.
        """

    def cancel(job_id: str, reason: str = "cancelled") -> Deferred[Job | None]:
        """Cancel a QUEUED job; None if it is not queued any more."""

    def request_cancel(job_id: str) -> Deferred[None]:
        """Ask the holder of a RUNNING job to stop it (a QUEUED job is cancelled at once)."""

    def cancel_requested(job_id: str) -> Deferred[bool]:
        """Return whether a cancellation of ``job_id`` was requested."""

    def recover() -> Deferred[list[Job]]:
        """Requeue (attempts + 1) every RUNNING job whose holder process is dead."""

    def watch(callback: Callable[[Job], None]) -> Callable[[], None]:
        """Call ``callback(job)`` whenever a job becomes QUEUED; return an unsubscribe."""

    def counts() -> Deferred[dict[JobState, int]]:
        """Return the number of jobs in each state."""

    def room(count_queued: bool = False) -> Deferred[SpoolRoom]:
        """Return the free space (and, with ``count_queued``, the queued records)."""

    def queued_of(key: str, seen: object = None) -> Deferred[tuple[object, Job | None]]:
        """The QUEUED record of ``key``, cheaply: ``(tag, job)`` where ``tag`` changes
        whenever the record does (None: there is none); ``job`` is None when ``tag`` is
        ``seen`` (unchanged: one stat, no read) or there is no record."""
