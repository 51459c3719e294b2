"""Extra front-door processes that share the daemon's listening port.

One Python process answers a few hundred to a thousand requests a second, whatever the
cores: its interpreter runs one thread at a time.  With ``[server] processes = N`` the
daemon listens with ``SO_REUSEPORT`` and spawns N - 1 copies of itself that listen on
the same port the same way, with no workers: the kernel spreads new connections evenly
over the N sockets, and each process commits what it accepts to the shared spool, as
several daemons on one spool directory do (see ``spool.py``).  The workers stay in the
main process.  (A single shared socket balances badly: the first process awake takes
a whole burst of keep-alive connections.  Only processes of the same user can join a
``SO_REUSEPORT`` group, so no other account can listen in.)

* :class:`FrontDoors` (main process) spawns and supervises the copies (``python -m
  dpatia_daemon.frontdoor.child``, which is ``twistd``), with the worker pool's record
  of a process and its backoff: one that exits is started again after a backoff; at
  stop they are told to stop and awaited.  Each
  copy writes the id of every job it queues to a pipe (fd 3), and the main process
  announces it to its dispatcher at once, instead of at the next spool sweep.
* :class:`ReusePortListener` listens (in every process); :class:`ParentLink` (in a
  copy) reports queued jobs and stops the copy when the main process is gone (its end
  of the copy's stdin closes, even after a SIGKILL).

Copies write their log to the main process's stdout and stderr (the journal) directly.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from attrs import define, field
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred, succeed
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import ProcessProtocol, Protocol
from twisted.internet.stdio import StandardIO
from twisted.logger import Logger

from ..backoff import Backoff
from ..jobs import Job
from ..workers.pool import LIVE, Slot, Worker, WorkerState, child_environ

log = Logger()

#: The fd a copy writes "<job id> <key>" lines to, one per job it queued.
NOTICE_FD = 3

#: A line on that fd starting with this carries the copy's metrics counts (JSON, the
#: totals since it started: see :mod:`dpatia_daemon.ops.metrics`).
COUNTS_PREFIX = b"counts "

#: The module a copy runs: ``twistd`` under a name of its own (see :mod:`.child`).
COPY_MODULE = "dpatia_daemon.frontdoor.child"


def reuseport_address(listen: str) -> tuple[str, int, int]:
    """(interface, port, backlog) of a ``tcp:`` endpoint description."""
    from twisted.internet.endpoints import TCP4ServerEndpoint, serverFromString

    endpoint = serverFromString(None, listen) if listen.startswith("tcp:") else None
    if not isinstance(endpoint, TCP4ServerEndpoint):
        raise ValueError("needs a plain tcp: listener")
    # Twisted keeps the parsed values private; they have not moved in a decade.
    return endpoint._interface, endpoint._port, endpoint._backlog


class ReusePortListener(Service):
    """Listens on ``listen`` (a ``tcp:`` description) with SO_REUSEPORT; ``port`` fires
    with the listening port once it is bound (the start fails if it cannot be)."""

    def __init__(self, reactor: Any, listen: str, factory: Any) -> None:
        self.reactor = reactor
        self.listen = listen
        self.factory = factory
        self.port: Deferred[IListeningPort] = Deferred()
        self.listening: IListeningPort | None = None

    def startService(self) -> None:
        super().startService()
        interface, number, backlog = reuseport_address(self.listen)
        family = socket.AF_INET6 if ":" in interface else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            self._bind(sock, family, interface, number, backlog)
        except OSError as e:
            sock.close()
            raise SystemExit(f"dpatia: cannot listen on {self.listen}: {e.strerror or e}") from None
        try:
            # Twisted duplicates the descriptor: ours is closed below.
            self.listening = self.reactor.adoptStreamPort(sock.fileno(), family, self.factory)
        finally:
            sock.close()
        self.port.callback(self.listening)

    @staticmethod
    def _bind(sock: socket.socket, family: int, interface: str, number: int, backlog: int) -> None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((interface or ("::" if family == socket.AF_INET6 else ""), number))
        sock.listen(backlog)
        sock.setblocking(False)

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        if self.listening is None:
            return None
        port, self.listening = self.listening, None
        return port.stopListening()  # type: ignore[no-any-return]


# --- the main process ------------------------------------------------------------------


class _Copy(ProcessProtocol):
    """One running copy: relays its job notices; reports its end to its record."""

    def __init__(self, owner: FrontDoors, worker: Worker) -> None:
        self.owner = owner
        self.worker = worker
        self.buffer = b""
        self.noticed = False

    @property
    def number(self) -> int:
        return self.worker.slot.number

    def childDataReceived(self, fd: int, data: bytes) -> None:
        if fd != NOTICE_FD:
            return
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        for line in lines:
            if line.startswith(COUNTS_PREFIX):
                self.owner.counted(self.number, line[len(COUNTS_PREFIX) :])
                continue
            words = line.decode("ascii", "replace").split()
            if len(words) != 2:
                log.warn(
                    "front door {number} sent {line!r}: ignored", number=self.number, line=line
                )
                continue
            if not self.noticed:
                self.noticed = True
                log.info("front door {number} reports the jobs it queues", number=self.number)
            job_id, key = words
            ensureDeferred(self.owner.notice(job_id, key)).addErrback(self._lookup_failed, job_id)

    def _lookup_failed(self, failure: Any, job_id: str) -> None:
        log.failure(
            "could not look up job {job_id} from front door {number}",
            failure,
            job_id=job_id,
            number=self.number,
        )

    def processEnded(self, reason: Any) -> None:
        self.owner._ended(self.worker, reason)


@define(eq=False)
class FrontDoors(Service):
    """Spawns ``count`` copies of the daemon once ``port`` (from ``listen``) is bound.

    ``argv`` is the copy's command line after ``twistd dpatia`` (the daemon's config;
    ``--listen`` with the bound port and ``--front-door N`` are appended); ``notice``
    is called with the id of each job a copy queued.  Each copy has a
    :class:`~dpatia_daemon.workers.pool.Slot` with its restart
    :class:`~dpatia_daemon.backoff.Backoff` and the record of its current process (a
    :class:`~dpatia_daemon.workers.pool.Worker`: ``starting`` until spawned, then
    ``idle`` while it serves, ``stopping``, ``dead``), as the worker pool keeps them.
    """

    reactor: Any
    count: int
    port: Deferred[IListeningPort]
    listen: str
    argv: list[str]
    notice: Callable[[str, str], Coroutine[Any, Any, None]]
    #: Restart backoff: first (and least) delay, doubled per quick exit, capped.
    backoff: float = 1.0
    max_backoff: float = 30.0
    #: A copy that ran this long before it exited restarts after the first delay again.
    stable_after: float = 60.0
    stop_timeout: float = 30.0
    #: ``on_counts(number, payload)``: a copy's metrics counts (payload None: it ended).
    on_counts: Callable[[int, bytes | None], None] | None = None
    _slots: list[Slot] = field(factory=list, init=False)
    _listen: str | None = field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        Service.__init__(self)

    def startService(self) -> None:
        super().startService()
        self.port.addCallback(self._bound)

    def _bound(self, port: Any) -> Any:
        if not self.running:
            return port
        interface, _, backlog = reuseport_address(self.listen)
        host = port.getHost()
        # The copies listen on the port actually bound (tcp:0 picks one).
        self._listen = f"tcp:{host.port}:backlog={backlog}"
        if interface:
            self._listen += ":interface=" + interface.replace(":", "\\:")
        self._slots = [
            Slot(
                number=number,
                backoff=Backoff(
                    initial=self.backoff,
                    cap=self.max_backoff,
                    healthy_after=self.stable_after,
                    floor=self.backoff,
                ),
            )
            for number in range(1, self.count + 1)
        ]
        for slot in self._slots:
            self._spawn(slot)
        return port

    def _spawn(self, slot: Slot) -> None:
        slot.restart = None
        if not self.running or self._listen is None:
            return
        worker = Worker(slot=slot, name=str(slot.number), started=self.reactor.seconds())
        argv = [sys.executable, "-m", COPY_MODULE, "--nodaemon", "--pidfile=", "dpatia"]
        argv += [*self.argv, "--listen", self._listen, "--front-door", str(slot.number)]
        worker.transport = self.reactor.spawnProcess(
            _Copy(self, worker),
            sys.executable,
            argv,
            env=child_environ(None),
            childFDs={0: "w", 1: 1, 2: 2, NOTICE_FD: "r"},
        )
        worker.pid = worker.transport.pid
        worker.set_state(WorkerState.IDLE)
        slot.worker = worker
        log.info("front door {number} started (pid {pid})", number=slot.number, pid=worker.pid)

    def counted(self, number: int, payload: bytes | None) -> None:
        """Hand copy ``number``'s metrics counts to ``on_counts`` (None: it ended)."""
        if self.on_counts is not None:
            self.on_counts(number, payload)

    def _ended(self, worker: Worker, reason: Any) -> None:
        slot = worker.slot
        self.counted(slot.number, None)
        worker.exited(reason)
        if slot.worker is worker:
            slot.worker = None
        if not self.running:
            return
        delay = slot.backoff.after_exit(self.reactor.seconds() - worker.started)
        log.warn(
            "front door {number} ended ({reason}); starting it again in {delay:.0f} s",
            number=slot.number,
            reason=reason.getErrorMessage(),
            delay=delay,
        )
        slot.restart = self.reactor.callLater(delay, self._spawn, slot)

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        for slot in self._slots:
            slot.cancel_restart()
        copies = [s.worker for s in self._slots if s.worker is not None and s.worker.state in LIVE]
        if not copies:
            return succeed(None)
        for worker in copies:
            if worker.state is not WorkerState.STOPPING:
                worker.set_state(WorkerState.STOPPING)
            # Closing its stdin is how a copy learns to stop (as when we die).
            if worker.transport is not None:
                worker.transport.closeStdin()
        timer = self.reactor.callLater(self.stop_timeout, self._kill, copies)
        done = DeferredList([worker.ended for worker in copies])

        def stopped(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            return result

        return done.addBoth(stopped)

    @staticmethod
    def _kill(copies: list[Worker]) -> None:
        for worker in copies:
            if worker.state is not WorkerState.DEAD:
                log.warn("front door {number} did not stop in time: killed", number=worker.name)
                worker.signal("KILL")


# --- in a copy ---------------------------------------------------------------------------


class _Link(Protocol):
    """Our end of the link: stdin (EOF = the main process is gone), fd 4 for notices."""

    def __init__(self, gone: Callable[[], object]) -> None:
        self.gone = gone

    def connectionLost(self, reason: Any = None) -> None:
        self.gone()


class ParentLink(Service):
    """Reports queued jobs to the main process (fd 4) and stops this copy when the
    main process closes its stdin (it is stopping, or it died)."""

    def __init__(self, reactor: Any, watch: Callable[[Callable[[Job], None]], Any]) -> None:
        self.reactor = reactor
        self.watch = watch
        self.unwatch: Callable[[], None] | None = None
        self.link: _Link | None = None

    def startService(self) -> None:
        super().startService()
        self.link = _Link(self._parent_gone)
        # Buffered, non-blocking writes: a busy main process never stalls this one.
        # (Keyword arguments by dict: mypy reads StandardIO's Windows signature.)
        options: dict[str, Any] = {"stdin": 0, "stdout": NOTICE_FD, "reactor": self.reactor}
        StandardIO(self.link, **options)
        self.unwatch = self.watch(self._queued)

    def _queued(self, job: Job) -> None:
        if self.link is not None and self.link.transport is not None:
            self.link.transport.write(f"{job.job_id} {job.key}\n".encode("ascii"))

    def send(self, line: bytes) -> None:
        """Write one line (no newline in it) to the main process."""
        if self.link is not None and self.link.transport is not None:
            self.link.transport.write(line + b"\n")

    def _parent_gone(self) -> None:
        if self.running:
            log.info("the main process closed our link: stopping this front door")
            self.reactor.stop()

    def stopService(self) -> None:
        super().stopService()
        if self.unwatch is not None:
            self.unwatch()
            self.unwatch = None
