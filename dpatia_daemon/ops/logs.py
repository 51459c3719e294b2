"""The daemon's log on stdout, as the journal wants it: one event, one priority.

twistd's own observer writes ``<time> [system] text`` lines the journal stores at one
priority, so ``journalctl -p err`` finds nothing.  :class:`StdoutObserver` writes each
event in the ``[log] format``:

* ``journal`` (default): ``<N>[namespace] text`` with the sd-daemon(3) priority prefix of
  the event's level (``<7>`` debug, ``<6>`` info, ``<4>`` warn, ``<3>`` error, ``<2>``
  critical) on every line, a traceback's included, and no time stamp (the journal
  stamps each line);
* ``text``: twistd's classic lines, time stamp first (a terminal, a plain log file);
* ``json``: one JSON object per line: ``time``, ``level``, ``priority``,
  ``namespace``, ``system``, ``message``, ``traceback`` (for failures), and the
  event's own fields that are plain values (``job_id``, ``worker``, ...).  A field
  whose name says it is a secret (``token``, ``secret``, ``password``,
  ``authorization``) is never written; objects are never serialised (their text is
  in ``message`` only if the event's format puts it there).

Events below ``[log] level`` are dropped.  Twisted's per-connection factory lines
("Starting factory", "Stopping factory": two for every outgoing HTTP connection) count
as debug.  ``tap.py`` hands the observer to twistd as the application's
``ILogObserver`` (see :class:`~dpatia_daemon.lifecycle.OrderedRoot`).
"""

from __future__ import annotations

import json
import re
from typing import IO, Any

from attrs import define
from twisted.logger import (
    ILogObserver,
    LogLevel,
    formatEvent,
    formatEventAsClassicLogText,
)
from zope.interface import implementer

from ..config import LogConfig, LogFormat

#: The syslog priority of each level (sd-daemon(3) prefixes).
PRIORITIES: dict[LogLevel, int] = {
    LogLevel.debug: 7,
    LogLevel.info: 6,
    LogLevel.warn: 4,
    LogLevel.error: 3,
    LogLevel.critical: 2,
}

#: Formats of events that are debug whatever level they were logged at.
QUIET_FORMATS = frozenset({"Starting factory {factory!r}", "Stopping factory {factory!r}"})

#: Field names never written in JSON lines.
SECRET_NAMES = re.compile(r"token|secret|password|authori[sz]ation", re.IGNORECASE)

#: Keys of legacy (twisted.python.log) events that are not fields of their own.
_LEGACY_KEYS = frozenset({"message", "format", "isError", "why", "failure", "time", "system"})


def event_level(event: dict[str, Any]) -> LogLevel:
    """The level an event is written at: its own, debug for the quiet formats."""
    if event.get("log_format") in QUIET_FORMATS:
        return LogLevel.debug
    level = event.get("log_level")
    if level in PRIORITIES:
        return level  # type: ignore[no-any-return]
    return LogLevel.error if event.get("isError") else LogLevel.info


def _text(event: dict[str, Any]) -> str:
    text = formatEvent(event)
    failure = event.get("log_failure")
    if failure is not None:
        text = f"{text}\n{failure.getTraceback().rstrip()}"
    return text


def _system(event: dict[str, Any]) -> str:
    """What the line is about: the event's system (a connection), else its namespace."""
    return str(event.get("log_system") or event.get("system") or event.get("log_namespace") or "-")


@implementer(ILogObserver)
@define
class StdoutObserver:
    """Writes events at ``level`` or above to ``stream`` in ``format``."""

    stream: IO[str]
    format: LogFormat = LogFormat.JOURNAL
    level: LogLevel = LogLevel.info

    def __call__(self, event: dict[str, Any]) -> None:
        level = event_level(event)
        priority = PRIORITIES[level]
        if priority > PRIORITIES[self.level]:
            return
        if self.format is LogFormat.JSON:
            out = json.dumps(self._record(event, level, priority), default=str) + "\n"
        elif self.format is LogFormat.TEXT:
            out = formatEventAsClassicLogText(event) or ""
        else:
            lines = f"[{_system(event)}] {_text(event)}".splitlines() or [""]
            out = "".join(f"<{priority}>{line}\n" for line in lines)
        self.stream.write(out)
        self.stream.flush()

    @staticmethod
    def _record(event: dict[str, Any], level: LogLevel, priority: int) -> dict[str, Any]:
        record: dict[str, Any] = {
            "time": event.get("log_time", event.get("time")),
            "level": level.name,
            "priority": priority,
            "namespace": event.get("log_namespace", "-"),
            "system": _system(event),
            "message": formatEvent(event),
        }
        failure = event.get("log_failure")
        if failure is not None:
            record["traceback"] = failure.getTraceback()
        for name, value in event.items():
            if (
                name.startswith("log_")
                or name in _LEGACY_KEYS
                or name in record
                or SECRET_NAMES.search(name)
            ):
                continue
            if value is None or isinstance(value, str | int | float | bool):
                record[name] = value
        return record


def stdout_observer(config: LogConfig, stream: IO[str]) -> StdoutObserver:
    """The observer ``[log]`` asks for, writing to ``stream`` (the process's stdout)."""
    return StdoutObserver(stream, config.format, LogLevel.levelWithName(config.level.value))


__all__ = ["PRIORITIES", "QUIET_FORMATS", "StdoutObserver", "event_level", "stdout_observer"]
