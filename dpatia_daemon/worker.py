"""``python -m dpatia_daemon.worker``: the documented name of the worker process, kept
working; the worker itself is :mod:`dpatia_daemon.workers.child`."""

from __future__ import annotations

from .workers.child import main

if __name__ == "__main__":
    main()
