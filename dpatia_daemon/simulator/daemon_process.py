"""Run a real ``twistd -n dpatia`` as a child process: for integration tests, benchmarks
and the demo.

The daemon listens on ``tcp:0`` (a free port chosen by the kernel, so parallel runs
never collide); :class:`DaemonProcess` learns the port from the daemon's own log line
("... starting on PORT") instead of guessing, and every wait is on an event with a
bounded timeout.
"""

from __future__ import annotations

import os
import re
import signal
import sys
from collections.abc import Sequence
from typing import Any

from attrs import define, field
from twisted.internet import protocol
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated

_PORT_LINE = re.compile(rb"starting on (\d+)")

#: ``twistd`` for the running interpreter, without relying on a script on PATH
#: (``python -m twisted`` is the newer ``twist`` runner, which has no pidfile options).
TWISTD = ("-c", "from twisted.scripts.twistd import run; run()")


class DaemonExited(Exception):
    """The daemon ended before the awaited event; ``output`` is what it printed."""

    def __init__(self, message: str, output: bytes) -> None:
        super().__init__(message + "\n--- daemon output ---\n" + output.decode("utf-8", "replace"))
        self.output = output


class _Protocol(protocol.ProcessProtocol):
    def __init__(self, owner: DaemonProcess) -> None:
        self.owner = owner

    def outReceived(self, data: bytes) -> None:
        self.owner._received(data)

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        self.owner._ended(reason)


@define
class DaemonProcess:
    """One ``twistd --nodaemon dpatia`` child: start it, await log lines, kill it."""

    reactor: Any
    config: str
    args: Sequence[str] = ()
    env: dict[str, str] | None = None
    cwd: str | None = None
    #: Another program to run instead of ``twistd dpatia`` (argv after the interpreter),
    #: with the log lines that give its port and say it is ready (the SPS simulator).
    command: Sequence[str] | None = None
    port_pattern: bytes = _PORT_LINE.pattern
    ready_pattern: bytes = rb"dpatia ready"
    output: bytearray = field(factory=bytearray, init=False)
    port: int | None = field(default=None, init=False)
    exit_code: int | None = field(default=None, init=False)
    #: The signal that ended it.  twistd re-raises SIGTERM on itself after a clean
    #: shutdown, so a clean stop ends "by SIGTERM" (systemd counts that as clean).
    exit_signal: int | None = field(default=None, init=False)
    pid: int | None = field(default=None, init=False)
    _waiters: list[tuple[re.Pattern[bytes], int, Deferred[re.Match[bytes]]]] = field(
        factory=list, init=False
    )
    _ended_d: Deferred[int | None] = field(factory=Deferred, init=False)
    _transport: Any = field(default=None, init=False)

    def start(self, timeout: float = 30.0) -> Deferred[int]:
        """Spawn the daemon; fire with its listening port once it is ready (running,
        with its signal handlers installed)."""
        argv = [
            sys.executable,
            *TWISTD,
            "--nodaemon",
            "--pidfile=",
            "dpatia",
            "--config",
            self.config,
            "--listen",
            "tcp:0:interface=127.0.0.1",
            *self.args,
        ]
        if self.command is not None:
            argv = [sys.executable, *self.command]
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        self._transport = self.reactor.spawnProcess(
            _Protocol(self), sys.executable, argv, env=env, path=self.cwd
        )
        self.pid = self._transport.pid
        port = self.wait_for(self.port_pattern, timeout, since=0)
        ready = self.wait_for(self.ready_pattern, timeout, since=0)

        def got_port(match: re.Match[bytes]) -> Deferred[int]:
            number = self.port = int(match.group(1))
            return ready.addCallback(lambda _: number)

        return port.addCallback(got_port)

    @property
    def url(self) -> str:
        assert self.port is not None, "not started"
        return f"http://127.0.0.1:{self.port}"

    def wait_for(
        self,
        pattern: bytes | re.Pattern[bytes],
        timeout: float = 30.0,
        since: int | None = None,
    ) -> Deferred[Any]:
        """Fire with the first match of ``pattern`` in the output after offset ``since``.

        ``since=None`` means output printed from now on; pass ``0`` (or a saved
        ``len(output)``) to also match what was printed before.
        """
        regex = re.compile(pattern) if isinstance(pattern, bytes) else pattern
        d: Deferred[re.Match[bytes]] = Deferred()
        entry = (regex, len(self.output) if since is None else since, d)
        self._waiters.append(entry)
        self._check()
        if d.called:
            return d
        if self._ended_d.called:
            self._waiters.remove(entry)
            d.errback(DaemonExited("the daemon has already exited", bytes(self.output)))
            return d
        timer = self.reactor.callLater(timeout, self._expire, entry, regex.pattern, timeout)
        d.addBoth(lambda r: (timer.cancel() if timer.active() else None, r)[1])
        return d

    def kill(self, sig: int = signal.SIGKILL) -> Deferred[int | None]:
        """Send ``sig``; fire with the exit code (None when ended by a signal)."""
        if not self._ended_d.called and self._transport is not None:
            names = {signal.SIGKILL: "KILL", signal.SIGTERM: "TERM", signal.SIGINT: "INT"}
            try:
                self._transport.signalProcess(names.get(signal.Signals(sig), sig))
            except ProcessExitedAlready:
                pass  # processEnded fires (or fired) anyway
        return self.ended()

    def ended(self) -> Deferred[int | None]:
        """Fire with the exit code once the process has ended."""
        d: Deferred[int | None] = Deferred()

        def relay(code: int | None) -> int | None:
            d.callback(code)
            return code

        self._ended_d.addCallback(relay)
        return d

    # --- protocol callbacks ---

    def _received(self, data: bytes) -> None:
        self.output += data
        self._check()

    def _check(self) -> None:
        for entry in list(self._waiters):
            regex, since, d = entry
            match = regex.search(bytes(self.output), since)
            if match is not None:
                self._waiters.remove(entry)
                d.callback(match)

    def _expire(self, entry: Any, pattern: bytes, timeout: float) -> None:
        if entry in self._waiters:
            self._waiters.remove(entry)
            entry[2].errback(DaemonExited(f"no {pattern!r} within {timeout} s", bytes(self.output)))

    def _ended(self, reason: Any) -> None:
        value = reason.value
        if isinstance(value, ProcessDone):
            self.exit_code = 0
        elif isinstance(value, ProcessTerminated):
            self.exit_code = value.exitCode
            self.exit_signal = value.signal
        for _, _, d in self._waiters:
            d.errback(DaemonExited("the daemon exited", bytes(self.output)))
        self._waiters.clear()
        self._ended_d.callback(self.exit_code)
