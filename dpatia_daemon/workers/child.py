"""The worker process: ``python -m dpatia_daemon.workers.child --analysis SPEC [...]``.

(With ``--check`` it only loads the analysis and prints what :func:`check` says: the
daemon's start-time check of ``[workers] python``.)

The daemon's supervisor spawns it with AMP on child fds
:data:`~dpatia_daemon.workers.commands.WORKER_AMP_IN` / :data:`~dpatia_daemon.workers.commands.WORKER_AMP_OUT`
and stdout/stderr as log streams.  The worker:

* imports the analysis at start (:func:`~dpatia_daemon.analyses.loader.load_analysis`);
  if that fails it stays up and answers every ``RunJob`` with the reason, so the job
  attempt fails with a clear error and the supervisor restarts it with backoff;
* runs one analysis at a time in a thread of its own, so its reactor keeps answering
  ``Ping`` and ``CancelJob`` whatever the analysis does;
* reads ``job.json`` from the job's work folder and writes ``result.json`` there
  (atomically), answering ``RunJob`` with its path and the analysis's quality-control
  verdict (with the slide's QC ``versionId`` from its metadata); while it fetches the
  slide its SPS calls use the newest callback token (the daemon sends newer ones with
  ``NewCallback``), and with SPS client credentials (from its environment, which it
  then clears) it obtains its own tokens when the SPS rejects the callback token;
* coalesces progress reports: at most one ``Progress`` call in flight, carrying the
  newest values;
* exits when its AMP pipe closes (the daemon stopped it, or died), and on SIGTERM at
  once; on Linux it also asks the kernel for SIGKILL when its parent dies, so a worker
  stuck in C code is never orphaned.  SIGINT is ignored: a Ctrl-C in a terminal goes
  to the whole process group, and the daemon decides when its workers stop.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import sys
import threading
from types import MappingProxyType
from typing import Any

import attrs
from attrs import define, field
from twisted.internet import threads
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    eventAsText,
    globalLogBeginner,
)
from twisted.protocols.amp import AMP
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath

from .._version import __version__
from ..analyses import Analysis, AnalysisCancelled, AnalysisJob, as_result
from ..analyses.loader import AnalysisLoadError, load_analysis
from ..durable import write_atomically
from ..jobs import Callback, Job, JobKind
from ..models import unstructure
from ..pipeline.download import DownloadError
from ..pipeline.prepare import PipelineSettings, Prepared, analysis_progress, prepare
from ..pipeline.regions import RegionError, RegionReader, tile_extension
from ..sps.client import SPSClient, SPSError, make_http_client
from ..sps.info import SPSVersions
from ..sps.tokens import Credentials, JobCallback, callback_auth
from ..text import MAX_PROGRESS_TEXT, bounded
from .commands import (
    WORKER_AMP_IN,
    WORKER_AMP_OUT,
    AnalysisFailed,
    CancelJob,
    Hello,
    JobCancelled,
    NewCallback,
    Ping,
    Progress,
    RunJob,
    StepDone,
    TransientFailure,
    WorkerBusy,
)
from .faults import classify
from .limits import apply_memory_limit, out_of_memory
from .workfolder import CONTENT_KEY, JOB_FILE, RESULT_FILE, SLIDE_INFO_FILE

log = Logger()


@define(eq=False)
class _Running:
    """The job a worker is running: its cancel event and the progress hand-over."""

    job_id: str
    done: Deferred[dict[str, Any]]
    cancel: threading.Event = field(factory=threading.Event)
    lock: threading.Lock = field(factory=threading.Lock)
    latest: tuple[int, str] | None = None
    scheduled: bool = False
    in_flight: bool = False
    preparing: Deferred[Any] | None = None
    #: The job failed or was deferred before (a 404 may then be transient).
    retrying: bool = False


class WorkerProtocol(AMP):
    """The worker's side of the AMP conversation (see :mod:`dpatia_daemon.workers.commands`).

    Collaborators: the ``reactor`` (only ``callFromThread`` and ``stop``), the loaded
    ``analysis`` (None when it failed to load, with ``load_error`` saying why), the
    ``spec`` it was loaded from, its ``settings``, and the SPS client ``credentials``
    (None when not configured).
    """

    def __init__(
        self,
        reactor: Any,
        spec: str,
        analysis: Analysis | None,
        load_error: str = "",
        settings: dict[str, str] | None = None,
        pipeline: PipelineSettings | None = None,
        credentials: Credentials | None = None,
    ) -> None:
        super().__init__()
        self.reactor = reactor
        self.spec = spec
        self.analysis = analysis
        self.load_error = load_error
        self.settings = MappingProxyType(dict(settings or {}))
        self.pipeline = pipeline
        self.current: _Running | None = None
        self._sps: SPSClient | None = None
        self._versions: SPSVersions | None = None
        self._handlers: dict[str, Analysis] = {}
        self._credentials = credentials
        self._callbacks = JobCallback()
        #: The SPS calls made since the last StepDone, by "endpoint class" (metrics).
        self._requests: dict[str, int] = {}

    # --- daemon → worker ---

    @Hello.responder
    def hello(self) -> dict[str, Any]:
        """Who we are and whether the analysis loaded."""
        return {"pid": os.getpid(), "analysis": self.spec, "load_error": self.load_error}

    @Ping.responder
    def ping(self) -> dict[str, Any]:
        """Still here."""
        return {}

    @RunJob.responder
    def run_job(self, job_id: str, work_dir: str) -> Deferred[dict[str, Any]]:
        """Start the analysis in its own thread; answer when it is done."""
        if self.current is not None:
            raise WorkerBusy(f"already running job {self.current.job_id}")
        if self.analysis is None:
            raise AnalysisFailed(self.load_error)
        running = _Running(job_id=job_id, done=Deferred())
        self.current = running
        if self.pipeline is None:
            self._start_analysis(running, self.analysis, work_dir, None)
        else:
            # The pipeline's steps are network and disk work: they run on this reactor
            # (AMP keeps answering), and CancelJob cancels them mid-download.
            analysis = self.analysis
            preparing = running.preparing = ensureDeferred(
                self._prepare(running, self.pipeline, work_dir)
            )
            preparing.addCallbacks(
                lambda prepared: self._start_analysis(running, analysis, work_dir, prepared),
                lambda failure: self._prepare_failed(running, failure),
            )
        return running.done

    def _start_analysis(
        self, running: _Running, analysis: Analysis, work_dir: str, prepared: Prepared | None
    ) -> None:
        running.preparing = None
        if running.cancel.is_set():
            self._finished(running, Failure(JobCancelled(f"job {running.job_id} cancelled")))
            return
        thread = threading.Thread(
            target=self._thread_main,
            args=(running, analysis, work_dir, prepared),
            name=f"analysis {running.job_id}",
            # A hung analysis must never keep the process alive once the daemon
            # closed our pipe.
            daemon=True,
        )
        thread.start()

    async def _prepare(
        self, running: _Running, settings: PipelineSettings, work_dir: str
    ) -> Prepared:
        folder = FilePath(work_dir)
        job = Job.from_json(folder.child(JOB_FILE).getContent())
        if job.job_id != running.job_id:
            raise AnalysisFailed(f"{JOB_FILE} in {work_dir} is for job {job.job_id}")
        running.retrying = job.attempts > 0 or job.deferred_since is not None
        sps = self._sps_client(settings)
        self._callbacks.follow(job)
        try:
            return await prepare(
                job,
                folder,
                settings,
                sps=sps,
                clock=self.reactor,
                run_blocking=lambda f, *args: threads.deferToThreadPool(
                    self.reactor, self.reactor.getThreadPool(), f, *args
                ),
                progress=lambda percent, text: self._report(running, percent, text),
                versions=self._versions,
                step=lambda name, seconds, size: self._step(running, name, seconds, size),
            )
        except BaseException:
            self._callbacks.stop()
            raise
        # Still followed while the analysis runs: job.read_region fetches tiles with
        # the newest token; _finished stops it.

    def _prepare_failed(self, running: _Running, failure: Failure) -> None:
        running.preparing = None
        error = failure.value if failure.value is not None else Exception(failure.getErrorMessage())
        fault = classify(error, retrying=running.retrying)
        if running.cancel.is_set() or failure.check(CancelledError, JobCancelled):
            outcome = Failure(JobCancelled(f"job {running.job_id} cancelled"))
        elif failure.check(AnalysisFailed):
            outcome = failure
        elif fault.transient:
            # An outage or a full disk, not the job's fault: the daemon defers it.
            log.warn(
                "job {job_id}: fetching the slide failed, transiently: {error}",
                job_id=running.job_id,
                error=fault.reason,
                retry_after=fault.retry_after,
            )
            outcome = Failure(
                TransientFailure(
                    bounded(f"fetching the slide failed: {fault.reason}"),
                    fault.retry_after,
                    sps=fault.sps,
                )
            )
        elif failure.check(DownloadError, SPSError):
            # Expected trouble (the SPS, the network): the message says it all.
            log.warn(
                "job {job_id}: fetching the slide failed: {error}",
                job_id=running.job_id,
                error=failure.getErrorMessage(),
            )
            outcome = Failure(
                AnalysisFailed(bounded(f"fetching the slide failed: {failure.value}"))
            )
        else:
            log.failure("job {job_id}: fetching the slide failed", failure, job_id=running.job_id)
            outcome = Failure(
                AnalysisFailed(bounded(f"{type(failure.value).__name__}: {failure.value}"))
            )
        self._finished(running, outcome)

    def _sps_client(self, settings: PipelineSettings) -> SPSClient:
        """One SPS client (and connection pool) for the worker's life."""
        if self._sps is None:
            http = make_http_client(
                self.reactor,
                verify_tls=settings.verify_tls,
                ca_file=settings.ca_file,
                connect_timeout=min(10.0, settings.sps_timeout),
            )
            sps = SPSClient(
                http=http.client,
                clock=self.reactor,
                api_version=settings.api_version,
                software_version=__version__,
                timeout=settings.sps_timeout,
                retries=settings.sps_retries,
            )
            auth = callback_auth(
                sps.fetch_token,
                self.reactor,
                settings.application_id,
                self._credentials,
                callbacks=self._callbacks,
            )
            self._sps = attrs.evolve(sps, auth=auth, on_answer=self._sps_answered)
            self._versions = SPSVersions(sps=self._sps, clock=self.reactor)
        return self._sps

    def _sps_answered(self, endpoint: str, status: str) -> None:
        """Count one SPS call (sent to the daemon with the next step's timing)."""
        name = f"{endpoint} {status}"
        self._requests[name] = self._requests.get(name, 0) + 1

    def _step(self, running: _Running, step: str, seconds: float, size: int) -> None:
        """Tell the daemon a step of the job is over (for its metrics; best effort)."""
        requests, self._requests = self._requests, {}
        d = self.callRemote(
            StepDone,
            job_id=running.job_id,
            step=step,
            seconds=float(seconds),
            size=int(size),
            requests=json.dumps(requests),
        )
        # An older daemon does not know the command: nothing is lost but a metric.
        d.addErrback(
            lambda f: log.debug("step report not taken: {error}", error=f.getErrorMessage())
        )

    @CancelJob.responder
    def cancel_job(self, job_id: str) -> dict[str, Any]:
        """Set the cancellation event of ``job_id`` if it is the one running."""
        running = self.current
        if running is None or running.job_id != job_id:
            return {"running": False}
        running.cancel.set()
        if running.preparing is not None:
            running.preparing.cancel()
        log.info("job {job_id}: cancellation requested", job_id=job_id)
        return {"running": True}

    @NewCallback.responder
    def new_callback(self, job_id: str, url: str, token: str) -> dict[str, Any]:
        """A newer callback for ``job_id``: its SPS calls from now on use it."""
        running = self.current is not None and self.current.job_id == job_id
        self._callbacks.update(job_id, Callback(url, token))
        return {"running": running}

    # --- the analysis thread ---

    def _thread_main(
        self, running: _Running, analysis: Analysis, work_dir: str, prepared: Prepared | None
    ) -> None:
        outcome: dict[str, Any] | Failure
        started = self.reactor.seconds()
        try:
            outcome = self._analyse(running, analysis, work_dir, prepared)
            seconds = self.reactor.seconds() - started
            # Before the answer (same pipe, in order): the daemon times the store from it.
            self.reactor.callFromThread(self._step, running, "analysis", seconds, 0)
        except AnalysisCancelled:
            outcome = Failure(JobCancelled(f"job {running.job_id} cancelled"))
        except AnalysisFailed as e:
            outcome = Failure(e)
        except MemoryError:
            # Past [workers] memory_limit (or the host's memory): say so, not a bare
            # "MemoryError: " with an empty message.
            log.failure("job {job_id}: the analysis ran out of memory", job_id=running.job_id)
            outcome = Failure(AnalysisFailed(out_of_memory()))
        except BaseException as e:  # noqa: B036 - the analysis is foreign code: report all
            # Logged here (with its traceback) so the operator sees it in the daemon
            # log; the one-line reason travels to the daemon with the error.
            log.failure("job {job_id}: the analysis failed", job_id=running.job_id)
            outcome = Failure(AnalysisFailed(bounded(f"{type(e).__name__}: {e}")))
        self.reactor.callFromThread(self._finished, running, outcome)

    def _analyse(
        self, running: _Running, analysis: Analysis, work_dir: str, prepared: Prepared | None
    ) -> dict[str, Any]:
        """Run ``analysis`` for the job in ``work_dir``; return RunJob's answer."""
        folder = FilePath(work_dir)
        job = Job.from_json(folder.child(JOB_FILE).getContent())
        if job.job_id != running.job_id:
            raise AnalysisFailed(f"{JOB_FILE} in {work_dir} is for job {job.job_id}")
        slide_info: dict[str, Any] | None = job.image_info
        info_file = folder.child(SLIDE_INFO_FILE)
        if prepared is not None and prepared.slide_info is not None:
            slide_info = prepared.slide_info
        elif info_file.exists():
            slide_info = json.loads(info_file.getContent())

        def report(percent: int, text: str) -> None:
            if prepared is not None:
                percent = analysis_progress(int(percent))
            self._report(running, percent, text)

        analysis_job = AnalysisJob(
            job_id=job.job_id,
            slide_id=job.slide_id,
            input=MappingProxyType(dict(job.input)),
            work_dir=work_dir,
            slide_info=MappingProxyType(slide_info) if slide_info is not None else None,
            context=MappingProxyType(dict(job.context)),
            settings=self.settings,
            progress=report,
            cancelled=running.cancel.is_set,
            wait=running.cancel.wait,
            thumbnail_path=prepared.thumbnail_path if prepared else None,
            label_path=prepared.label_path if prepared else None,
            files=prepared.files if prepared else (),
            pixels=self._region_reader(job, slide_info, running),
            case=tuple(MappingProxyType(c) for c in prepared.case)
            if prepared is not None and prepared.case is not None
            else None,
        )
        if job.kind is JobKind.ACTION:
            # A button press: the [app] on_action callable the front door named.
            analysis = self._action_handler(str(job.input.get("handler") or ""))
        log.info("job {job_id}: analysis started", job_id=job.job_id)
        answer = analysis(analysis_job)
        if running.cancel.is_set():
            raise AnalysisCancelled(job.job_id)
        try:
            result, verdict = as_result(answer, job.slide_id)
        except TypeError as e:
            raise AnalysisFailed(str(e)) from None
        record: dict[str, Any] = {"jobId": job.job_id}
        payload = result.data.result
        if payload is not None and payload.content is not None:
            # The content (thousands of shapes: MiB) as one JSON string: the daemon
            # reads it in a blink and sends it on as it is, never parsed and re-encoded.
            record[CONTENT_KEY] = json.dumps(payload.content, allow_nan=False)
            result = attrs.evolve(
                result, data=attrs.evolve(result.data, result=attrs.evolve(payload, content=None))
            )
        record["result"] = unstructure(result)
        reply: dict[str, Any] = {}
        if verdict is not None:
            # Sent with the slide's QC state as the metadata had it (none if unknown).
            version = _qc_version(slide_info)
            record["qualityControl"] = reply["quality_control"] = verdict
            if version is not None:
                record["qualityControlVersion"] = reply["qc_version"] = version
        body = json.dumps(record, allow_nan=False).encode("utf-8")
        reply["result_path"] = write_atomically(folder.child(RESULT_FILE).path, body)
        return reply

    def _action_handler(self, spec: str) -> Analysis:
        """The ``[app] on_action`` callable ``spec`` (imported once per worker)."""
        handler = self._handlers.get(spec)
        if handler is None:
            try:
                handler = self._handlers[spec] = load_analysis(spec)
            except AnalysisLoadError as e:
                raise AnalysisFailed(bounded(f"on_action: {e}")) from None
        return handler

    def _region_reader(
        self, job: Job, slide_info: dict[str, Any] | None, running: _Running
    ) -> RegionReader | None:
        """``job.read_region``'s tile reader (None without an SPS client or image size)."""
        if self._sps is None or not isinstance(slide_info, dict):
            return None
        try:
            return RegionReader(
                reactor=self.reactor,
                sps=self._sps,
                callback=job.callback,
                slide_id=job.slide_id,
                info=slide_info,
                cancelled=running.cancel.is_set,
                ext=tile_extension(slide_info),
            )
        except RegionError:
            return None

    def _report(self, running: _Running, percent: Any, text: Any) -> None:
        """``progress(percent, text)`` as the analysis calls it, from its thread."""
        try:
            value = max(0, min(100, int(percent)))
        except (TypeError, ValueError, OverflowError):
            value = 0
        message = bounded(" ".join(str(text).split()), MAX_PROGRESS_TEXT)
        with running.lock:
            running.latest = (value, message)
            if running.scheduled:
                return
            running.scheduled = True
        self.reactor.callFromThread(self._send_progress, running)

    # --- back in the reactor thread ---

    def _send_progress(self, running: _Running) -> None:
        if running.in_flight:
            return  # sent when the call in flight is answered
        with running.lock:
            latest, running.latest = running.latest, None
            running.scheduled = False
        if latest is None or running is not self.current:
            return
        running.in_flight = True
        percent, text = latest
        d = self.callRemote(Progress, job_id=running.job_id, percent=percent, text=text)

        def answered(result: object) -> None:
            running.in_flight = False
            if isinstance(result, Failure):
                log.warn(
                    "job {job_id}: progress report failed: {error}",
                    job_id=running.job_id,
                    error=result.getErrorMessage(),
                )
            if running.latest is not None:
                self._send_progress(running)

        d.addBoth(answered)

    def _finished(self, running: _Running, outcome: dict[str, Any] | Failure) -> None:
        if self.current is running:
            self.current = None
            self._callbacks.stop()
        if isinstance(outcome, Failure):
            running.done.errback(outcome)
        else:
            log.info("job {job_id}: analysis done", job_id=running.job_id)
            running.done.callback(outcome)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        """The daemon closed our pipe (or died): stop the analysis and exit."""
        super().connectionLost(reason)
        if self.current is not None:
            self.current.cancel.set()
        if getattr(self.reactor, "running", False):
            self.reactor.stop()


