"""The job record: what one accepted request asks the daemon to do, and its pure transitions.

A job is a frozen value.  The spool persists it as one small JSON file; every change
(a merge with a newer request, a claim, an attempt counted, a result id learned) makes
a new value with :func:`attrs.evolve`.  Nothing here touches the disk or the network.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from enum import StrEnum
from typing import Any

import attrs
from attrs import field, frozen

from .models import converter, register_enum


class JobKind(StrEnum):
    """Why the job exists: a pathologist asked for it, or the SPS announced a new slide."""

    CREATE = "create"
    NOTIFICATION = "notification"
    #: A patchCollection button press (a modify with an action's state == 1) for
    #: ``[app] on_action``: ``input`` is ``{"type": "action", "actionId", "result",
    #: "resultKey", "handler"}`` and ``result_id`` the pressed result.
    ACTION = "action"


class JobState(StrEnum):
    """Where a job is in its life.  The spool keeps one directory per state."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobState.DONE, JobState.FAILED, JobState.CANCELLED)


class DeferralKind(StrEnum):
    """Why a queued job waits: its SPS failed, this host did (a full disk), or its
    last attempt failed (a permanent fault's retry waits too)."""

    SPS = "sps"
    HOST = "host"
    ERROR = "error"

    @property
    def transient(self) -> bool:
        """Not the job's fault: no attempt was spent on it."""
        return self is not DeferralKind.ERROR


register_enum(JobKind)
register_enum(JobState)
register_enum(DeferralKind)


@frozen(repr=False)
class Callback:
    """Where and how to call the SPS back for one job.

    The token is a secret: it never appears in a repr, a log line or an error.
    """

    url: str
    token: str

    def __repr__(self) -> str:
        return f"Callback(url={self.url!r}, token=<redacted>)"


@frozen
class Deferral:
    """Why and until when a job released to the queue waits before its next try.

    ``kind``: whose fault it was (a transient kind spent no attempt; a job waiting for
    its SPS resumes as soon as the SPS answers again); ``since``: when the first
    transient fault of the job happened (None for a permanent failure's retry).
    """

    not_before: float
    reason: str
    kind: DeferralKind
    since: float | None = None


def _job_id() -> str:
    return uuid.uuid4().hex


#: The input types whose requests carry a region (IA-API.md §1.3).
REGION_INPUT_TYPES = frozenset({"taggedPolygon", "multiArea"})

#: How many cancellation tokens of earlier requests a merged job remembers.
MAX_MERGED_TOKENS = 16


def is_region_input(input: dict[str, Any] | None) -> bool:
    """Whether ``input`` selects a region (taggedPolygon, multiArea), not the whole slide."""
    if not input:
        return False
    return input.get("type", "wholeSlide") in REGION_INPUT_TYPES


def job_key(application_id: str, slide_id: str, input: dict[str, Any] | None) -> str:
    """Return the key under which requests for the same analysis are merged.

    Whole-slide requests (and notifications) for one slide share a key.  Requests with
    geometry (taggedPolygon, multiArea) are different analyses when their geometry
    differs, so the geometry is part of the key: each region is its own job with its
    own result, and only a request for the very same region merges.  The key is a
    hash: it is safe as a file name and carries no PHI.
    """
    h = hashlib.sha256()
    h.update(application_id.encode("utf-8"))
    h.update(b"\0")
    h.update(slide_id.encode("utf-8"))
    if input and input.get("type", "wholeSlide") != "wholeSlide":
        h.update(b"\0")
        h.update(json.dumps(input, sort_keys=True, separators=(",", ":")).encode("utf-8"))
    return h.hexdigest()[:32]


