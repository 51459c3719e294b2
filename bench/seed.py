"""The seed, run beside dpatia by the benchmarks: Sectra's ``ia_wholeslide`` example
(a Flask webserver; its worker only polls the files the webserver writes, and a
notification's or create's "queued" frame is stored *inside* the request) under
``gunicorn -w 4``, as issue 15 compares with.

Its code is not part of this repository (its licence is not ours): the user names a
checkout of github.com/sectra-medical/dpat_imageanalysisapi_sdk, or of its
``examples/python/ia_wholeslide`` folder, with ``--seed PATH`` or ``$DPATIA_SEED``.
The example runs in its own venv (``~/.cache/dpatia/seed-venv``, built once with the
base Python's ``-m venv`` from the pins in ``bench/seed-requirements.txt`` and rebuilt
when they change), with ``PYTHONPATH=<ia_wholeslide>/src``, in a temporary working
directory (it writes ``./data/``) on the disk the caller chooses.

:class:`Seed` starts it on a free loopback port, waits (bounded) until ``GET /``
answers and all four workers are up, lists its processes for CPU accounting and stops
it (SIGTERM, then SIGKILL).  ``python bench/seed.py --seed PATH`` prepares the venv,
starts the seed, prints its URL and processes, and stops it: a check of the set-up.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REQUIREMENTS = HERE / "seed-requirements.txt"
#: The example's IA-API route (create, modify, ...) and its image notification route.
ROUTE = "/dpat_ia_app_demo/wholeslide"
NOTIFICATION_ROUTE = ROUTE + "/imagenotification"
WORKERS = 4


def add_argument(parser: argparse.ArgumentParser) -> None:
    """The benchmarks' ``--seed`` option (default ``$DPATIA_SEED``)."""
    parser.add_argument(
        "--seed",
        default=os.environ.get("DPATIA_SEED") or None,
        help="a checkout of sectra-medical/dpat_imageanalysisapi_sdk (or of its "
        "examples/python/ia_wholeslide folder): measure the seed beside dpatia in the "
        "same run (default: $DPATIA_SEED; without either, the issue's quoted figures)",
    )


def example_dir(path: str | Path) -> Path:
    """The ``ia_wholeslide`` folder in ``path`` (the SDK checkout or the folder itself)."""
    root = Path(path).expanduser().resolve()
    for candidate in (root, root / "examples" / "python" / "ia_wholeslide"):
        if (candidate / "src" / "dpat_wholeslide" / "webserver.py").is_file():
            return candidate
    raise SystemExit(
        f"--seed {path}: no src/dpat_wholeslide/webserver.py there nor under "
        "examples/python/ia_wholeslide (give a checkout of "
        "github.com/sectra-medical/dpat_imageanalysisapi_sdk)"
    )


def default_venv() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "dpatia" / "seed-venv"


def base_python() -> str:
    """The interpreter dpatia's venv was made from (not the venv: the seed must not see
    dpatia's packages)."""
    for name in ("python3", "python"):
        candidate = Path(sys.base_prefix) / "bin" / name
        if candidate.is_file():
            return str(candidate)
    found = shutil.which("python3")
    if found is None:
        raise SystemExit("no python3 to build the seed's venv with")
    return found


def ensure_venv(venv: Path | None = None) -> Path:
    """The seed's venv, built (or rebuilt, when the pins changed) if need be."""
    venv = venv or default_venv()
    python = base_python()
    stamp_text = hashlib.sha256(REQUIREMENTS.read_bytes() + python.encode()).hexdigest()
    stamp = venv / ".dpatia-seed-stamp"
    gunicorn = venv / "bin" / "gunicorn"
    if stamp.is_file() and stamp.read_text() == stamp_text and gunicorn.is_file():
        return venv
    print(f"building the seed's venv in {venv} ...", file=sys.stderr, flush=True)
    shutil.rmtree(venv, ignore_errors=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([python, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, "--disable-pip-version-check", "-r", str(REQUIREMENTS)], check=True)
    stamp.write_text(stamp_text)
    return venv


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (a scan of /proc: this kernel may lack
    ``/proc/PID/task/PID/children``)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(entry))
    return sorted(found)


class Seed:
    """One gunicorn running the example: ``start()``, ``url``, ``pids()``, ``stop()``."""

    def __init__(self, path: str | Path, workdir: Path | None = None) -> None:
        self.example = example_dir(path)
        self.venv = ensure_venv()
        self.cwd = Path(tempfile.mkdtemp(prefix="dpatia-seed-", dir=workdir))
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self._pids: list[int] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> None:
        """Start gunicorn and return once ``GET /`` answers and its workers are up."""
        self.port = free_port()
        env = {**os.environ, "PYTHONPATH": str(self.example / "src")}
        env.pop("VIRTUAL_ENV", None)
        argv = [str(self.venv / "bin" / "gunicorn"), "-w", str(WORKERS)]
        argv += ["-b", f"127.0.0.1:{self.port}", "--no-control-socket"]
        argv += ["--graceful-timeout", "5", "dpat_wholeslide.webserver:app"]
        log = open(self.cwd / "gunicorn.log", "wb")  # noqa: SIM115 (closed with the process)
        self.process = subprocess.Popen(argv, cwd=self.cwd, env=env, stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the seed's gunicorn exited:\n{self.log()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the seed did not answer within {timeout:g} s:\n{self.log()}")
            if self._answers() and len(children(self.process.pid)) >= WORKERS:
                break
            time.sleep(0.1)
        self._pids = [self.process.pid, *children(self.process.pid)]

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/", timeout=2) as answer:
                return bool(answer.status == 200)
        except OSError:
            return False

    def pids(self) -> list[int]:
        """The master and its workers now (the benchmarks sum their CPU times)."""
        if self.process is None:
            return []
        return [self.process.pid, *children(self.process.pid)]

    def log(self) -> str:
        try:
            return (self.cwd / "gunicorn.log").read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the master; SIGKILL it and any worker left after ``timeout``."""
        if self.process is not None and self.process.poll() is None:
            known = set(self._pids) | set(self.pids())
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
            # A master that stops normally has reaped its workers; one killed may leave
            # some behind (only ours: still running this venv's gunicorn).
            for pid in known - {self.process.pid}:
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        ours = str(self.venv).encode() in f.read()
                    if ours:
                        os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        shutil.rmtree(self.cwd, ignore_errors=True)

    def __enter__(self) -> Seed:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description="prepare and smoke-run the seed")
    add_argument(parser)
    args = parser.parse_args()
    if not args.seed:
        parser.error("--seed PATH (or $DPATIA_SEED) is required")
    with Seed(args.seed) as seed:
        with urllib.request.urlopen(seed.url + "/", timeout=5) as answer:
            print(f"seed at {seed.url} (pids {seed.pids()}): {answer.read().decode()}")


if __name__ == "__main__":
    main()
