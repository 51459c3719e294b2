"""Whether the spool can take another job: :class:`AcceptGate`.

Before a job is committed the front door asks the gate; with too little free space
(``[spool] min_free_bytes``) or too many queued records (``[spool] max_queued``), or
when the commit itself meets a full disk or quota (ENOSPC, EDQUOT), the request is
answered ``503`` with ``Retry-After`` and a JSON error naming the cause
(:class:`SpoolFull`).  Nothing is written for a refused request, and a failed commit
leaves no temp file behind (the spool removes what it wrote), so the jobs already
accepted are untouched.

The check is cheap per request: the spool is measured (one ``statvfs``, and one
listing of ``queued/`` only when ``max_queued`` is set) at most every ``interval``
seconds of reactor time, and concurrent requests share one measurement.  After a
full disk at commit, requests are refused for ``interval`` without trying.  One
warning is logged when the front door starts refusing and one when it accepts again.
"""

from __future__ import annotations

import errno
from collections.abc import Awaitable
from typing import NoReturn, TypeVar

from attrs import define, field
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..spool import ISpool, SpoolRoom
from .site import Unavailable

log = Logger()

T = TypeVar("T")

#: What the ``Retry-After`` of a refusal says, in seconds.
RETRY_AFTER = 30
#: The errors of a write that found no room: a full filesystem, an exhausted quota.
NO_ROOM = frozenset({errno.ENOSPC, errno.EDQUOT})


class SpoolFull(Unavailable):
    """The spool has no room for another job now: 503, ``Retry-After``."""

    def __init__(self, cause: str) -> None:
        super().__init__(f"the daemon cannot take new jobs now: {cause}", RETRY_AFTER)
        self.cause = cause


@define
class AcceptGate:
    """Refuses new jobs while the spool has no room (see the module docstring).

    Collaborators: the ``spool`` measured and the ``clock`` that paces measurements;
    ``min_free_bytes`` and ``max_queued`` (0: no limit) are ``[spool]``'s.
    """

    spool: ISpool
    clock: IReactorTime
    min_free_bytes: int = 0
    max_queued: int = 0
    interval: float = 2.0
    #: Why new jobs are refused now; None while they are accepted.
    refusing: str | None = field(default=None, init=False)
    _room: SpoolRoom | None = field(default=None, init=False)
    _measured: float = field(default=float("-inf"), init=False)
    _waiters: list[Deferred[SpoolRoom | None]] = field(factory=list, init=False)
    _full_until: float = field(default=float("-inf"), init=False)
    _full_cause: str = field(default="", init=False)

    async def check(self) -> None:
        """Raise :class:`SpoolFull` if the spool has no room for another job now."""
        if self.clock.seconds() < self._full_until:
            self._refuse(self._full_cause)
        if not self.min_free_bytes and not self.max_queued:
            return
        room = await self._current()
        if room is None:
            return  # not measurable: the commit finds out
        if room.free_bytes < self.min_free_bytes:
            self._refuse(
                f"the spool's filesystem has {room.free_bytes} bytes free, less than "
                f"[spool] min_free_bytes ({self.min_free_bytes})"
            )
        if self.max_queued and room.queued is not None and room.queued >= self.max_queued:
            self._refuse(
                f"{room.queued} jobs are queued, as many as [spool] max_queued allows "
                f"({self.max_queued})"
            )

    async def commit(self, adding: Awaitable[T]) -> T:
        """Await ``adding`` (a spool add); a full disk or quota becomes :class:`SpoolFull`."""
        try:
            added = await adding
        except OSError as e:
            if e.errno not in NO_ROOM:
                raise
            cause = f"the spool's filesystem is full ({e.strerror or errno.errorcode[e.errno]})"
            self._full_until = self.clock.seconds() + self.interval
            self._full_cause = cause
            self._measured = float("-inf")  # measure again once the pause is over
            self._refuse(cause)
        if self.refusing is not None:
            log.warn("the spool has room again: accepting new jobs")
            self.refusing = None
        if self._room is not None and self._room.queued is not None:
            # Until the next measurement, count our own adds (a merge adds no record,
            # so this errs on the side of refusing).
            self._room = SpoolRoom(self._room.free_bytes, self._room.queued + 1)
        return added

    def _refuse(self, cause: str) -> NoReturn:
        if self.refusing is None:
            log.warn("refusing new jobs (503): {cause}", cause=cause)
        self.refusing = cause
        raise SpoolFull(cause)

    def _current(self) -> Deferred[SpoolRoom | None]:
        """The last measurement if recent enough, else a new one (shared)."""
        if self.clock.seconds() - self._measured < self.interval:
            return succeed(self._room)
        d: Deferred[SpoolRoom | None] = Deferred()
        self._waiters.append(d)
        if len(self._waiters) == 1:
            self.spool.room(count_queued=bool(self.max_queued)).addBoth(self._measured_now)
        return d

    def _measured_now(self, result: SpoolRoom | Failure) -> None:
        waiters, self._waiters = self._waiters, []
        room: SpoolRoom | None = None
        if isinstance(result, Failure):
            log.warn(
                "could not measure the spool's free space ({error}); not refusing for it",
                error=str(result.value),
            )
        else:
            room = result
        self._room = room
        self._measured = self.clock.seconds()
        for d in waiters:
            d.callback(room)
