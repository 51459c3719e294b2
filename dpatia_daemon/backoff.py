"""The restart policy of a supervised process: one :class:`Backoff` per slot.

procmon's policy: a process that ran long enough (and was healthy) is replaced at once
and resets the delay; one that died young waits the current delay, which then doubles
up to a cap.  The worker pool and the extra front doors both restart by it.  A leaf
module: it imports nothing of dpatia's.
"""

from __future__ import annotations

from attrs import define, field


@define
class Backoff:
    """Restart delays of one slot, with its own state.

    A process that ran at least ``healthy_after`` seconds (and was ``healthy``) is
    replaced after ``floor`` seconds (0: at once) and resets the delay to ``initial``;
    one that died young waits the current delay, which then doubles up to ``cap``.
    """

    initial: float = 1.0
    cap: float = 60.0
    healthy_after: float = 5.0
    #: The least delay, even after a healthy run (a front door is never restarted in
    #: the very turn it ended: the port it shares may still be in flux).
    floor: float = 0.0
    delay: float = field(init=False)

    @delay.default
    def _initial_delay(self) -> float:
        return self.initial

    def after_exit(self, lifetime: float, healthy: bool = True) -> float:
        """The delay before the next start, given how the last process lived."""
        if healthy and lifetime >= self.healthy_after:
            self.delay = self.initial
            return self.floor
        delay = min(self.delay, self.cap)
        self.delay = min(self.delay * 2, self.cap)
        return max(delay, self.floor)


__all__ = ["Backoff"]
