"""The service tree's life: children stop one at a time, last started first; an
unusable spool at start is one line and a non-zero exit; "ready" waits for the reactor."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import no_result, success_result_of
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogEvent, globalLogPublisher

from dpatia_daemon.lifecycle import OrderedRoot, Ready, Stopper
from dpatia_daemon.spool import SpoolError


def test_children_stop_one_at_a_time_last_started_first() -> None:
    """The second child's stop starts only when the third's has ended, and so on; the
    root's stop fires when the first child's has."""
    root = OrderedRoot()
    stops: dict[str, Deferred[None]] = {}
    order: list[str] = []

    def stopper(name: str) -> Stopper:
        def on_stop() -> Deferred[None]:
            order.append(name)
            stops[name] = Deferred()
            return stops[name]

        service = Stopper(on_stop)
        service.setName(name)
        service.setServiceParent(root)
        return service

    for name in ("spool", "sps", "http"):
        stopper(name)
    root.startService()
    stopped = root.stopService()
    assert order == ["http"]
    stops["http"].callback(None)
    assert order == ["http", "sps"]
    no_result(stopped)
    stops["sps"].callback(None)
    stops["spool"].callback(None)
    assert order == ["http", "sps", "spool"]
    success_result_of(stopped)
    assert not root.running


def test_a_failing_stop_is_logged_and_the_others_still_stop() -> None:
    """A child whose stop raises does not keep the ones started before it running."""
    root = OrderedRoot()
    first = Service()
    first.setName("spool")
    first.setServiceParent(root)

    def boom() -> None:
        raise RuntimeError("no")

    Stopper(boom).setServiceParent(root)
    events: list[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    try:
        root.startService()
        success_result_of(root.stopService())
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert not first.running
    assert any(e.get("log_format") == "stopping service {name} failed" for e in events)


def test_an_unusable_spool_at_start_is_one_line_and_an_exit() -> None:
    """A SpoolError while starting becomes SystemExit("dpatia: cannot start: ...")."""

    class Broken(Service):
        def startService(self) -> None:
            raise SpoolError("spool directory /nowhere is not usable")

    root = OrderedRoot()
    Broken().setServiceParent(root)
    with pytest.raises(SystemExit) as info:
        root.startService()
    assert str(info.value) == "dpatia: cannot start: spool directory /nowhere is not usable"


def test_ready_is_logged_once_the_reactor_runs() -> None:
    """Ready logs its line from callWhenRunning, not at once."""
    reactor: Any = MemoryReactorClock()
    events: list[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    try:
        Ready(reactor, "dpatia ready").startService()
        assert not any(e.get("log_format") == "dpatia ready" for e in events)
        reactor.run()
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert any(e.get("log_format") == "dpatia ready" for e in events)


def test_settle_gc_freezes_what_start_up_made_and_raises_the_thresholds() -> None:
    """After "ready": one collection, everything alive frozen (full collections no
    longer scan it), and the young generation collected less often."""
    import gc

    from dpatia_daemon.lifecycle import GC_THRESHOLDS, settle_gc

    before = gc.get_threshold()
    try:
        settle_gc()
        assert gc.get_threshold() == GC_THRESHOLDS
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
