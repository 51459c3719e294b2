"""The AMP conversation between the daemon and its workers, by direction.

The files of a job's work folder it refers to are named in :mod:`.workfolder`.

A worker is ``python -m dpatia_daemon.workers.child``.  AMP runs on two dedicated pipes, child
fd :data:`WORKER_AMP_IN` (daemon → worker) and :data:`WORKER_AMP_OUT` (worker →
daemon), so whatever analysis code prints on stdout/stderr is a log line and can
never corrupt the protocol.  The daemon closing :data:`WORKER_AMP_IN` (EOF) tells the
worker to exit.

Only ids, paths, numbers and short texts cross these pipes, never file contents: AMP
values are capped at 64 KiB, so a final result travels as the path of a file in the
job's work folder.  Every text that could grow (error messages, progress texts) is cut
to a bound (:func:`dpatia_daemon.text.bounded`) before it is sent.

Errors: a responder may only raise the errors its command declares; anything else
makes AMP drop the connection, so the worker catches everything else itself.  AMP
hands the description to the receiving side as bytes, which :class:`_MessageError`
turns back into text.
"""

from __future__ import annotations

from typing import ClassVar

from twisted.protocols.amp import Boolean, Command, Float, Integer, Unicode

#: Child fd the worker reads AMP from (the daemon writes it); EOF means "exit".
WORKER_AMP_IN = 3
#: Child fd the worker writes AMP to (the daemon reads it).
WORKER_AMP_OUT = 4


class _MessageError(Exception):
    """An error with a one-line text that survives the trip over AMP (bytes or str)."""

    def __init__(self, message: str | bytes = "") -> None:
        if isinstance(message, bytes):
            message = message.decode("utf-8", "replace")
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class AnalysisFailed(_MessageError):
    """The analysis raised (or could not be loaded); the message says why."""


class TransientFailure(_MessageError):
    """The job could not run for a reason that should pass (the SPS down, a full disk):
    the daemon defers the job and spends no attempt.

    ``sps``: the SPS failed (its health view hears of it), not the worker's disk;
    ``retry_after``: the SPS's ``Retry-After`` in seconds.  Both ride in the text as a
    ``[transient sps retry-after=N] `` header, since an AMP error carries only a
    description.
    """

    _HEAD = "[transient"

    def __init__(
        self, message: str | bytes = "", retry_after: float | None = None, sps: bool = True
    ) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.sps = sps
        if self.message.startswith(self._HEAD + " ") and "] " in self.message:
            # As received over AMP (bytes or text, by Twisted version): read the header.
            head, _, rest = self.message.partition("] ")
            words = head[len(self._HEAD) :].split()
            self.sps = "sps" in words
            for word in words:
                if word.startswith("retry-after="):
                    try:
                        self.retry_after = float(word.partition("=")[2])
                    except ValueError:
                        pass
            self.message = rest

    def __str__(self) -> str:
        words = [self._HEAD, *(["sps"] if self.sps else ["local"])]
        if self.retry_after is not None:
            words.append(f"retry-after={self.retry_after:g}")
        return " ".join(words) + "] " + self.message


class JobCancelled(_MessageError):
    """The analysis stopped because the job was cancelled."""


class WorkerBusy(_MessageError):
    """The worker is already running a job (a daemon bug if it ever happens)."""


# --- daemon → worker ------------------------------------------------------------------
# The daemon calls these; the worker (:class:`~.child.WorkerProtocol`) answers.


class Hello(Command):
    """First call after spawning: the worker's pid, and whether its analysis loaded.

    ``load_error`` is empty when the analysis was imported; otherwise it is the
    clear, one-line reason, and every ``RunJob`` will fail with it.
    """

    response = [
        (b"pid", Integer()),
        (b"analysis", Unicode()),
        (b"load_error", Unicode()),
    ]
    errors: ClassVar[dict[type[Exception], bytes]] = {}  # none: it cannot fail


