"""The sd_notify side of the daemon in this process: the environment it takes, the
datagrams it sends (to real sockets), readiness, status and the watchdog on a
``MemoryReactorClock`` / ``task.Clock``, and the watchdog under a blocked real reactor."""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from notify_helpers import NotifyReceiver
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock

from dpatia_daemon.jobs import Callback, Job, JobKind, JobState
from dpatia_daemon.ops.systemd import (
    Notifier,
    Readiness,
    SystemdEnvironment,
    Watchdog,
    describe,
)
from dpatia_daemon.spool.memory import MemorySpool
from dpatia_daemon.workers.events import SupervisorEvent


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    """A datagram socket bound to a path, as systemd's NOTIFY_SOCKET is."""
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.setblocking(False)
    yield path, sock
    sock.close()


def received(sock: socket.socket) -> list[str]:
    """Every datagram waiting on ``sock`` (the sends are synchronous: nothing is late)."""
    out = []
    while True:
        try:
            out.append(sock.recv(4096).decode())
        except BlockingIOError:
            return out


def test_take_removes_the_variables_and_reads_the_watchdog() -> None:
    """The protocol's variables leave the environment (no child inherits them); the
    watchdog interval is WATCHDOG_USEC in seconds."""
    environ = {"NOTIFY_SOCKET": "@sd", "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "42", "X": "1"}
    taken = SystemdEnvironment.take(environ, pid=42)
    assert taken == SystemdEnvironment(notify_socket="@sd", watchdog_interval=30.0)
    assert environ == {"X": "1"}


@pytest.mark.parametrize(
    "environ",
    [
        {"NOTIFY_SOCKET": "/run/n", "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "7"},
        {"NOTIFY_SOCKET": "/run/n", "WATCHDOG_USEC": "0"},
        {"NOTIFY_SOCKET": "/run/n", "WATCHDOG_USEC": "soon"},
        {"NOTIFY_SOCKET": "/run/n"},
    ],
)
def test_no_watchdog_unless_it_is_ours_and_valid(environ: dict[str, str]) -> None:
    """Another process's watchdog (WATCHDOG_PID), or no usable WATCHDOG_USEC: no pings."""
    taken = SystemdEnvironment.take(environ, pid=42)
    assert taken == SystemdEnvironment(notify_socket="/run/n", watchdog_interval=None)


def test_notifier_sends_one_datagram_of_lines(receiver: tuple[str, socket.socket]) -> None:
    """One message is one datagram of KEY=value lines."""
    path, sock = receiver
    Notifier(path).send(READY="1", STATUS="ready")
    assert received(sock) == ["READY=1\nSTATUS=ready\n"]


def test_notifier_reaches_an_abstract_socket() -> None:
    """A NOTIFY_SOCKET starting with @ is in the abstract namespace."""
    name = f"dpatia-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.setblocking(False)
    try:
        Notifier("@" + name).send(WATCHDOG="1")
        assert received(sock) == ["WATCHDOG=1\n"]
    finally:
        sock.close()


def test_notifier_without_systemd_logs_once_and_goes_on(tmp_path: Path) -> None:
    """No socket at the address: the sends fail quietly after one warning."""
    from twisted.logger import globalLogPublisher

    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        notifier = Notifier(str(tmp_path / "nobody"))
        notifier.send(READY="1")
        notifier.send(STATUS="x")
    finally:
        globalLogPublisher.removeObserver(events.append)
    warnings = [e for e in events if e.get("log_format", "").startswith("cannot notify systemd")]
    assert len(warnings) == 1


def test_describe_counts_the_jobs_not_over_and_the_busy_workers() -> None:
    """STATUS= names each state a job can wait or run in, and the workers busy."""
    counts = {JobState.QUEUED: 3, JobState.RUNNING: 1, JobState.DONE: 9}
    workers = [{"state": "busy"}, {"state": "idle"}, {"state": "starting"}]
    text = describe(counts, workers)
    assert "3 queued" in text and "1 running" in text and "done" not in text
    assert text.endswith("workers: 1 of 3 busy, 1 not up")
    assert describe(counts, None).endswith("no workers here")


class FakeWorkers:
    """The supervisor as Readiness reads it: a snapshot of states and an event stream."""

    def __init__(self, states: list[str]) -> None:
        self.states = states
        self.callbacks: list[Callable[[SupervisorEvent], None]] = []

    def snapshot(self) -> list[dict[str, Any]]:
        return [{"state": s} for s in self.states]

    def observe(self, callback: Callable[[SupervisorEvent], None]) -> Callable[[], None]:
        self.callbacks.append(callback)
        return lambda: self.callbacks.remove(callback)

    def ready(self, index: int) -> None:
        self.states[index] = "idle"
        for callback in list(self.callbacks):
            callback(SupervisorEvent("worker-ready", worker=f"w{index}"))


def run_hooks(reactor: MemoryReactorClock) -> None:
    """What the reactor does once it runs: call the callWhenRunning hooks."""
    for f, args, kwargs in reactor.whenRunningHooks:
        f(*args, **kwargs)


def test_ready_waits_for_every_worker_then_status_then_stopping(
    receiver: tuple[str, socket.socket],
) -> None:
    """READY=1 only once the reactor runs and every worker said hello; STATUS= then
    every status_interval; STOPPING=1 at stop, and no more STATUS after it."""
    path, sock = receiver
    reactor = MemoryReactorClock()
    spool = MemorySpool()
    spool.startService()
    spool.add(
        Job(
            slide_id="slide-1",
            application_id="dpatia",
            kind=JobKind.CREATE,
            callback=Callback("https://sps.example/cb", "token-1"),
            created=100.0,
        )
    )
    workers = FakeWorkers(["starting", "starting"])
    readiness = Readiness(reactor, Notifier(path), spool, workers, status_interval=5.0)
    readiness.startService()
    assert received(sock) == []
    run_hooks(reactor)
    workers.ready(0)
    assert received(sock) == []
    workers.ready(1)
    ready, status = received(sock)
    assert ready == "READY=1\nSTATUS=ready\n"
    assert status.startswith("STATUS=jobs: 1 queued, 0 running")
    assert status.endswith("workers: 0 of 2 busy\n")
    assert workers.callbacks == []
    reactor.advance(5.0)
    assert [m.split(":")[0] for m in received(sock)] == ["STATUS=jobs"]
    readiness.stopService()
    [stopping] = received(sock)
    assert stopping.startswith("STOPPING=1\nSTATUS=stopping")
    reactor.advance(50.0)
    assert received(sock) == []


def test_ready_after_the_deadline_when_a_worker_never_starts(
    receiver: tuple[str, socket.socket],
) -> None:
    """A worker that never starts does not keep systemd waiting past ready_deadline."""
    path, sock = receiver
    reactor = MemoryReactorClock()
    spool = MemorySpool()
    spool.startService()
    workers = FakeWorkers(["idle", "starting"])
    readiness = Readiness(reactor, Notifier(path), spool, workers, ready_deadline=60.0)
    readiness.startService()
    run_hooks(reactor)
    reactor.advance(59.0)
    assert received(sock) == []
    reactor.advance(1.0)
    ready, status = received(sock)
    assert ready.startswith("READY=1")
    assert status.endswith("0 of 2 busy, 1 not up\n")
    readiness.stopService()


def test_ready_at_once_without_workers(receiver: tuple[str, socket.socket]) -> None:
    """A daemon with [workers] count = 0 is ready as soon as the reactor runs."""
    path, sock = receiver
    reactor = MemoryReactorClock()
    spool = MemorySpool()
    spool.startService()
    readiness = Readiness(reactor, Notifier(path), spool, None)
    readiness.startService()
    run_hooks(reactor)
    assert received(sock)[0] == "READY=1\nSTATUS=ready\n"
    readiness.stopService()


def test_watchdog_pings_every_half_interval_on_the_clock(
    receiver: tuple[str, socket.socket],
) -> None:
    """WATCHDOG=1 at start and every interval / 2 seconds of the clock."""
    path, sock = receiver
    clock = Clock()
    watchdog = Watchdog(clock, Notifier(path), interval=10.0)
    watchdog.startService()
    assert received(sock) == ["WATCHDOG=1\n"]
    clock.advance(4.9)
    assert received(sock) == []
    clock.advance(0.1)
    assert received(sock) == ["WATCHDOG=1\n"]
    clock.pump([5.0] * 3)
    assert received(sock) == ["WATCHDOG=1\n"] * 3
    watchdog.stopService()
    clock.advance(50.0)
    assert received(sock) == []


def test_a_stalled_reactor_sends_no_pings_meanwhile_and_one_after(
    receiver: tuple[str, socket.socket],
) -> None:
    """Time that passes while the reactor runs no timers (a blocking call) sends no
    pings, and the reactor's recovery one ping, not one per missed interval: systemd
    sees the gap."""
    path, sock = receiver
    clock = Clock()
    watchdog = Watchdog(clock, Notifier(path), interval=10.0)
    watchdog.startService()
    received(sock)
    clock.advance(60.0)  # one step: 60 s pass without the reactor running a timer
    assert received(sock) == ["WATCHDOG=1\n"]
    watchdog.stopService()


@pytest_twisted.ensureDeferred
async def test_the_real_reactor_sends_no_ping_while_blocked(reactor: Any, tmp_path: Path) -> None:
    """On the real reactor: pings flow, a blocking call in the reactor thread stops
    them for as long as it blocks, and they resume after."""
    path = str(tmp_path / "notify")
    pings = NotifyReceiver(reactor, path)
    watchdog = Watchdog(reactor, Notifier(path), interval=0.1)  # a ping every 50 ms
    watchdog.startService()
    try:
        assert await pings.next(lambda m: m == "WATCHDOG=1\n", 5) == "WATCHDOG=1\n"
        received(pings.sock)  # sent before the stall, not yet read
        # The stall itself, not a wait for something: the reactor thread blocks for
        # six ping intervals, and no datagram reaches the socket meanwhile.
        time.sleep(0.3)
        assert received(pings.sock) == []
        assert await pings.next(lambda m: m == "WATCHDOG=1\n", 5) == "WATCHDOG=1\n"
    finally:
        watchdog.stopService()
        pings.close()


@pytest.mark.parametrize(
    ("systemd", "names"),
    [
        (SystemdEnvironment("@sd", 30.0), ["watchdog", "spool", "systemd"]),
        (SystemdEnvironment("@sd", None), ["spool", "systemd"]),
        (SystemdEnvironment(None, None), ["spool", "ready"]),
        (None, ["spool", "ready"]),
    ],
)
def test_the_tree_has_the_watchdog_first_and_the_notifier_last(
    tmp_path: Path, systemd: SystemdEnvironment | None, names: list[str]
) -> None:
    """Under systemd the watchdog starts first (it stops last, after the drain) and
    the notifier last (STOPPING=1 before anything stops); without it, neither."""
    from conftest import write_config

    from dpatia_daemon.config import load_config
    from dpatia_daemon.service import build_service

    config = load_config(write_config(tmp_path))
    root = build_service(config, MemoryReactorClock(), systemd=systemd)
    services = [s.name for s in root]
    assert [s for s in services if s in {"watchdog", "spool", "systemd", "ready"}][:1] == names[:1]
    assert services[-1] == names[-1]
    assert {"watchdog", "systemd"} & set(services) == {"watchdog", "systemd"} & set(names)
