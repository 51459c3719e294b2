"""Cancellations made through this daemon reach its running jobs at once.

The front door cancels a running job by ``spool.request_cancel`` (a durable marker that
any daemon on the spool sees by polling).  When the job runs in this very daemon there
is no need to wait for the poll: :class:`PushCancels` is the spool as the front door
sees it, and after the marker is written it tells the dispatcher (which sends
``CancelJob`` to the job's worker at once).  Polling stays for cancellations made
through another process on the same spool (an extra front door, another daemon).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from attrs import define
from twisted.internet.defer import Deferred
from zope.interface import implementer

from ..spool import ISpool

#: The reason a pushed cancellation gives (the same as the poll's).
REASON = "cancellation requested"


@implementer(ISpool)
@define
class PushCancels:
    """``spool`` with a ``request_cancel`` that also calls ``cancel_running(job_id,
    reason)`` once the request is durable; every other call goes to ``spool`` as is."""

    spool: ISpool
    cancel_running: Callable[[str, str], bool]

    def request_cancel(self, job_id: str) -> Deferred[None]:
        """Ask the holder of a RUNNING job to stop it; if we hold it, stop it now."""

        def push(result: None) -> None:
            self.cancel_running(job_id, REASON)
            return result

        return self.spool.request_cancel(job_id).addCallback(push)

    def __getattr__(self, name: str) -> Any:
        # Only names not defined here reach this: the rest of the spool's interface.
        if name == "spool":
            raise AttributeError(name)  # not set yet (copying, unpickling)
        return getattr(self.spool, name)


__all__ = ["PushCancels"]
