"""An extra front-door process: ``python -m dpatia_daemon.frontdoor.child --nodaemon
--pidfile= dpatia ... --front-door N``.

It is ``twistd`` under a module name of its own, so that ``ps`` shows what the process
is and no bootstrap code travels as a ``python -c`` string.  :class:`~.processes.FrontDoors`
in the main process starts it; the ``--front-door`` option makes the service tree a
copy's (see :func:`dpatia_daemon.service.build_service`).
"""

from __future__ import annotations


def main() -> None:
    """Run twistd with this process's command line."""
    from twisted.scripts.twistd import run

    run()


if __name__ == "__main__":
    main()