def _qc_version(slide_info: Any) -> str | None:
    """The ``versionId`` of the slide's QC state in its metadata (SPS 4.2+), if any."""
    try:
        version = slide_info["qualityControl"]["versionId"]
    except (KeyError, TypeError):
        return None
    return version if isinstance(version, str) else None


# --- process set-up -------------------------------------------------------------------


def _die_with_parent() -> None:
    """Ask Linux for SIGKILL when the daemon dies (best effort; EOF covers the rest)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    # The daemon only sends SIGTERM after asking nicely (CancelJob or EOF): exit now,
    # without waiting for an analysis thread.
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(128 + signum)


def _log_to_stderr() -> None:
    """Twisted log events as plain lines on stderr: the daemon adds time and tags."""

    def format_event(event: Any) -> str:
        text = eventAsText(event, includeTimestamp=False, includeSystem=False)
        return text + "\n" if text else ""

    # Twisted's own chatter (connection made/lost, main loop) is not news in a worker.
    levels = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)
    levels.setLogLevelForNamespace("twisted", LogLevel.warn)
    observer = FilteringLogObserver(FileLogObserver(sys.stderr, format_event), [levels])
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)


def _setting(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, not {text!r}")
    return key.strip(), value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The worker's command line (built by the supervisor, not typed by people)."""
    parser = argparse.ArgumentParser(prog="python -m dpatia_daemon.workers.child")
    parser.add_argument("--analysis", required=True, help="[app] analysis spec")
    parser.add_argument(
        "--pipeline",
        type=PipelineSettings.from_json,
        default=None,
        metavar="JSON",
        help="fetch the slide first (metadata, thumbnail, label, WSI) with these settings",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="load the analysis, print one JSON line (version, interpreter, error) and exit",
    )
    parser.add_argument(
        "--setting",
        action="append",
        type=_setting,
        default=[],
        metavar="KEY=VALUE",
        help="a setting for the analysis (repeatable)",
    )
    return parser.parse_args(argv)