@frozen
class Job:
    """One accepted request, as persisted in the spool.

    ``created`` is the time of the first accepted request for this key (it keeps the
    job's place in the queue when newer requests are merged in); ``updated`` the time
    of the newest.  ``priority`` is higher-first.
    """

    slide_id: str
    application_id: str
    kind: JobKind
    callback: Callback
    created: float
    input: dict[str, Any] = field(factory=lambda: {"type": "wholeSlide"})
    key: str = field()
    job_id: str = field(factory=_job_id)
    updated: float = field()
    context: dict[str, Any] = field(factory=dict)
    cancellation_token: str | None = None
    image_info: dict[str, Any] | None = None
    priority: int = 0
    state: JobState = JobState.QUEUED
    attempts: int = 0
    result_id: int | None = None
    last_error: str | None = None
    #: Cancellation tokens of earlier requests merged into this job (oldest first): a
    #: cancel carrying one of them is for this job too.
    merged_tokens: tuple[str, ...] = ()
    #: A deferred job is not claimed before this (reactor) time; None: at once.
    not_before: float | None = None
    #: Why it waits (for the log and the admin tools); None when it does not.
    deferred_reason: str | None = None
    #: Whose fault the wait is (:class:`DeferralKind`); None when it does not wait.
    deferral_kind: DeferralKind | None = None
    #: When its first transient fault happened (its deferral age counts from here).
    deferred_since: float | None = None

    @key.default
    def _key_default(self) -> str:
        return job_key(self.application_id, self.slide_id, self.input)

    @updated.default
    def _updated_default(self) -> float:
        return self.created

    @property
    def is_region(self) -> bool:
        """Whether this job analyses a region (it then has a result of its own)."""
        return is_region_input(self.input)

    @property
    def recorded_key(self) -> str | None:
        """The key the job's result records: its own, or for a button press the key
        the pressed result recorded (so the result stays the one its analysis reuses)."""
        if self.kind is JobKind.ACTION:
            key = (self.input or {}).get("resultKey")
            return key if isinstance(key, str) else None
        return self.key

    def answers_to(self, cancellation_token: str) -> bool:
        """Whether a cancel carrying ``cancellation_token`` is for this job: the token of
        its request, or of an earlier request merged into it."""
        return cancellation_token == self.cancellation_token or (
            cancellation_token in self.merged_tokens
        )

    def sort_key(self) -> tuple[int, int, float, str]:
        """Dispatch order: manual requests first, then higher priority, then oldest."""
        manual = self.kind in (JobKind.CREATE, JobKind.ACTION)
        return (0 if manual else 1, -self.priority, self.created, self.job_id)

    def merged_with(self, newer: Job) -> Job:
        """Fold a newer request for the same key into this queued job.

        The newest callback URL, token, cancellation token, input and context win (an
        older token may have expired); the highest priority and the more urgent kind
        win; the queue position (``created``) and the attempt count are kept.  The
        older token is remembered (``merged_tokens``): either request may cancel.
        """
        token = newer.cancellation_token or self.cancellation_token
        earlier = [
            t
            for t in (*self.merged_tokens, self.cancellation_token, *newer.merged_tokens)
            if t is not None and t != token
        ]
        return attrs.evolve(
            self,
            callback=newer.callback,
            cancellation_token=token,
            merged_tokens=tuple(dict.fromkeys(earlier))[-MAX_MERGED_TOKENS:],
            input=newer.input,
            context=newer.context,
            image_info=newer.image_info if newer.image_info is not None else self.image_info,
            priority=max(self.priority, newer.priority),
            kind=JobKind.CREATE if JobKind.CREATE in (self.kind, newer.kind) else self.kind,
            result_id=newer.result_id if newer.result_id is not None else self.result_id,
            updated=max(self.updated, newer.updated),
        )

    def ready(self, now: float) -> bool:
        """Whether the job may be claimed at ``now`` (it waits for no deferral)."""
        return self.not_before is None or self.not_before <= now

    def without_secret(self) -> Job:
        """This job with its callback token removed, for history records: a finished
        job never calls the SPS again, so its token has no business on disk."""
        return attrs.evolve(self, callback=Callback(self.callback.url, ""))

    def to_json(self) -> bytes:
        """Serialise for the spool (the token included: spool files are 0600)."""
        return json.dumps(converter.unstructure(self), sort_keys=True).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes) -> Job:
        return converter.structure(json.loads(data), cls)
