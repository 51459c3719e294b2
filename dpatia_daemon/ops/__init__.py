"""What the operators see of the daemon: systemd readiness, status and watchdog
(:mod:`.systemd`), and the log lines on stdout (:mod:`.logs`).

These parts read the others (the spool's counts, the workers' snapshot) and change
nothing; :func:`dpatia_daemon.service.build_service` wires them, ``tap.py`` hands them
what only the process knows (its environment, its stdout).
"""
