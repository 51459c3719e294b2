"""The twistd adapter: command-line options and config file → ``build_service``.

``twistd -n dpatia --config PATH [--listen EP] [--spool DIR] [--workers N]``.  All the
work is in :func:`dpatia_daemon.service.build_service`; this module only parses, and
hands the tree what only the process knows: what systemd put in its environment
(:class:`~dpatia_daemon.ops.systemd.SystemdEnvironment`) and, when twistd logs to
stdout, the ``[log]`` observer (:mod:`dpatia_daemon.ops.logs`).
"""

from __future__ import annotations

import os
import sys

from twisted.application.service import IService
from twisted.python import usage

from .config import OVERRIDES, Config, ConfigError, load_config

DEFAULT_CONFIG = "/etc/dpatia/dpatia.ini"


class Options(usage.Options):
    """Options of ``twistd dpatia``; the file is read and checked in :meth:`postOptions`."""

    optParameters = [
        ["config", "c", DEFAULT_CONFIG, "Configuration file (see etc/dpatia.ini)."],
        ["listen", None, None, "Override [server] listen: a Twisted endpoint, e.g. tcp:5006."],
        ["spool", None, None, "Override [spool] directory."],
        ["workers", None, None, "Override [workers] count."],
        [
            "front-door",
            None,
            None,
            "Internal: run as extra front door N on the main process's port, reporting "
            "queued jobs on fd 3 ([server] processes starts these).",
        ],
    ]

    config: Config

    def postOptions(self) -> None:
        door = self["front-door"]
        if door is not None and not (door.isdigit() and int(door) >= 1):
            raise SystemExit(f"dpatia: --front-door must be a number >= 1, not {door!r}")
        try:
            self.config = load_config(self["config"], {name: self[name] for name in OVERRIDES})
        except ConfigError as e:
            # One line naming file, section, key and problem.  A UsageError would bury it
            # under the whole usage text, which is not what an operator needs at 3 a.m.
            raise SystemExit(f"dpatia: configuration error: {e}") from None


def makeService(options: Options) -> IService:
    """Build the daemon's service tree for twistd (the only place the reactor is imported)."""
    from twisted.internet import reactor

    from .lifecycle import OrderedRoot
    from .ops.logs import stdout_observer
    from .ops.systemd import SystemdEnvironment
    from .service import build_service

    # Taken out of the environment before any child is spawned: only this process
    # speaks to systemd.
    systemd = SystemdEnvironment.take(os.environ)
    try:
        door = options["front-door"]
        root = build_service(
            options.config,
            reactor,
            front_door=None if door is None else int(door),
            systemd=systemd,
        )
    except ConfigError as e:
        raise SystemExit(f"dpatia: configuration error: {e}") from None
    if isinstance(root, OrderedRoot) and _logs_to_stdout(options):
        root.log_observer = stdout_observer(options.config.log, sys.stdout)
    return root


def _logs_to_stdout(options: Options) -> bool:
    """True when twistd would log to stdout: in the foreground, and no --logfile,
    --syslog or --logger says otherwise (those are the operator's choice, kept)."""
    twistd = getattr(options, "parent", None)
    if twistd is None:
        return False
    return bool(
        twistd.get("nodaemon")
        and twistd.get("logfile") in (None, "", "-")
        and not twistd.get("syslog")
        and twistd.get("logger") is None
    )
