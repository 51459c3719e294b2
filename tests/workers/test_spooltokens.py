"""Newer callback tokens that reached the spool through another daemon, pushed to the
jobs running here (:class:`~dpatia_daemon.workers.spooltokens.SpoolTokenWatch`), on a
memory spool and a ``task.Clock``."""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet.task import Clock

from dpatia_daemon.jobs import Callback, Job, JobKind
from dpatia_daemon.spool import MemorySpool
from dpatia_daemon.sps.tokens import TokenBook
from dpatia_daemon.workers.spooltokens import SpoolTokenWatch


def request(token: str, created: float, job_id: str) -> Job:
    return Job(
        slide_id="slide-t",
        application_id="dpatia",
        kind=JobKind.NOTIFICATION,
        callback=Callback("http://127.0.0.1:1/sps", token),
        created=created,
        job_id=job_id,
    )


class Rig:
    def __init__(self) -> None:
        self.clock = Clock()
        self.spool = MemorySpool()
        self.spool.startService()
        self.tokens = TokenBook()
        self.heard: list[tuple[str, str, Callback]] = []
        self.tokens.subscribe(lambda app, slide, cb: self.heard.append((app, slide, cb)))
        self.running: list[Job] = []
        self.reads = 0
        original = self.spool.queued_of

        def counting(key: str, seen: object = None) -> Any:
            d = original(key, seen)

            def count(answer: tuple[object, Job | None]) -> tuple[object, Job | None]:
                self.reads += answer[1] is not None
                return answer

            return d.addCallback(count)

        self.spool.queued_of = counting  # type: ignore[method-assign]
        self.watch = SpoolTokenWatch(
            self.spool, self.clock, lambda: list(self.running), self.tokens, interval=5.0
        )


def test_a_token_another_daemon_queued_for_a_running_job_reaches_the_token_book() -> None:
    """A newer request for a running job's key, queued by another daemon: within one
    interval its callback is recorded (and so pushed to the worker), once."""
    rig = Rig()
    first = rig.spool.add(request("old", 100.0, "aa" * 16)).result
    running = rig.spool.claim(first.job_id).result
    rig.running.append(running)
    rig.watch.start()
    rig.clock.advance(5)
    assert rig.heard == []  # nothing queued behind it yet
    rig.spool.add(request("new", 200.0, "bb" * 16))
    rig.clock.advance(5)
    assert rig.heard == [("dpatia", "slide-t", Callback("http://127.0.0.1:1/sps", "new"))]
    # Unchanged since: not read again, not recorded again.
    reads = rig.reads
    rig.clock.advance(5)
    rig.clock.advance(5)
    assert rig.reads == reads
    assert len(rig.heard) == 1
    rig.watch.stop()


def test_the_running_jobs_own_callback_is_not_news() -> None:
    """A queued record with the callback the running job already uses is not pushed,
    and a job that stopped running is forgotten."""
    rig = Rig()
    first = rig.spool.add(request("same", 100.0, "aa" * 16)).result
    running = rig.spool.claim(first.job_id).result
    rig.running.append(running)
    rig.spool.add(request("same", 200.0, "bb" * 16))
    rig.watch.start()
    rig.clock.advance(5)
    assert rig.heard == []
    rig.running.clear()
    rig.clock.advance(5)
    assert rig.watch._seen == {}
    rig.watch.stop()


def test_the_watch_survives_a_failing_spool() -> None:
    """A spool error is logged and the next interval checks again."""
    rig = Rig()
    first = rig.spool.add(request("old", 100.0, "aa" * 16)).result
    rig.running.append(attrs.evolve(rig.spool.claim(first.job_id).result))
    calls = []

    def broken(key: str, seen: object = None) -> Any:
        calls.append(key)
        raise OSError("stale file handle")

    rig.spool.queued_of = broken  # type: ignore[method-assign]
    rig.watch.start()
    rig.clock.advance(5)
    rig.clock.advance(5)
    assert len(calls) == 2
    rig.watch.stop()
