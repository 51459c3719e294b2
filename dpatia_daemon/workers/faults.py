"""Transient or permanent: the one place a job's failure is judged, and when it runs next.

Postfix's queue manager is the model.  A *transient* fault is not the job's: the SPS
could not be reached or answered 5xx/429 (:func:`~dpatia_daemon.sps.errors.is_transient`),
a 404 came on a retry (an SPS restarting may not know its slides yet; that job only,
not the SPS's health), a download broke off or found
the disk full (:attr:`~dpatia_daemon.pipeline.failures.DownloadError.transient`), or
the worker said so over AMP (:class:`~.commands.TransientFailure`).  Such a job is
*deferred*: back to the queue with no attempt spent, not before a backoff.  Anything
else is *permanent* (the analysis raised, a corrupt slide, another 4xx, a token
rejected with no other to try, a malformed answer): it spends an attempt, and its retry waits a backoff too.

:func:`classify` judges an error; :func:`next_try` says when the job runs next, or
that it has been deferred too long (None).  Both are pure.
"""

from __future__ import annotations

from attrs import frozen

from ..config import WorkersConfig
from ..jobs import Deferral, DeferralKind, Job
from ..pipeline.failures import DownloadError, disk_full
from ..sps.errors import SPSError, SPSNotFound, is_transient
from .commands import TransientFailure


@frozen
class Fault:
    """How one failure counts: ``transient`` or not, why, the SPS's Retry-After, and
    whether the SPS failed (``sps``: its health view hears of it) or this host did."""

    transient: bool
    reason: str
    retry_after: float | None = None
    sps: bool = False


def classify(error: BaseException, *, retrying: bool = False) -> Fault:
    """Judge ``error`` (``retrying``: the job failed before, so a 404 may be an SPS
    that is not itself yet)."""
    reason = str(error) or type(error).__name__
    if isinstance(error, TransientFailure):
        return Fault(True, error.message, error.retry_after, error.sps)
    if isinstance(error, SPSError):
        # 401/403 reach here only once the token machinery (sps/tokens.py) found no
        # other token: a newer request brings one, so the attempt's retry (after a
        # backoff) may succeed; it counts as the job's own failure.
        failing = is_transient(error)
        transient = failing or (retrying and isinstance(error, SPSNotFound))
        # A 404 on a retry defers this job only: it is about one slide (or one result),
        # so it must not mark the whole SPS failing and hold back its other jobs.
        return Fault(transient, reason, error.retry_after if transient else None, failing)
    if isinstance(error, DownloadError):
        return Fault(error.transient, reason, sps=error.transient and not error.disk)
    return Fault(disk_full(error), reason)


def backoff(config: WorkersConfig, waited: float) -> float:
    """The wait before the next try, Postfix's way: as long as the job has already
    been deferred (so the waits double), between ``min_backoff`` and ``max_backoff``."""
    return max(config.min_backoff, min(config.max_backoff, waited))


def next_try(config: WorkersConfig, job: Job, fault: Fault, now: float) -> Deferral | None:
    """When ``job`` runs next after ``fault``; None if transient faults have deferred it
    for longer than ``max_deferral_age`` (it then fails for good).

    A transient fault waits the backoff of its deferral age (or the SPS's
    Retry-After, up to ``max_backoff``); a permanent one ``min_backoff`` doubled per
    attempt already spent.
    """
    if fault.transient:
        since = job.deferred_since if job.deferred_since is not None else now
        if now - since >= config.max_deferral_age:
            return None
        if fault.retry_after is not None:
            delay = max(0.0, min(config.max_backoff, fault.retry_after))
        else:
            delay = backoff(config, now - since)
        kind = DeferralKind.SPS if fault.sps else DeferralKind.HOST
        return Deferral(now + delay, fault.reason, kind, since)
    delay = backoff(config, config.min_backoff * 2.0 ** min(job.attempts, 32))
    return Deferral(now + delay, fault.reason, DeferralKind.ERROR)


def too_old(config: WorkersConfig, job: Job, fault: Fault) -> str:
    """The error a job gets when it has been deferred for too long."""
    days = config.max_deferral_age / 86400
    return (
        f"deferred for more than max_deferral_age ({config.max_deferral_age:g} s, "
        f"{days:.3g} days) by transient faults; last: {fault.reason}"
    )


__all__ = ["Fault", "backoff", "classify", "next_try", "too_old"]
