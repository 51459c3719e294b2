"""The twistd adapter: command-line options and config file → ``build_service``.

``twistd -n dpatia --config PATH [--listen EP] [--spool DIR] [--workers N]``.  All the
work is in :func:`dpatia_daemon.service.build_service`; this module only parses.
"""

from __future__ import annotations

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

    from .service import build_service

    try:
        door = options["front-door"]
        return build_service(
            options.config, reactor, front_door=None if door is None else int(door)
        )
    except ConfigError as e:
        raise SystemExit(f"dpatia: configuration error: {e}") from None
