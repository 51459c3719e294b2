"""Shared test fixtures and helpers.

pytest-twisted runs the global reactor for tests decorated with
``@pytest_twisted.inlineCallbacks`` / ``@pytest_twisted.ensureDeferred``; the
``reactor`` fixture hands that reactor to integration tests that need real sockets,
threads or processes.  Unit tests use ``task.Clock`` / ``MemoryReactorClock`` and the
``success_result_of`` / ``failure_result_of`` helpers below instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import attrs
import pytest
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.python.failure import Failure
from twisted.web.server import Site

from dpatia_daemon.demo import ini_with
from dpatia_daemon.simulator.fake import BASE_PATH, FakeSPS

T = TypeVar("T")


@pytest.fixture(scope="session")
def reactor() -> Any:
    """The reactor pytest-twisted runs (the global one)."""
    from twisted.internet import reactor as _reactor

    return _reactor


@attrs.frozen
class Loopback:
    """A fake SPS listening on loopback, with the URL and a token to give the daemon."""

    fake: FakeSPS
    url: str
    token: str


@pytest.fixture
def sps(reactor: Any) -> Any:
    """A :class:`Loopback` fake SPS for daemons run as subprocesses."""
    fake = FakeSPS(clock=reactor)
    port = reactor.listenTCP(0, Site(fake.resource()), interface="127.0.0.1")
    yield Loopback(fake, f"http://127.0.0.1:{port.getHost().port}{BASE_PATH}", fake.issue_token())
    port.stopListening()


#: What every test daemon needs: a private spool and work folder under the test's
#: tmp_path, callbacks allowed to the loopback fake SPS, and short SPS timeouts.
_TEST_DAEMON: dict[str, dict[str, Any]] = {
    "spool": {"directory": "{tmp}/spool"},
    "workers": {"work_directory": "{tmp}/work"},
    "sps": {"allowed_callback_urls": "http://127.0.0.1:*/", "timeout": 5},
}


def write_config(
    tmp_path: Path,
    sections: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    name: str = "dpatia.ini",
    base: bool = True,
    start: str | None = None,
) -> str:
    """Write a daemon config file under ``tmp_path`` and return its path: the one way
    tests make a config.

    ``sections`` maps a section to its keys; they are added to (and override) the
    test daemon's base settings (:data:`_TEST_DAEMON`; ``base=False`` leaves them out).
    ``{tmp}`` in a value stands for ``tmp_path``.  A value of None leaves the key out.
    With ``start`` (the text of a config, e.g. the shipped ``etc/dpatia.ini``) the keys
    are set in that text, its comments and other keys kept.
    """
    merged: dict[str, dict[str, Any]] = (
        {k: dict(v) for k, v in _TEST_DAEMON.items()} if base else {}
    )
    for section, keys in (sections or {}).items():
        merged.setdefault(section, {}).update(keys)
    values = {
        (section, key): str(value).replace("{tmp}", str(tmp_path))
        for section, keys in merged.items()
        for key, value in keys.items()
        if value is not None
    }
    if start is not None:
        text = ini_with(start, values)
    else:
        lines = []
        for section, keys in merged.items():
            lines.append(f"[{section}]")
            lines.extend(
                f"{key} = {values[section, key]}" for key in keys if (section, key) in values
            )
        text = "\n".join(lines) + "\n"
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _as_deferred(d: Any) -> Deferred[Any]:
    return d if isinstance(d, Deferred) else ensureDeferred(d)


def success_result_of(d: Any) -> Any:
    """Return the result of an already-fired Deferred (or coroutine); fail otherwise."""
    results: list[Any] = []
    failures: list[Failure] = []
    _as_deferred(d).addCallbacks(results.append, failures.append)
    if failures:
        failures[0].raiseException()
    assert results, "Deferred has not fired"
    return results[0]


def failure_result_of(d: Any, *types: type[BaseException]) -> Failure:
    """Return the Failure of an already-failed Deferred; fail if it succeeded or is pending."""
    results: list[Any] = []
    failures: list[Failure] = []
    _as_deferred(d).addCallbacks(results.append, failures.append)
    assert not results, f"expected a failure, got {results[0]!r}"
    assert failures, "Deferred has not fired"
    if types:
        assert failures[0].check(*types), f"unexpected failure {failures[0]!r}"
    return failures[0]


def no_result(d: Deferred[Any]) -> None:
    """Assert that a Deferred has not fired yet (never look at ``.called``)."""
    results: list[Any] = []
    d.addBoth(lambda r: results.append(r) or r)
    assert not results, f"expected no result, got {results[0]!r}"
