"""The background queue of SPS writes: oldest first, bounded, held back while busy."""

from __future__ import annotations

from typing import Any

from conftest import no_result, success_result_of
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from dpatia_daemon.frontdoor.background import BackgroundQueue


class Tasks:
    """Tasks that record their start and finish when the test says so."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.gates: dict[str, Deferred[None]] = {}

    def task(self, name: str) -> Any:
        async def run() -> None:
            self.started.append(name)
            gate: Deferred[None] = Deferred()
            self.gates[name] = gate
            await gate

        return run

    def finish(self, name: str) -> None:
        self.gates.pop(name).callback(None)


def make(
    concurrency: int = 2, max_delay: float = 5.0
) -> tuple[BackgroundQueue, Clock, Tasks, list[bool]]:
    clock = Clock()
    busy = [False]
    queue = BackgroundQueue(
        concurrency=concurrency, busy=lambda: busy[0], max_delay=max_delay, clock=clock
    )
    return queue, clock, Tasks(), busy


def test_idle_runs_oldest_first_up_to_the_concurrency() -> None:
    queue, _, tasks, _ = make(concurrency=2)
    for name in "abc":
        queue.submit(name, tasks.task(name))
    assert tasks.started == ["a", "b"]
    tasks.finish("b")
    assert tasks.started == ["a", "b", "c"]


def test_busy_holds_tasks_back_until_the_front_door_is_idle() -> None:
    queue, clock, tasks, busy = make(concurrency=2, max_delay=5.0)
    busy[0] = True
    queue.submit("a", tasks.task("a"))
    queue.submit("b", tasks.task("b"))
    clock.advance(4.9)
    assert tasks.started == []
    busy[0] = False
    queue.wake()
    assert tasks.started == ["a", "b"]


def test_busy_runs_overdue_tasks_one_at_a_time() -> None:
    """A front door that never pauses still gets every task run, one after another,
    each no later than max_delay after it was submitted (or its predecessor ended)."""
    queue, clock, tasks, busy = make(concurrency=4, max_delay=5.0)
    busy[0] = True
    queue.submit("a", tasks.task("a"))
    clock.advance(1.0)
    queue.submit("b", tasks.task("b"))
    queue.submit("c", tasks.task("c"))
    clock.advance(3.9)
    assert tasks.started == []
    clock.advance(0.1)  # a is 5 s old
    assert tasks.started == ["a"]
    clock.advance(10)
    assert tasks.started == ["a"], "one at a time while busy"
    tasks.finish("a")  # b and c are overdue by now: the next one starts at once
    assert tasks.started == ["a", "b"]
    tasks.finish("b")
    assert tasks.started == ["a", "b", "c"]
    tasks.finish("c")
    assert queue.backlog == 0
    assert not clock.getDelayedCalls()


def test_drain_fires_when_everything_ran_and_close_drops_the_waiting() -> None:
    queue, clock, tasks, busy = make(concurrency=1)
    busy[0] = True
    queue.submit("a", tasks.task("a"))
    queue.submit("b", tasks.task("b"))
    drained = queue.drain()
    no_result(drained)
    clock.advance(5)
    assert tasks.started == ["a"]
    closed = queue.close()
    no_result(closed)
    assert queue.backlog == 1
    tasks.finish("a")
    assert success_result_of(closed) is None
    assert success_result_of(drained) is None
    assert tasks.started == ["a"]
    assert not clock.getDelayedCalls()
    queue.submit("late", tasks.task("late"))
    assert tasks.started == ["a"]


def test_a_failing_task_is_logged_and_the_queue_goes_on() -> None:
    queue, _, tasks, _ = make(concurrency=1)

    async def boom() -> None:
        raise RuntimeError("SPS said no")

    queue.submit("boom", boom)
    queue.submit("a", tasks.task("a"))
    assert tasks.started == ["a"]
    tasks.finish("a")
    assert queue.backlog == 0
