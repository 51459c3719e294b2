"""Run the SPS simulator as a child process (``twistd -n dpatia-sps``) for tests and the demo.

:func:`simulator_process` returns a :class:`~.daemon_process.DaemonProcess` configured
for the simulator: ``await proc.start()`` fires with its port once it logged
``dpatia-sps ready``; ``proc.url`` is then its root (the page) and
``proc.url + BASE_PATH`` the callback base; ``await proc.kill(signal.SIGTERM)`` stops it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .daemon_process import TWISTD, DaemonProcess


def simulator_process(
    reactor: Any,
    data: str,
    args: Sequence[str] = (),
    *,
    cwd: str | None = None,
    env: dict[str, str] | None = None,
) -> DaemonProcess:
    """A ``twistd -n dpatia-sps --data DATA --listen tcp:0:interface=127.0.0.1 ARGS`` child."""
    command = [
        *TWISTD,
        "--nodaemon",
        "--pidfile=",
        "dpatia-sps",
        "--data",
        data,
        "--listen",
        "tcp:0:interface=127.0.0.1",
        *args,
    ]
    return DaemonProcess(
        reactor=reactor,
        config="",
        cwd=cwd,
        env=env,
        command=command,
        port_pattern=rb"dpatia-sps listening on port (\d+)",
        ready_pattern=rb"dpatia-sps ready\n",
    )


__all__ = ["simulator_process"]
