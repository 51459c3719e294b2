"""An analysis for the live admin tests (``tests.admin.flaky_analysis:run``).

It fails while the file named by ``DPATIA_TEST_FAIL_FLAG`` exists; for a slide whose id
starts with ``hold`` it runs until cancelled.
"""

from __future__ import annotations

import os

from dpatia_daemon.analyses import AnalysisJob, AnalysisResult


def run(job: AnalysisJob) -> AnalysisResult:
    """Fail, hold, or answer at once (see the module docstring)."""
    flag = os.environ.get("DPATIA_TEST_FAIL_FLAG", "")
    if flag and os.path.exists(flag):
        raise ValueError("failing on purpose while the flag file exists")
    if job.slide_id.startswith("hold"):
        job.progress(1, "holding")
        while True:
            job.sleep(0.05)  # raises AnalysisCancelled once cancelled
    return AnalysisResult(display_result="flaky analysis: fine now")
