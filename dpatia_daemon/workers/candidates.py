"""The candidates: the in-memory list of queued jobs to try next, best first.

Fed by the spool's watch (so dispatch never lists the spool directory per event) and
refilled from ``spool.queued()`` only when it runs dry (see :mod:`.dispatcher`).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable

from attrs import define, field

from ..jobs import Job, JobKind

SortKey = tuple[int, int, float, str]


@define
class Candidates:
    """Jobs to try, best first by :meth:`Job.sort_key` (manual before notification,
    then priority, then oldest).

    A job offered again with a new sort key (a merge raised its priority) moves; stale
    heap entries are skipped on pop.  At most ``limit`` notifications are held (a
    manual request is always taken): past that, :attr:`truncated` says the spool
    holds more than this list, so it is listed again once the list runs dry.
    """

    limit: int = 10000
    truncated: bool = field(default=False, init=False)
    _heap: list[tuple[SortKey, str]] = field(factory=list, init=False)
    _jobs: dict[str, tuple[SortKey, Job]] = field(factory=dict, init=False)

    def __len__(self) -> int:
        return len(self._jobs)

    def offer(self, job: Job) -> bool:
        """Add (or re-rank) a queued job; False if it was left out (list full)."""
        key = job.sort_key()
        known = self._jobs.get(job.job_id)
        if known is None and len(self._jobs) >= self.limit and job.kind is not JobKind.CREATE:
            self.truncated = True
            return False
        self._jobs[job.job_id] = (key, job)
        if known is not None and known[0] == key:
            return True
        heapq.heappush(self._heap, (key, job.job_id))
        if len(self._heap) > 2 * len(self._jobs) + 64:
            # Re-ranked jobs leave stale entries behind; compact now and then.
            self._heap = [(k, i) for i, (k, _) in self._jobs.items()]
            heapq.heapify(self._heap)
        return True

    def offer_all(self, jobs: Iterable[Job]) -> None:
        """Add a ``queued()`` listing (best first), up to the limit."""
        self.truncated = False
        for job in jobs:
            if not self.offer(job):
                break

    def pop(self) -> Job | None:
        """Remove and return the best job, or None when there is none."""
        while self._heap:
            key, job_id = heapq.heappop(self._heap)
            known = self._jobs.get(job_id)
            if known is not None and known[0] == key:
                del self._jobs[job_id]
                return known[1]
        return None


__all__ = ["Candidates"]
