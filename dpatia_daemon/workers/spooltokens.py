"""Newer callback tokens that another daemon on the spool received, for this daemon's
running jobs: :class:`SpoolTokenWatch`.

A request for a slide whose job is running becomes (or merges into) the key's QUEUED
record, with the newest callback, in whichever daemon's front door it reached.  This
daemon's :class:`~dpatia_daemon.sps.tokens.TokenBook` hears only of its own front
door's requests, so every ``interval`` seconds (the heartbeat) the watch asks the
spool, for each running job's key, whether its QUEUED record changed: one ``stat`` a
running job (the record is read only when its inode, mtime or size changed; a listing
never).  A record whose callback is newer than the one the running job has goes into
the token book, whose listener (the dispatcher) hands it to the job's worker at once,
as for a token this daemon received itself.
"""

from __future__ import annotations

from collections.abc import Callable

from attrs import define, field
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from ..jobs import Job
from ..spool import ISpool
from ..sps.tokens import TokenBook

log = Logger()


@define(eq=False)
class SpoolTokenWatch:
    """Pushes callbacks that reached the spool through other daemons to running jobs.

    Collaborators: the ``spool``, the ``clock`` that times the checks, ``running()``
    (the jobs running here now, as their runs know them) and the ``tokens`` book the
    newer callbacks are recorded in.
    """

    spool: ISpool
    clock: IReactorTime
    running: Callable[[], list[Job]]
    tokens: TokenBook
    interval: float = 5.0
    #: The tag of each running key's QUEUED record when last looked at.
    _seen: dict[str, object] = field(factory=dict, init=False)
    _loop: LoopingCall | None = field(default=None, init=False)

    def start(self) -> None:
        """Check every ``interval`` seconds from now on (not at once: nothing runs yet)."""
        self._loop = LoopingCall(self._tick)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=False).addErrback(
            lambda f: log.failure("the spool token watch stopped", f)
        )

    def stop(self) -> None:
        """Stop checking."""
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def _tick(self) -> Deferred[None]:
        # A LoopingCall dies on its first exception: check() catches and logs.
        return ensureDeferred(self.check())

    async def check(self) -> None:
        """Look once at the QUEUED record of every running job's key."""
        jobs = self.running()
        keys = {job.key for job in jobs}
        for key in list(self._seen):
            if key not in keys:
                del self._seen[key]
        for job in jobs:
            try:
                tag, queued = await self.spool.queued_of(job.key, self._seen.get(job.key))
            except Exception:
                log.failure("job {job_id}: could not look for a newer token", job_id=job.job_id)
                continue
            self._seen[job.key] = tag
            if queued is None or queued.callback == job.callback:
                continue
            if queued.updated < job.updated:
                continue  # an older request, queued behind the running one long ago
            log.info(
                "job {job_id}: a newer callback token reached the spool (job {queued_id})",
                job_id=job.job_id,
                queued_id=queued.job_id,
            )
            self.tokens.record(job.application_id, job.slide_id, queued.callback, queued.updated)


__all__ = ["SpoolTokenWatch"]
