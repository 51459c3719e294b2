"""A separate process that claims spool jobs, for the multi-process tests in test_spool.py.

It uses :class:`~dpatia_daemon.spool.SpoolStore` directly (no reactor), as a daemon on
another machine would use the shared directory.  Every line it prints is flushed, so
the test can wait for it.

Usage::

    spool_claimer.py DIR hold JOB_ID
        Claim JOB_ID, print "claimed JOB_ID" (or "refused JOB_ID"), then hold it until
        standard input is closed (or the test kills this process).
    spool_claimer.py DIR race
        Print "ready", wait for a line on standard input, then claim every queued job
        it can, printing "claimed JOB_ID" for each, and "done" when the queue is empty.
        The claims are never finished: they are dropped when the process exits.
"""

from __future__ import annotations

import sys

from twisted.python.filepath import FilePath

from dpatia_daemon.spool import SpoolStore


def main(argv: list[str]) -> int:
    """Run the mode named in ``argv``; return the exit status."""
    directory, mode, *rest = argv
    store = SpoolStore(FilePath(directory), owner=f"claimer:{mode}")
    store.open()
    if mode == "hold":
        [job_id] = rest
        job = store.claim(job_id)
        print(f"{'claimed' if job is not None else 'refused'} {job_id}", flush=True)
        sys.stdin.read()  # hold until the test closes our stdin
        return 0
    if mode == "race":
        print("ready", flush=True)
        sys.stdin.readline()
        while jobs := store.queued():
            for job in jobs:
                if store.claim(job.job_id) is not None:
                    print(f"claimed {job.job_id}", flush=True)
        print("done", flush=True)
        return 0
    print(f"unknown mode {mode!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
