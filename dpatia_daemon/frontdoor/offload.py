"""Parsing the largest request bodies in a child process.

A modify or delete can carry a stored result of tens of MiB.  Parsed in a thread of
the daemon it still stalls every other request: CPython's JSON decoder holds the
interpreter lock for the whole ``json.loads`` (about 0.6 s for 20 MiB), and the
bounds check and the PUT body's encoding are Python code competing for the same lock.
:class:`ParseProcess` runs such a parse in one long-lived child process instead (started
at the first large body, ``spawn``-ed so that no reactor state is forked) and hands the
daemon back only what the route needs: the invocation, the result without its content
(its id, slide and version), and the PUT body as bytes.

Failures keep their meaning: an :class:`~dpatia_daemon.frontdoor.site.APIError` raised
in the child (a 400 or 413 naming the problem) is raised again, same class, message
and field, in the daemon.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any

import attrs
from attrs import define, field
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.logger import Logger

from .site import APIError

log = Logger()

#: Bodies at least this large are parsed in the child process (smaller ones in a
#: thread: the child's round trip costs more than it saves for them).
OFFLOAD_BYTES = 1024 * 1024


@define
class ParseProcess(Service):
    """One child process that runs ``parse(raw, limits)`` for large bodies."""

    reactor: IReactorFromThreads
    _pool: ProcessPoolExecutor | None = field(default=None, init=False)

    def __call__(self, parse: Callable[..., Any], raw: bytes, *args: Any) -> Deferred[Any]:
        """``parse(raw, *args)`` in the child; a Deferred of its result."""
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                max_workers=1, mp_context=multiprocessing.get_context("spawn")
            )
            log.info("large request bodies are parsed in a child process from now on")
        d: Deferred[Any] = Deferred()

        def done(future: Future[Any]) -> None:
            self.reactor.callFromThread(_settle, d, future)

        self._pool.submit(_in_child, parse, raw, *args).add_done_callback(done)
        return d

    @property
    def started_pool(self) -> bool:
        """Whether a large body has started the child process yet."""
        return self._pool is not None

    def stopService(self) -> None:
        super().stopService()
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


def _settle(d: Deferred[Any], future: Future[Any]) -> None:
    try:
        outcome = future.result()
    except BaseException as e:  # the child died, or could not unpickle the call
        d.errback(e)
        return
    if isinstance(outcome, _Refused):
        d.errback(outcome.error())
    else:
        d.callback(outcome)


@attrs.frozen
class _Refused:
    """An APIError from the child, in a form that pickles whatever its constructor."""

    kind: type[APIError]
    message: str
    field: str | None

    def error(self) -> APIError:
        error = self.kind.__new__(self.kind)
        APIError.__init__(error, self.message, self.field)
        return error


def _in_child(parse: Callable[..., Any], raw: bytes, *args: Any) -> Any:
    try:
        return parse(raw, *args)
    except APIError as e:
        return _Refused(type(e), e.message, e.field)


__all__ = ["OFFLOAD_BYTES", "ParseProcess"]
