"""Fakes for the workers' tests: a process reactor on a fake clock, a fake worker that
speaks AMP in memory, a result writer that records, and a job maker.

twisted.runner.procmon's ``DummyProcessReactor(MemoryReactor, Clock)`` idea: spawnProcess
records a :class:`FakeProcess` the test can make exit; with a :class:`FakeWorker`
attached, what the daemon writes to the child's AMP fd reaches the fake worker's AMP and
its answers come back on fd 4, all in memory, in the test's control.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.interfaces import IAddress, ITransport
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols.amp import AMP
from twisted.python.failure import Failure
from zope.interface import implementer

from dpatia_daemon.jobs import Callback, Job, JobKind
from dpatia_daemon.models import Result
from dpatia_daemon.sps.results import Status
from dpatia_daemon.workers.commands import (
    WORKER_AMP_IN,
    WORKER_AMP_OUT,
    CancelJob,
    Hello,
    NewCallback,
    Ping,
    RunJob,
)


@implementer(IAddress)
class _Nowhere:
    pass


@implementer(ITransport)
class _ToDaemon:
    """The fake worker's transport: what it writes arrives on the daemon's fd 4."""

    def __init__(self, process: FakeProcess) -> None:
        self.process = process

    def write(self, data: bytes) -> None:
        # On the next reactor turn, as through a real pipe: AMP records a question
        # only after writing it, so an answer must never arrive within the write.
        self.process.reactor.callLater(0, self._deliver, data)

    def _deliver(self, data: bytes) -> None:
        if self.process.alive:
            self.process.proto.childDataReceived(WORKER_AMP_OUT, data)

    def writeSequence(self, data: Iterable[bytes]) -> None:
        for chunk in data:
            self.write(chunk)

    def loseConnection(self) -> None:
        pass

    def getPeer(self) -> IAddress:
        return _Nowhere()

    def getHost(self) -> IAddress:
        return _Nowhere()


class FakeWorker(AMP):
    """A worker's AMP side whose answers the test decides.

    ``RunJob`` answers with the Deferred the test finds in :attr:`jobs` (fire it with a
    response dict or fail it with an AnalysisFailed/JobCancelled); ``deaf`` stops Ping
    answers; ``CancelJob`` and ``NewCallback`` calls are recorded.
    """

    def __init__(self, pid: int) -> None:
        super().__init__()
        self.pid = pid
        self.deaf = False
        self.jobs: dict[str, Deferred[dict[str, Any]]] = {}
        self.cancels: list[str] = []
        self.callbacks: list[tuple[str, str, str]] = []
        self.stop_on_cancel = False

    @Hello.responder
    def hello(self) -> dict[str, Any]:
        return {"pid": self.pid, "analysis": "fake", "load_error": ""}

    @Ping.responder
    def ping(self) -> Deferred[dict[str, Any]] | dict[str, Any]:
        if self.deaf:
            return Deferred()  # never answered
        return {}

    @RunJob.responder
    def run_job(self, job_id: str, work_dir: str, **kwargs: Any) -> Deferred[dict[str, Any]]:
        d: Deferred[dict[str, Any]] = Deferred()
        self.jobs[job_id] = d
        return d

    @CancelJob.responder
    def cancel_job(self, job_id: str) -> dict[str, Any]:
        self.cancels.append(job_id)
        return {"running": job_id in self.jobs}

    @NewCallback.responder
    def new_callback(self, job_id: str, url: str, token: str) -> dict[str, Any]:
        self.callbacks.append((job_id, url, token))
        return {"running": job_id in self.jobs}


class FakeProcess:
    """A spawned 'process': records its executable and environment, signals and pipe
    closes; the test ends it.

    With a :attr:`worker`, AMP written to fd 3 reaches it; closing fd 3 (EOF) makes
    the process exit on the next reactor turn, as a real worker does.
    """

    def __init__(self, reactor: ProcessClock, proto: Any, pid: int, amp: bool) -> None:
        self.reactor = reactor
        self.proto = proto
        self.pid = pid
        self.signals: list[str] = []
        self.closed: list[int] = []
        self.written = b""
        self.alive = True
        #: What it was spawned with (set by :meth:`ProcessClock.spawnProcess`).
        self.executable: str = ""
        self.env: dict[str, str] = {}
        self.worker: FakeWorker | None = None
        if amp:
            self.worker = FakeWorker(pid)
            self.worker.makeConnection(_ToDaemon(self))

    def signalProcess(self, signal: str) -> None:
        self.signals.append(signal)

    def closeStdin(self) -> None:
        self.closed.append(0)

    def closeChildFD(self, fd: int) -> None:
        self.closed.append(fd)
        if fd == WORKER_AMP_IN and self.worker is not None:
            self.reactor.callLater(0, self.end, 0)

    def writeToChild(self, fd: int, data: bytes) -> None:
        self.written += data
        if self.worker is not None and self.alive:
            self.worker.dataReceived(data)

    def end(self, code: int | None = 1, signal: int | None = None) -> None:
        if not self.alive:
            return
        self.alive = False
        if code == 0 and signal is None:
            self.proto.processEnded(Failure(ProcessDone(0)))
        else:
            self.proto.processEnded(Failure(ProcessTerminated(exitCode=code, signal=signal)))


class ProcessClock(MemoryReactorClock):
    """MemoryReactor + Clock whose spawnProcess makes :class:`FakeProcess` es (with a
    :class:`FakeWorker` on their AMP fds when ``amp``)."""

    def __init__(self, amp: bool = False) -> None:
        super().__init__()
        self.amp = amp
        self.spawned: list[tuple[float, FakeProcess, list[str], dict[int, str]]] = []

    def spawnProcess(
        self,
        proto: Any,
        executable: Any,
        args: Any,
        env: Any = None,
        path: Any = None,
        uid: Any = None,
        gid: Any = None,
        usePTY: bool = False,
        childFDs: Any = None,
    ) -> FakeProcess:
        process = FakeProcess(self, proto, 1000 + len(self.spawned), self.amp)
        process.executable = executable
        process.env = dict(env or {})
        self.spawned.append((self.seconds(), process, list(args), dict(childFDs or {})))
        proto.makeConnection(process)
        return process

    @property
    def last(self) -> FakeProcess:
        """The process spawned last."""
        return self.spawned[-1][1]


def make_job(
    slide: str, *, kind: JobKind = JobKind.NOTIFICATION, created: float = 0.0, priority: int = 0
) -> Job:
    return Job(
        slide_id=slide,
        application_id="dpatia",
        kind=kind,
        callback=Callback("http://127.0.0.1:1/sps", "secret"),
        created=created,
        priority=priority,
    )


@attrs.define
class FakeWriter:
    """Records what a JobRun writes, at what (fake) time; ``hold`` delays updates."""

    clock: Any
    writes: list[tuple[float, str, Any]] = attrs.field(factory=list)
    hold: list[Deferred[None]] = attrs.field(factory=list)
    verdicts: list[tuple[str, str, str | None]] = attrs.field(factory=list)

    async def resolve(self, job: Job) -> Result:
        return Result(slideId=job.slide_id, id=7, versionId="v0")

    async def find(self, job: Job) -> Result | None:
        return Result(slideId=job.slide_id, id=7, versionId="v0")

    def frame(self, job: Job, status: Status, text: str, **kw: Any) -> Any:
        return (status.value, text, kw.get("progress"))

    def final(self, job: Job, result: Result) -> Any:
        return ("Final", result.displayResult, None)

    async def update(self, job: Job, stored: Result, new: Any, keep: Any = None) -> Result:
        if self.hold:
            await self.hold.pop(0)
        self.writes.append((self.clock.seconds(), new[0], new[2]))
        return attrs.evolve(stored, versionId=f"v{len(self.writes)}")

    async def quality_control(self, job: Job, status: str, version_id: str | None) -> None:
        self.verdicts.append((job.job_id, status, version_id))
        self.writes.append((self.clock.seconds(), "QC", None))