def check(spec: str) -> dict[str, str]:
    """What ``--check`` prints: this interpreter, dpatia's version here, and whether
    the analysis loads (``error`` empty) — the daemon's start-time check of
    ``[workers] python``."""
    error = ""
    try:
        load_analysis(spec)
    except AnalysisLoadError as e:
        error = str(e)
    return {
        "version": __version__,
        "executable": sys.executable,
        "python": sys.version.split()[0],
        "error": error,
    }


def main(argv: list[str] | None = None) -> None:
    """Load the analysis, speak AMP on fds 3/4 until the daemon closes them, exit."""
    options = parse_args(argv)
    # Before the analysis is imported (a model's import may already allocate), and in
    # the start-time check too, so an analysis that cannot load within it is found then.
    apply_memory_limit()
    if options.check:
        answer = json.dumps(check(options.analysis))
        # Whatever the analysis printed while importing went first: ours is the last line.
        sys.stdout.write("\n" + answer + "\n")
        sys.stdout.flush()
        os._exit(0)
    # First: out of the environment before anything (the analysis) can start a process.
    credentials = Credentials.take_from_environ(os.environ)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    _die_with_parent()
    _log_to_stderr()

    analysis: Analysis | None = None
    load_error = ""
    try:
        analysis = load_analysis(options.analysis)
    except AnalysisLoadError as e:
        load_error = str(e)
        log.error("cannot load the analysis: {error}", error=load_error)

    from twisted.internet import reactor
    from twisted.internet.stdio import StandardIO

    protocol = WorkerProtocol(
        reactor,
        options.analysis,
        analysis,
        load_error,
        dict(options.setting),
        options.pipeline,
        credentials,
    )
    # (mypy sees the Windows StandardIO, which has no fd arguments.)
    StandardIO(protocol, stdin=WORKER_AMP_IN, stdout=WORKER_AMP_OUT, reactor=reactor)  # type: ignore[call-arg]
    reactor.run(installSignalHandlers=False)  # type: ignore[attr-defined,call-arg]
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    # Do not wait for an analysis thread (or a library's atexit hook) to finish.
    os._exit(0)


if __name__ == "__main__":
    main()
