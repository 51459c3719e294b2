"""How the daemon's front door listens: the endpoint ``[server] listen`` names, the
check that ``[server] processes`` can share it, and what the main process does with a
job an extra front-door process reports.

Every problem with the listening configuration is a :class:`~dpatia_daemon.config.ConfigError`
naming ``[server] listen`` or ``[server] processes``, raised while the service tree is
built: one line for the operator, before anything starts.
"""

from __future__ import annotations

import os

from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IStreamServerEndpoint

from ..config import Config, ConfigError
from ..spool import DirectorySpool
from ..sps.tokens import TokenBook
from .clients import require_client_certificates
from .processes import reuseport_address


def endpoint(reactor: object, config: Config) -> IStreamServerEndpoint:
    """The server endpoint of ``[server] listen`` (systemd socket activation included)."""
    try:
        found: IStreamServerEndpoint = serverFromString(reactor, config.server.listen)
    except IndexError:
        # The systemd: parser indexes LISTEN_FDS: no sockets were passed to us.
        raise ConfigError(
            config.source,
            "server",
            "listen",
            "systemd socket activation requested but systemd passed no sockets "
            "(start dpatia.socket, or listen on tcp:PORT)",
        ) from None
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise ConfigError(config.source, "server", "listen", str(e)) from None
    if config.server.client_ca_file is not None:
        try:
            found = require_client_certificates(found, config.server.client_ca_file.path)
        except (ValueError, OSError) as e:
            raise ConfigError(config.source, "server", "client_ca_file", str(e)) from None
    return found


def check_processes(config: Config) -> None:
    """``[server] processes`` > 1 needs a plain ``tcp:`` listener and a config file
    (the extra processes read it)."""
    if config.server.processes == 1:
        return
    if config.server.client_ca_file is not None:
        raise ConfigError(
            config.source,
            "server",
            "client_ca_file",
            "client certificates need an ssl: listener, and more than one process a "
            "tcp: one; terminate TLS in front of dpatia, or set processes = 1",
        )
    try:
        reuseport_address(config.server.listen)
    except ValueError:
        raise ConfigError(
            config.source,
            "server",
            "processes",
            "more than one process needs a plain tcp: listener (not ssl: or systemd:); "
            "terminate TLS in front of dpatia, or set processes = 1",
        ) from None
    if not os.path.isfile(config.source):
        raise ConfigError(
            config.source, "server", "processes", "extra processes need a config file"
        )


async def noticed(spool: DirectorySpool, tokens: TokenBook, job_id: str, key: str) -> None:
    """An extra front door queued a job: dispatch it now, and let running jobs of its
    slide use the token it brought (the copy's own TokenBook is not ours)."""
    job = await spool.notice(job_id, key)
    if job is not None:
        tokens.record(job.application_id, job.slide_id, job.callback, job.created)
