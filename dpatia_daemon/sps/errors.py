"""The errors of SPS calls: the :class:`SPSError` family, and the redaction they rely on.

Every failure of a call to the SPS surfaces as one :class:`SPSError` subclass, whatever
went wrong below (a refused connection, a deadline, a 5xx, a malformed answer); callers
catch these and nothing else.  An error names the endpoint *template*
(``GET slides/{id}/info``), never a URL, and keeps at most a short excerpt of the answer
with every secret of the call redacted (:func:`excerpt`).

Transient or permanent (Postfix's distinction): :func:`is_transient` says whether a
failed call is worth trying again later unchanged (the SPS unreachable, a deadline, a
5xx, 429) or not (any other 4xx, an answer that breaks the IA-API).  The workers
defer a job on a transient failure and spend an attempt on a permanent one.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from ..models import InvalidInput

__all__ = [
    "REDACTED",
    "SPSConflict",
    "SPSError",
    "SPSNotFound",
    "SPSProtocolError",
    "SPSTimeout",
    "SPSUnauthorized",
    "SPSUnavailable",
    "error_for_status",
    "excerpt",
    "is_transient",
    "protocol_error",
    "redact",
]

#: What stands in an excerpt, a message or a repr where a secret was.
REDACTED = "<redacted>"
_EXCERPT_CHARS = 300


class SPSError(Exception):
    """A call to the SPS failed.

    ``endpoint`` is the method and path *template* (``GET slides/{id}/info``), never a
    URL; ``status`` the HTTP status when one arrived; ``body_excerpt`` the first ~300
    characters of the answer, with every secret of the call redacted.
    """

    def __init__(
        self,
        message: str,
        *,
        endpoint: str,
        status: int | None = None,
        body_excerpt: str = "",
        retry_after: float | None = None,
    ) -> None:
        """Keep the message, endpoint template, status, redacted excerpt and the
        answer's ``Retry-After`` (seconds, when it sent one)."""
        super().__init__(message)
        self.message = message
        self.endpoint = endpoint
        self.status = status
        self.body_excerpt = body_excerpt
        self.retry_after = retry_after

    def __str__(self) -> str:
        text = f"{self.endpoint}: {self.message}"
        if self.status is not None:
            text += f" (HTTP {self.status})"
        if self.body_excerpt:
            text += f": {self.body_excerpt!r}"
        return text

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(endpoint={self.endpoint!r}, status={self.status!r}, "
            f"message={self.message!r}, body_excerpt={self.body_excerpt!r})"
        )


class SPSUnauthorized(SPSError):
    """401 or 403: the token is expired, revoked or lacks the permission."""


class SPSNotFound(SPSError):
    """404: the slide, result or application does not exist (or is not visible)."""


class SPSConflict(SPSError):
    """The SPS rejected a write because the ``versionId`` sent is not the current one."""


class SPSUnavailable(SPSError):
    """The SPS could not be reached or kept failing (connection errors, 5xx, 429)."""


class SPSTimeout(SPSUnavailable):
    """An attempt hit the deadline; raised when it was the last one or not retryable."""


class SPSProtocolError(SPSError):
    """The SPS answered 2xx with something that is not what the IA-API promises."""


def is_transient(error: SPSError) -> bool:
    """Whether ``error`` is worth trying again later, unchanged (Postfix's 4xx).

    Transient: the SPS could not be reached, a deadline passed, 5xx, 429 (all
    :class:`SPSUnavailable`), and a 503 or 429 answer that any caller wrapped.
    Permanent: every other 4xx, a redirect, a malformed answer.  404 is the caller's
    to judge (a deleted result, or an SPS not itself yet after a restart).
    """
    if isinstance(error, SPSUnavailable):
        return True
    return error.status is not None and (error.status == 429 or error.status >= 500)


def redact(text: str, secrets: Iterable[str]) -> str:
    """Replace every occurrence of every secret."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    return text


def excerpt(body: bytes, secrets: Sequence[str]) -> str:
    """The first ~300 characters of a body, decoded leniently, every secret redacted.

    Redaction happens before truncation, so a token cut in half at the edge cannot
    leave its first half behind.
    """
    longest = max((len(s) for s in secrets), default=0)
    text = body[: 4 * (_EXCERPT_CHARS + longest)].decode("utf-8", errors="replace")
    return redact(text, secrets)[:_EXCERPT_CHARS].strip()


def error_for_status(
    endpoint: str,
    code: int,
    body: bytes,
    secrets: Sequence[str],
    *,
    conflict_aware: bool,
    attempts: int | None,
    retry_after: float | None = None,
) -> SPSError:
    """The :class:`SPSError` subclass for a non-2xx answer.

    ``conflict_aware``: the call sends a ``versionId``, so a 4xx that mentions it is a
    conflict; ``attempts``: how many attempts a retryable status was given (None: it
    was not retried); ``retry_after``: the answer's ``Retry-After`` in seconds.
    """
    kwargs: dict[str, Any] = {
        "endpoint": endpoint,
        "status": code,
        "body_excerpt": excerpt(body, secrets),
        "retry_after": retry_after,
    }
    if code in (401, 403):
        return SPSUnauthorized("token rejected", **kwargs)
    if code == 404:
        return SPSNotFound("not found", **kwargs)
    if code in (409, 412) or (
        conflict_aware and 400 <= code < 500 and b"versionid" in body.lower()
    ):
        return SPSConflict("versionId conflict", **kwargs)
    if code == 429 or code >= 500:
        how = f"after {attempts} attempts" if attempts else "not retried"
        return SPSUnavailable(f"SPS unavailable ({how})", **kwargs)
    if 300 <= code < 400:
        return SPSError("unexpected redirect (redirects are not followed)", **kwargs)
    return SPSError("request rejected", **kwargs)


def protocol_error(
    endpoint: str, problem: object, code: int, body: bytes, secrets: Sequence[str]
) -> SPSProtocolError:
    """An :class:`SPSProtocolError` for a 2xx answer that is not what the API promises."""
    if isinstance(problem, InvalidInput):
        problem = f"{problem.message} at {problem.field}"
    return SPSProtocolError(
        f"malformed answer: {redact(str(problem), secrets)}",
        endpoint=endpoint,
        status=code,
        body_excerpt=excerpt(body, secrets),
    )
