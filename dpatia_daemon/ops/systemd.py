"""systemd's notification protocol (sd_notify(3)): readiness, status, stop, watchdog.

Under ``Type=notify`` systemd passes ``NOTIFY_SOCKET`` (a datagram socket; a leading
``@`` names one in the abstract namespace) and, with ``WatchdogSec=``, ``WATCHDOG_USEC``
(and ``WATCHDOG_PID``).  The protocol is one datagram of ``KEY=value`` lines per
message, so it is written here directly: a package would be more code than this.

* :class:`SystemdEnvironment` takes those variables out of the process environment at
  start (``tap.py``), so no worker or extra front door inherits them and speaks for
  the daemon;
* :class:`Notifier` sends the datagrams;
* :class:`Readiness` (the ``systemd`` service, the last of the tree, so it stops
  first): ``READY=1`` once the reactor runs, the listener is bound and every worker
  said hello (or after ``ready_deadline`` seconds, saying which are missing: a worker
  in a crash loop must not keep the front door from accepting jobs), ``STATUS=`` every
  ``status_interval`` seconds (jobs by state, workers busy), ``STOPPING=1`` at stop;
* :class:`Watchdog` (the ``watchdog`` service, the first of the tree, so it stops
  last: pings go on through the drain) sends ``WATCHDOG=1`` every half
  ``WATCHDOG_USEC`` from a reactor timer.  A reactor that stalls (a blocking call, a
  deadlock) runs no timer, so the pings stop and systemd restarts the daemon after
  ``WatchdogSec``; a reactor that recovers pings once, not once per missed interval.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any, Protocol

from attrs import define, field, frozen
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from ..jobs import JobState
from ..spool import ISpool
from ..workers.events import SupervisorEvent
from ..workers.timers import every

log = Logger()

#: The variables of the protocol: taken out of the environment, never inherited.
VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


@frozen
class SystemdEnvironment:
    """What systemd told this process: where to notify, how often to ping (seconds)."""

    notify_socket: str | None = None
    watchdog_interval: float | None = None

    @classmethod
    def take(cls, environ: MutableMapping[str, str], pid: int | None = None) -> SystemdEnvironment:
        """Read and remove the protocol's variables from ``environ`` (``os.environ``).

        The watchdog is ours only when ``WATCHDOG_PID`` is unset or is our ``pid``.
        """
        values = {name: environ.pop(name, None) for name in VARIABLES}
        interval = None
        usec, owner = values["WATCHDOG_USEC"], values["WATCHDOG_PID"]
        if usec and usec.isdigit() and int(usec) > 0:
            if owner is None or owner == str(os.getpid() if pid is None else pid):
                interval = int(usec) / 1e6
        return cls(notify_socket=values["NOTIFY_SOCKET"] or None, watchdog_interval=interval)


@define
class Notifier:
    """Sends sd_notify datagrams to ``address`` (``NOTIFY_SOCKET``).

    A send that fails (systemd gone, socket full) is logged once and dropped: the
    protocol has no replies and the daemon's work must not depend on it.
    """

    address: str
    _socket: socket.socket | None = field(default=None, init=False, repr=False)
    _warned: bool = field(default=False, init=False)

    def send(self, **fields: str) -> None:
        """Send one message: ``send(READY="1", STATUS="...")``."""
        message = "".join(f"{name}={value}\n" for name, value in fields.items())
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            if self._socket is None:
                self._socket = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                )
                self._socket.setblocking(False)
            self._socket.sendto(message.encode("utf-8", "replace"), target)
        except OSError as e:
            if not self._warned:
                self._warned = True
                log.warn(
                    "cannot notify systemd at {address}: {error}", address=self.address, error=e
                )


def describe(counts: Mapping[JobState, int], workers: list[dict[str, Any]] | None) -> str:
    """The ``STATUS=`` text: the jobs not yet over by state, then the workers busy."""
    jobs = ", ".join(
        f"{counts.get(state, 0)} {state.value}" for state in JobState if not state.terminal
    )
    if workers is None:
        return f"jobs: {jobs}; no workers here"
    busy = sum(1 for w in workers if w["state"] == "busy")
    up = sum(1 for w in workers if _up(w))
    text = f"jobs: {jobs}; workers: {busy} of {len(workers)} busy"
    if up < len(workers):
        text += f", {len(workers) - up} not up"
    return text


class WorkerStates(Protocol):
    """What :class:`Readiness` reads of the workers (the ``workers`` supervisor)."""

    def snapshot(self) -> list[dict[str, Any]]: ...

    def observe(self, callback: Callable[[SupervisorEvent], None]) -> Callable[[], None]: ...


def _up(worker: Mapping[str, Any]) -> bool:
    return worker["state"] in ("idle", "busy")


@define(eq=False)
class Readiness(Service):
    """The ``systemd`` service: READY, STATUS and STOPPING (see the module docstring).

    Collaborators: the ``reactor`` (``IReactorCore`` + ``IReactorTime``), the
    ``notifier``, the ``spool`` (its counts) and the ``workers`` supervisor (None in a
    daemon without workers).
    """

    reactor: Any
    notifier: Notifier
    spool: ISpool
    workers: WorkerStates | None = None
    status_interval: float = 10.0
    ready_deadline: float = 60.0
    _ready: bool = field(default=False, init=False)
    _unobserve: Callable[[], None] | None = field(default=None, init=False)
    _deadline: Any = field(default=None, init=False)
    _status: LoopingCall | None = field(default=None, init=False)

    def startService(self) -> None:
        Service.startService(self)
        self.reactor.callWhenRunning(self._running)

    def _running(self) -> None:
        if not self.running:
            return
        if self.workers is not None and not self._workers_up():
            self._unobserve = self.workers.observe(self._worker_event)
            self._deadline = self.reactor.callLater(self.ready_deadline, self._late)
        else:
            self._declare_ready()

    def _workers_up(self) -> bool:
        return self.workers is None or all(_up(w) for w in self.workers.snapshot())

    def _worker_event(self, event: SupervisorEvent) -> None:
        if event.kind == "worker-ready" and not self._ready and self._workers_up():
            self._declare_ready()

    def _late(self) -> None:
        self._deadline = None
        if not self._ready:
            snapshot = [] if self.workers is None else self.workers.snapshot()
            log.warn(
                "workers {missing} not started within {seconds} s: telling systemd the "
                "daemon is ready anyway (jobs are accepted and wait in the queue)",
                missing=", ".join(
                    str(w.get("worker") or f"slot {w.get('slot')}") for w in snapshot if not _up(w)
                ),
                seconds=self.ready_deadline,
            )
            self._declare_ready()

    def _stop_waiting(self) -> None:
        """No more waiting for the workers: unsubscribe, cancel the deadline."""
        if self._unobserve is not None:
            self._unobserve()
            self._unobserve = None
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _declare_ready(self) -> None:
        self._ready = True
        self._stop_waiting()
        self.notifier.send(READY="1", STATUS="ready")
        self._status = every(self.reactor, self.status_interval, self._report, now=True)

    def _report(self) -> Deferred[None]:
        """Send ``STATUS=`` with the spool's counts and the workers' states."""
        return Deferred.fromCoroutine(self._send_status())

    async def _send_status(self) -> None:
        counts = await self.spool.counts()
        if not self.running:
            return
        workers = None if self.workers is None else self.workers.snapshot()
        self.notifier.send(STATUS=describe(counts, workers))

    def stopService(self) -> None:
        Service.stopService(self)
        if self._status is not None and self._status.running:
            self._status.stop()
        self._status = None
        self._stop_waiting()
        self.notifier.send(
            STOPPING="1", STATUS="stopping: running jobs finish or go back to the queue"
        )


@define(eq=False)
class Watchdog(Service):
    """The ``watchdog`` service: ``WATCHDOG=1`` every ``interval / 2`` seconds of the
    ``clock`` while the reactor runs its timers (see the module docstring)."""

    clock: IReactorTime
    notifier: Notifier
    interval: float
    _loop: LoopingCall | None = field(default=None, init=False)

    def startService(self) -> None:
        Service.startService(self)
        self._loop = every(self.clock, self.interval / 2, self._ping, now=True)

    def _ping(self) -> None:
        self.notifier.send(WATCHDOG="1")

    def stopService(self) -> None:
        Service.stopService(self)
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None


__all__ = ["Notifier", "Readiness", "SystemdEnvironment", "Watchdog", "WorkerStates", "describe"]