class RunJob(Command):
    """Run the analysis for ``job_id``, whose ``job.json`` is in ``work_dir``.

    Fails with ``AnalysisFailed`` (permanent: an attempt is spent) or
    ``TransientFailure`` (fetching the slide hit an outage or a full disk: the job
    is deferred; :func:`~.faults.classify` decides which).

    Answers once the analysis returned, with the path of ``result.json`` (in
    ``work_dir``) and, when the analysis gave a quality-control verdict, that
    ``quality_control`` status and the ``qc_version`` (the ``versionId`` of the slide's
    QC state in its metadata, to send with it; absent when unknown).  One job at a time
    per worker.
    """

    arguments = [(b"job_id", Unicode()), (b"work_dir", Unicode())]
    response = [
        (b"result_path", Unicode()),
        (b"quality_control", Unicode(optional=True)),
        (b"qc_version", Unicode(optional=True)),
    ]
    errors = {
        AnalysisFailed: b"ANALYSIS_FAILED",
        TransientFailure: b"TRANSIENT_FAILURE",
        JobCancelled: b"JOB_CANCELLED",
        WorkerBusy: b"WORKER_BUSY",
    }


class CancelJob(Command):
    """Ask the running analysis of ``job_id`` to stop; ``running`` says if it was running.

    Sent the moment the daemon learns of the cancellation (its own front door pushes
    it; another process's is seen by polling the spool's marker).
    """

    arguments = [(b"job_id", Unicode())]
    response = [(b"running", Boolean())]
    errors: ClassVar[dict[type[Exception], bytes]] = {}  # none: it cannot fail


class NewCallback(Command):
    """A newer request for the slide of ``job_id`` brought this callback (``url`` and
    ``token``): the job's SPS calls use it from now on; ``running`` says if the job was
    running.  (A token is a short text, well under AMP's 64 KiB value limit.)
    """

    arguments = [(b"job_id", Unicode()), (b"url", Unicode()), (b"token", Unicode())]
    response = [(b"running", Boolean())]
    errors: ClassVar[dict[type[Exception], bytes]] = {}  # none: it cannot fail


class Ping(Command):
    """Heartbeat: the worker's reactor is alive and answering (no arguments, no answer
    fields: an empty answer is the heartbeat)."""

    errors: ClassVar[dict[type[Exception], bytes]] = {}  # none: it cannot fail


# --- worker → daemon ------------------------------------------------------------------
# The worker calls these; the daemon (:class:`~.pool.DaemonAMP`) answers.


class Progress(Command):
    """The analysis of ``job_id`` reports ``percent`` (0–100) done and a short ``text``."""

    arguments = [(b"job_id", Unicode()), (b"percent", Integer()), (b"text", Unicode())]
    errors: ClassVar[dict[type[Exception], bytes]] = {}  # none: it cannot fail


class StepDone(Command):
    """A step of ``job_id``'s attempt is over: ``step`` (``metadata``, ``thumbnail``,
    ``label``, ``download``, ``analysis``) took ``seconds``, and fetched ``size`` bytes
    (the WSI files, for ``download``).  ``requests`` is the JSON object of the SPS calls
    the worker made since its last report, ``{"GET slides/{id}/info 2xx": 3, ...}``
    (endpoint templates and status classes: a bounded set, never an id or a URL).
    For the daemon's metrics (:mod:`dpatia_daemon.ops.metrics`)."""

    arguments = [
        (b"job_id", Unicode()),
        (b"step", Unicode()),
        (b"seconds", Float()),
        (b"size", Integer()),
        (b"requests", Unicode()),
    ]
    errors: ClassVar[dict[type[Exception], bytes]] = {}  # none: it cannot fail


#: The commands the daemon sends, and those it answers.
DAEMON_TO_WORKER = (Hello, RunJob, CancelJob, NewCallback, Ping)
WORKER_TO_DAEMON = (Progress, StepDone)


__all__ = [
    "DAEMON_TO_WORKER",
    "WORKER_AMP_IN",
    "WORKER_AMP_OUT",
    "WORKER_TO_DAEMON",
    "AnalysisFailed",
    "CancelJob",
    "Hello",
    "JobCancelled",
    "NewCallback",
    "Ping",
    "Progress",
    "RunJob",
    "StepDone",
    "TransientFailure",
    "WorkerBusy",
]
