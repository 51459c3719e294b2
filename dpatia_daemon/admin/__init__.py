"""The operator's ``dpatia`` commands: look at the spool and repair it, check a config.

::

    dpatia status                       counts by state, deferred and running jobs,
                                        recent failures, corrupt records, free space
    dpatia jobs [--state S] [--slide ID]  the jobs (default: queued and running)
    dpatia show JOB                     every field of one job (no token)
    dpatia retry JOB | --failed         failed job(s) back to the queue; a deferred
                                        job's wait lifted
    dpatia cancel JOB                   cancel a queued job; stop a running one
    dpatia purge --older-than DAYS      history and ended jobs' work folders (WSI
                                        files too) older than DAYS
    dpatia check-config                 the daemon's start-time checks, not starting

Each takes ``--config PATH`` (default: the daemon's, ``/etc/dpatia/dpatia.ini``) and
``--json`` (one JSON document for scripts instead of a table).  They work on the spool
directory itself, through the spool's own transitions and locks
(:mod:`.spoolview`), so they work while the daemon is down and are safe while it runs:
a retried job is found by the daemon's next sweep, a running job's cancellation by its
holder's poll of the cancel markers.  Commands that change the spool run only as the
spool's owner.  Exit status: 0 done, 1 nothing done (not found, refused, a check
failed), 2 bad usage or a config/spool that cannot be used.

Modules: ``output`` (tables, JSON, times), ``spoolview`` (config, the open store, job
views, errors), ``commands`` (the spool commands), ``checks`` (``check-config``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any, TextIO

from ..jobs import JobState
from ..tap import DEFAULT_CONFIG
from . import commands
from .checks import check_config
from .spoolview import AdminError

Command = Callable[[argparse.Namespace, TextIO], int]


def _guarded(name: str, command: Command) -> Command:
    """``command`` with its :class:`AdminError` printed on stderr as its exit status."""

    def run(options: argparse.Namespace, out: TextIO) -> int:
        try:
            return command(options, out)
        except AdminError as e:
            sys.stderr.write(f"dpatia {name}: {e}\n")
            return e.status

    return run


def add_commands(subparsers: Any) -> None:
    """Add the admin subcommands to the ``dpatia`` parser's ``subparsers``."""

    def add(name: str, command: Command, help: str) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = subparsers.add_parser(name, help=help, description=help)
        sub.add_argument(
            "--config",
            metavar="PATH",
            default=DEFAULT_CONFIG,
            help=f"the daemon's configuration file (default: {DEFAULT_CONFIG})",
        )
        sub.add_argument("--json", action="store_true", help="JSON for scripts, not a table")
        sub.set_defaults(run=_guarded(name, command))
        return sub

    add(
        "status",
        commands.status,
        "the spool at a glance: jobs by state, deferred and "
        "running jobs, recent failures, corrupt records",
    )
    listing = add("jobs", commands.jobs, "list jobs (default: queued and running)")
    listing.add_argument(
        "--state",
        choices=[s.value for s in JobState] + ["all"],
        help="only jobs in this state (all: every state, history included)",
    )
    listing.add_argument("--slide", metavar="ID", help="only the jobs of this slide")
    add("show", commands.show, "every field of one job").add_argument("job", metavar="JOB")
    retry = add(
        "retry",
        commands.retry,
        "put failed job(s) back in the queue, or lift a deferred job's wait",
    )
    retry.add_argument("job", metavar="JOB", nargs="?")
    retry.add_argument(
        "--failed", action="store_true", help="every failed job (the newest of each slide)"
    )
    add("cancel", commands.cancel, "cancel a queued job, or stop a running one").add_argument(
        "job", metavar="JOB"
    )
    purge = add(
        "purge",
        commands.purge,
        "remove history records and ended jobs' work folders (WSI files too) older than DAYS",
    )
    purge.add_argument("--older-than", metavar="DAYS", type=float, required=True)
    add("check-config", check_config, "the daemon's start-time checks, without starting it")


__all__ = ["AdminError", "add_commands"]
