"""One shared view of each SPS's health: :class:`SPSHealth`, by callback base URL.

While an SPS fails, every job for it would fail the same way: rather than each job
burning its own retry cycle against it, the dispatcher asks :meth:`SPSHealth.down`
before claiming, and holds the SPS's jobs back.  One of them at a time goes through
as a *probe* every ``probe_interval`` seconds (or when the SPS's Retry-After says);
the first success of any call to that SPS (a probe's, or any other job's) clears it,
and :meth:`SPSHealth.subscribe`'s listeners then resume every job waiting for it at
once, whatever their own backoff said.  Each change is one log line with structured
fields (``sps``, ``reason``, ``down_seconds``).  Pure bookkeeping on a clock: it makes
no calls itself.
"""

from __future__ import annotations

from collections.abc import Callable

from attrs import define, field
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

log = Logger()


def sps_of(url: str) -> str:
    """The key of the SPS a callback URL belongs to (its base URL, without a trailing /)."""
    return url.rstrip("/")


@define
class _Down:
    """An SPS that is failing: since when, why, its next probe and the probe running."""

    since: float
    reason: str
    next_probe: float
    probe: str | None = None


@define(eq=False)
class SPSHealth:
    """Which SPSes are failing, and when each is probed next.

    Collaborators: the ``clock``; ``probe_interval`` is the least time between two
    probes of one failing SPS.
    """

    clock: IReactorTime
    probe_interval: float = 10.0
    _down: dict[str, _Down] = field(factory=dict, init=False)
    _listeners: list[Callable[[str], None]] = field(factory=list, init=False)

    def down(self, url: str) -> bool:
        """Whether the SPS of callback ``url`` is failing (its jobs wait)."""
        return sps_of(url) in self._down

    def failing(self) -> dict[str, str]:
        """Every failing SPS and why (for the status page and tests)."""
        return {sps: down.reason for sps, down in self._down.items()}

    def failed(self, url: str, reason: str, retry_after: float | None = None) -> None:
        """A call to the SPS of ``url`` failed transiently (a probe's included)."""
        sps, now = sps_of(url), self.clock.seconds()
        wait = max(self.probe_interval, retry_after or 0.0)
        known = self._down.get(sps)
        if known is None:
            self._down[sps] = _Down(now, reason, now + wait)
            log.warn(
                "SPS {sps} is failing ({reason}); its jobs wait, probed every {interval:g} s",
                sps=sps,
                reason=reason,
                interval=self.probe_interval,
                retry_after=retry_after,
            )
            return
        known.reason = reason
        known.probe = None
        known.next_probe = max(known.next_probe, now + wait)

    def suspect(self, url: str, reason: str) -> None:
        """A job deferred elsewhere (another daemon, an earlier run) waits for ``url``:
        treat its SPS as failing until a probe, due now, says otherwise."""
        sps = sps_of(url)
        if sps not in self._down:
            now = self.clock.seconds()
            self._down[sps] = _Down(now, reason, now)

    def succeeded(self, url: str) -> None:
        """A call to the SPS of ``url`` succeeded: it is healthy; tell the listeners."""
        sps = sps_of(url)
        known = self._down.pop(sps, None)
        if known is None:
            return
        log.info(
            "SPS {sps} answers again (failing for {down_seconds:.0f} s); its jobs resume",
            sps=sps,
            down_seconds=self.clock.seconds() - known.since,
        )
        for listener in list(self._listeners):
            try:
                listener(sps)
            except Exception:
                log.failure("an SPS health listener failed", sps=sps)

    def probe_due(self, url: str) -> bool:
        """Whether a job for the failing SPS of ``url`` may go through now as its probe."""
        known = self._down.get(sps_of(url))
        return (
            known is not None and known.probe is None and known.next_probe <= self.clock.seconds()
        )

    def next_probe(self, url: str) -> float | None:
        """When the failing SPS of ``url`` is probed next (None: it is not failing);
        while a probe runs, one interval from now (its outcome decides)."""
        known = self._down.get(sps_of(url))
        if known is None:
            return None
        if known.probe is not None:
            return max(known.next_probe, self.clock.seconds() + self.probe_interval)
        return known.next_probe

    def is_probe(self, url: str, job_id: str) -> bool:
        """Whether job ``job_id`` is the probe of the failing SPS of ``url``."""
        known = self._down.get(sps_of(url))
        return known is not None and known.probe == job_id

    def probing(self, url: str, job_id: str) -> None:
        """Job ``job_id`` goes through as the probe of the SPS of ``url``."""
        known = self._down.get(sps_of(url))
        if known is not None:
            known.probe = job_id
            log.info("SPS {sps}: job {job_id} probes it", sps=sps_of(url), job_id=job_id)

    def probe_ended(self, url: str, job_id: str) -> None:
        """Job ``job_id`` ended without saying how the SPS is (cancelled, say): the next
        probe is due after the interval."""
        known = self._down.get(sps_of(url))
        if known is not None and known.probe == job_id:
            known.probe = None
            known.next_probe = max(known.next_probe, self.clock.seconds() + self.probe_interval)

    def subscribe(self, listener: Callable[[str], None]) -> Callable[[], None]:
        """Call ``listener(sps)`` whenever a failing SPS answers again; return an
        unsubscribe."""
        self._listeners.append(listener)

        def unsubscribe() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return unsubscribe


__all__ = ["SPSHealth", "sps_of"]
