"""The pure job transitions both spools apply: requeue, the two merges, conflicts, the ``find`` filter.

Functions of :class:`~dpatia_daemon.jobs.Job` values only (no files, no state), so that
:class:`~dpatia_daemon.spool.DirectorySpool` and
:class:`~dpatia_daemon.spool.MemorySpool` cannot disagree on what a release or a merge
makes of a job.
"""

from __future__ import annotations

import attrs
from attrs import frozen

from ..jobs import Deferral, Job, JobState
from .interface import ACTIVE


def requeued(
    job: Job, *, count_attempt: bool, error: str | None, deferral: Deferral | None = None
) -> Job:
    """Return ``job`` back in the queue, one attempt more if ``count_attempt``.

    With a ``deferral`` the job waits until its ``not_before``; without one it may run
    at once (its deferral is cleared, its ``deferred_since`` kept).
    """
    return attrs.evolve(
        job,
        state=JobState.QUEUED,
        attempts=job.attempts + (1 if count_attempt else 0),
        last_error=error if error is not None else job.last_error,
        not_before=deferral.not_before if deferral is not None else None,
        deferred_reason=deferral.reason if deferral is not None else None,
        deferral_kind=deferral.kind if deferral is not None else None,
        deferred_since=(
            deferral.since
            if deferral is not None and deferral.since is not None
            else job.deferred_since
        ),
    )


def resumed(job: Job) -> Job:
    """``job`` with its deferral cleared: its SPS answers again, it may run now."""
    return attrs.evolve(job, not_before=None, deferred_reason=None, deferral_kind=None)


def merge_added(existing: Job, incoming: Job) -> Job:
    """Fold a newly added request into the queued job for its key (existing id kept)."""
    return attrs.evolve(existing.merged_with(incoming), state=JobState.QUEUED)


def merge_released(released: Job, newer: Job) -> Job:
    """Fold a released running job into the newer queued job for its key.

    The newer job's record (its id) survives; see the package docstring ("Release merges") for why.  The
    released job's queue position and error are kept, the newer request's callback and
    token win (``merged_with``), and the larger attempt count is kept.
    """
    return attrs.evolve(
        released.merged_with(newer),
        job_id=newer.job_id,
        attempts=max(released.attempts, newer.attempts),
        created=min(released.created, newer.created),
        state=JobState.QUEUED,
    )


def merge_released_into(queued: Job, released: Job) -> Job:
    """:func:`merge_released` with ``_enqueue``'s argument order (existing, incoming)."""
    return merge_released(released, queued)


def conflicts(stored: Job, proposed: Job) -> bool:
    """Return whether ``stored`` was changed by a merge since ``proposed`` was read.

    ``update`` may change a job's result id, image info, context and error; the fields
    compared here are the ones only merges, releases and recovery change.
    """
    return (
        stored.callback != proposed.callback
        or stored.cancellation_token != proposed.cancellation_token
        or stored.updated != proposed.updated
        or stored.created != proposed.created
        or stored.priority != proposed.priority
        or stored.kind != proposed.kind
        or stored.attempts != proposed.attempts
    )


@frozen
class JobFilter:
    """The criteria of one ``find``: the jobs in ``states`` matching every given field."""

    states: frozenset[JobState] = ACTIVE
    slide_id: str | None = None
    result_id: int | None = None
    cancellation_token: str | None = None

    def matches(self, job: Job) -> bool:
        """Return whether ``job`` meets every criterion."""
        return (
            job.state in self.states
            and (self.slide_id is None or job.slide_id == self.slide_id)
            and (self.result_id is None or job.result_id == self.result_id)
            and (self.cancellation_token is None or job.answers_to(self.cancellation_token))
        )
