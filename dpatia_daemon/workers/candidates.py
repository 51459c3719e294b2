"""The candidates: a bounded window of the best queued jobs to try next, best first.

Fed by the spool's watch (so dispatch never lists the spool directory per event) and
refilled from ``spool.queued_head(limit)`` (the spool's index: the best ``limit`` jobs,
not a read of the whole queue) when it runs low (see :mod:`.dispatcher`).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable

from attrs import define, field

from ..jobs import Job

SortKey = tuple[int, int, float, str]

#: How many queued jobs the dispatcher keeps in memory (the best of the queue).
WINDOW = 512


@define
class Candidates:
    """At most ``limit`` jobs to try, best first by :meth:`Job.sort_key` (manual before
    notification, then priority, then oldest).

    A job offered again with a new sort key (a merge raised its priority) moves.  When
    the window is full, a better job pushes the worst one out and a worse one is left
    out; either way :attr:`truncated` then says the spool holds jobs this window does
    not, so it is refilled from the spool's head when it runs low.
    """

    limit: int = WINDOW
    truncated: bool = field(default=False, init=False)
    _order: list[tuple[SortKey, str]] = field(factory=list, init=False)  # best first
    _jobs: dict[str, tuple[SortKey, Job]] = field(factory=dict, init=False)

    def __len__(self) -> int:
        return len(self._jobs)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._jobs

    @property
    def low(self) -> bool:
        """Whether the window should be refilled: the spool holds more and a quarter
        or less of the window is left."""
        return self.truncated and len(self._jobs) <= self.limit // 4

    def offer(self, job: Job) -> bool:
        """Add (or re-rank) a queued job; False if it was left out (window full)."""
        key = job.sort_key()
        known = self._jobs.get(job.job_id)
        if known is not None:
            if known[0] == key:
                self._jobs[job.job_id] = (key, job)
                return True
            self._remove(job.job_id, known[0])
        elif len(self._jobs) >= self.limit:
            self.truncated = True
            if not self._order or key >= self._order[-1][0]:
                return False
            _, worst = self._order.pop()
            del self._jobs[worst]
        self._jobs[job.job_id] = (key, job)
        bisect.insort(self._order, (key, job.job_id))
        return True

    def _remove(self, job_id: str, key: SortKey) -> None:
        i = bisect.bisect_left(self._order, (key, job_id))
        if i < len(self._order) and self._order[i] == (key, job_id):
            del self._order[i]
        del self._jobs[job_id]

    def refill(self, jobs: Iterable[Job], *, complete: bool) -> int:
        """Offer the spool's head; ``complete``: it was the whole queue.  Return how many
        jobs were new to the window."""
        new = 0
        self.truncated = not complete
        for job in jobs:
            fresh = job.job_id not in self._jobs
            if self.offer(job) and fresh:
                new += 1
        return new

    def offer_all(self, jobs: Iterable[Job]) -> None:
        """Offer a listing of the whole queue (best first), up to the limit."""
        self.refill(jobs, complete=True)

    def pop(self) -> Job | None:
        """Remove and return the best job, or None when there is none."""
        if not self._order:
            return None
        _, job_id = self._order.pop(0)
        return self._jobs.pop(job_id)[1]


__all__ = ["WINDOW", "Candidates"]
