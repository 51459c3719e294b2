"""Analyses for the limit tests (workers import this as ``tests.workers.analyses_limits``):
the job's context ``{"limits": MODE}`` says what to do.

``greedy``   allocate far beyond any memory limit (8 GiB at once, then more);
``sigkill``  SIGKILL itself, as the kernel's OOM killer would;
otherwise    answer with the thread-count variables it sees.
"""

from __future__ import annotations

import os
import signal

from dpatia_daemon.analyses import AnalysisJob, AnalysisResult
from dpatia_daemon.workers.limits import THREAD_VARS


def analyse(job: AnalysisJob) -> AnalysisResult:
    mode = job.context.get("limits")
    if mode == "greedy":
        hoard = [bytearray(8 << 30)]
        for _ in range(64):  # bounded: without a limit it ends, and the test fails
            hoard.append(bytearray(1 << 30))
        return AnalysisResult(display_result=f"not limited: {len(hoard)} GiB+ allocated")
    if mode == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    return AnalysisResult(
        display_result="threads",
        display_properties={name: os.environ.get(name, "-") for name in THREAD_VARS},
    )
