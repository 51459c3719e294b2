"""Analyses that misbehave on request, for the supervisor and worker tests.

Workers import this as ``tests.analyses_for_tests`` (the supervisor puts the checkout
first on a worker's PYTHONPATH, and ``tests`` is a namespace package there).  The job's
context tells :func:`run` what to do: ``{"test": {...}}`` with any of

``seconds``        run this long (cancellable), after reporting progress "started";
``progress_every`` report progress every this many seconds while running;
``crash``          ``"exit"`` (os._exit(3)) or ``"kill"`` (SIGKILL itself) after "started";
``crash_attempts`` crash only on the first N attempts (counted in the work folder);
``fail``           raise ValueError with this message;
``qc``             return this quality-control verdict with the result;
``hang``           ignore cancellation and never return (``"sleep"``), or stop the whole
                   process (``"stop"``: SIGSTOP, so it stops answering heartbeats);
``garbage``        print huge lines, binary and many lines on stdout and stderr;
``record``         append ``"<job_id>\\n"`` to this file when the analysis completes.

Environment knobs for import-time failures: ``DPATIA_TEST_RAISE_AT_IMPORT=1`` raises,
``DPATIA_TEST_EXIT_AT_IMPORT=1`` exits the process (a worker that cannot even start).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from dpatia_daemon.analyses import AnalysisJob, AnalysisResult, item, label, rectangle

if os.environ.get("DPATIA_TEST_RAISE_AT_IMPORT"):
    raise RuntimeError("this analysis module is broken on purpose")
if os.environ.get("DPATIA_TEST_EXIT_AT_IMPORT"):
    os._exit(7)


def _attempt(job: AnalysisJob) -> int:
    """Count this attempt in the work folder (which survives retries of the same job)."""
    counter = Path(job.work_dir) / "attempts"
    n = int(counter.read_text()) + 1 if counter.exists() else 1
    counter.write_text(str(n))
    return n


def _garbage() -> None:
    sys.stdout.write("x" * 100_000 + "\n")
    sys.stdout.flush()
    sys.stdout.buffer.write(b"\x00\xff\xfe binary \x1b[31m red \x07\n")
    sys.stdout.flush()
    for n in range(2000):
        sys.stderr.write(f"noise line {n}\n")
    sys.stderr.write("no newline at the end " * 1000)
    sys.stderr.flush()


def run(job: AnalysisJob) -> AnalysisResult:
    """Do what ``job.context["test"]`` says, then answer like a tiny demo."""
    spec: dict[str, Any] = dict(job.context.get("test") or {})
    attempt = _attempt(job)
    job.progress(1, "started")
    if spec.get("garbage"):
        _garbage()
    crash = spec.get("crash")
    if crash and attempt <= int(spec.get("crash_attempts", 1_000_000)):
        sys.stdout.flush()
        if crash == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        os._exit(3)
    if spec.get("fail"):
        raise ValueError(str(spec["fail"]))
    hang = spec.get("hang")
    if hang == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
    elif hang:
        while True:
            time.sleep(0.05)
    seconds = float(spec.get("seconds", 0))
    every = float(spec.get("progress_every", 0))
    deadline = time.monotonic() + seconds
    step = 0
    while (left := deadline - time.monotonic()) > 0:
        job.sleep(min(left, every) if every else left)
        step += 1
        if every:
            job.progress(min(99, 1 + step), f"step {step}")
    if spec.get("record"):
        with open(spec["record"], "a") as f:
            f.write(job.job_id + "\n")
    return AnalysisResult(
        display_result="test answer",
        display_properties={"Attempt": attempt, "Pid": os.getpid()},
        items=[item(polygons=[rectangle(0.1, 0.1, 0.2, 0.2)], labels=[label(0.1, 0.1, "T")])],
        quality_control=spec.get("qc"),
    )


def noop(job: AnalysisJob) -> AnalysisResult:
    """Nothing at all, as fast as possible: reports when it started (wall clock)."""
    return AnalysisResult(display_result="noop", display_properties={"Started": time.time()})
