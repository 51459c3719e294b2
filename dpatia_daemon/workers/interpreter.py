"""The workers' own interpreter (``[workers] python``): checked once, at start.

An analysis with heavy dependencies (PyTorch, TensorFlow, a pinned numpy) lives in a
virtualenv of its own, with dpatia installed there too for the worker side; the daemon
runs its workers with that interpreter, so none of the model's packages touch the
daemon's.  Before anything starts, :func:`check_workers_python` runs that interpreter
once as a worker would (same environment, slot 1's GPUs) but with ``--check``: the
worker loads the analysis, prints one JSON line and exits
(:func:`dpatia_daemon.workers.child.check`).  Whatever goes wrong — the file cannot be
run, dpatia is missing there or is another version (the AMP commands must match), the
analysis name is unknown there or its module does not import — is a one-line
:class:`~dpatia_daemon.config.ConfigError` and the daemon does not start.

This is a blocking call made while the service tree is built (like reading the TLS
files), before the reactor runs; nothing else runs then that it could hold up.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Mapping
from typing import Any

from .._version import __version__
from ..config import Config, ConfigError
from ..sps.tokens import without_credentials
from .pool import slot_environ, worker_argv, workers_environ

#: Seconds the interpreter gets to load the analysis (a model may load its weights).
CHECK_TIMEOUT = 120.0


class WorkerPythonError(Exception):
    """The workers' interpreter cannot run the worker; the message says why, in one line."""


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def probe(
    python: str, analysis: str, env: Mapping[str, str], timeout: float = CHECK_TIMEOUT
) -> dict[str, Any]:
    """Run ``python`` as a worker with ``--check`` and return what it printed.

    Raises :class:`WorkerPythonError` when it cannot be run, fails, or does not answer.
    """
    argv = [*worker_argv(python, analysis, {}, None), "--check"]
    install = f"install dpatia {__version__} there: {python} -m pip install 'dpatia=={__version__}'"
    try:
        done = subprocess.run(
            argv,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise WorkerPythonError(
            f"{python} did not load the analysis within {timeout:g} s"
        ) from None
    except OSError as e:
        raise WorkerPythonError(f"cannot run {python}: {e.strerror or e}") from None
    try:
        answer = json.loads(_last_line(done.stdout))
        if not isinstance(answer, dict) or "version" not in answer:
            raise ValueError("not the worker's answer")
    except ValueError:
        why = _last_line(done.stderr) or f"exit code {done.returncode}, no answer"
        raise WorkerPythonError(
            f"{python} cannot run the dpatia worker ({why}); {install}"
        ) from None
    if answer["version"] != __version__:
        raise WorkerPythonError(
            f"{python} has dpatia {answer['version']}, the daemon runs {__version__} "
            f"(their worker commands must match); {install}"
        )
    return answer


def check_workers_python(config: Config, env: Mapping[str, str] | None = None) -> None:
    """With ``[workers] python`` and workers to run here: the interpreter runs the worker
    and loads ``[app] analysis``, or a :class:`ConfigError` says why.

    ``env`` is the daemon's environment the workers' is made from (default: ours).
    """
    python = config.workers.python
    if python is None or not config.workers.count:
        return
    environ = slot_environ(workers_environ(config.workers, env), config.workers, 1)
    without_credentials(environ)
    try:
        answer = probe(python, config.app.analysis, environ)
    except WorkerPythonError as e:
        raise ConfigError(config.source, "workers", "python", str(e)) from None
    if answer.get("error"):
        raise ConfigError(
            config.source, "app", "analysis", f"{answer['error']} (in the workers' {python})"
        )


__all__ = ["CHECK_TIMEOUT", "WorkerPythonError", "check_workers_python", "probe"]
