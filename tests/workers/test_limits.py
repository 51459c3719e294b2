"""Limits per analysis: ``[workers] memory_limit`` (RLIMIT_AS in the worker) and
``[workers] cpu_threads`` (the numeric libraries' thread counts), and the readable
failure reasons of a worker out of memory.

The end-to-end test runs a real daemon (``twistd dpatia``) whose real workers run the
analyses of :mod:`analyses_limits` against the loopback fake SPS.
"""

from __future__ import annotations

import json
import resource
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from conftest import write_config
from twisted.internet import defer
from twisted.internet.error import ProcessTerminated
from twisted.python.failure import Failure

from dpatia_daemon.config import ConfigError, WorkersConfig, load_config
from dpatia_daemon.models import Result
from dpatia_daemon.simulator.daemon_process import DaemonProcess
from dpatia_daemon.sps.results import Status, frame_status
from dpatia_daemon.workers.limits import (
    MALLOC_ARENAS,
    MEMORY_LIMIT_ENV,
    THREAD_VARS,
    died,
    format_size,
    out_of_memory,
)
from dpatia_daemon.workers.pool import workers_environ

G = 1 << 30


def workers(tmp_path: Path, **keys: Any) -> WorkersConfig:
    return load_config(write_config(tmp_path, {"workers": keys})).workers


@pytest.mark.parametrize(
    ("text", "size"),
    [("4G", 4 * G), ("512M", 512 << 20), ("2GiB", 2 * G), ("1073741824", G), ("", None), ("0", None)],
)
def test_memory_limit_is_read_as_a_size(tmp_path: Path, text: str, size: int | None) -> None:
    """``memory_limit`` takes K/M/G/T (binary) or bytes; blank or 0 is no limit."""
    assert workers(tmp_path, memory_limit=text).memory_limit == size


@pytest.mark.parametrize(
    ("text", "problem"),
    [("lots", "is not a size such as 4G"), ("1M", "must be at least"), ("4X", "is not a size")],
)
def test_a_bad_memory_limit_is_one_clear_line(tmp_path: Path, text: str, problem: str) -> None:
    """Nonsense, and a limit too small for Python to even start, stop the start."""
    with pytest.raises(ConfigError, match=r"\[workers\] memory_limit: .*" + problem):
        workers(tmp_path, memory_limit=text)


def test_cpu_threads_set_the_libraries_thread_counts_unless_the_admin_did(
    tmp_path: Path,
) -> None:
    """cpu_threads sets every thread variable in the workers' environment, over the
    daemon's own, but not over one ``[workers] environment`` sets; the memory limit
    travels in its variable."""
    config = workers(
        tmp_path, cpu_threads=3, memory_limit="4G", environment="OMP_NUM_THREADS=1"
    )
    env = workers_environ(config, {"MKL_NUM_THREADS": "16", MEMORY_LIMIT_ENV: "1"})
    assert {name: env[name] for name in THREAD_VARS} == {
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "3",
        "OPENBLAS_NUM_THREADS": "3",
        "NUMEXPR_NUM_THREADS": "3",
    }
    assert env[MEMORY_LIMIT_ENV] == str(4 * G)
    plain = workers_environ(workers(tmp_path), {"MKL_NUM_THREADS": "16", MEMORY_LIMIT_ENV: "1"})
    assert plain["MKL_NUM_THREADS"] == "16" and MEMORY_LIMIT_ENV not in plain


def test_workers_get_few_malloc_arenas_unless_the_daemon_or_the_admin_says() -> None:
    """MALLOC_ARENA_MAX defaults to two arenas per worker (glibc's own default let a
    worker's RSS climb job after job); the daemon's environment, or ``[workers]
    environment`` over it, keeps its own value."""
    assert MALLOC_ARENAS == "2"
    assert workers_environ(WorkersConfig(), {})["MALLOC_ARENA_MAX"] == "2"
    assert workers_environ(WorkersConfig(), {"MALLOC_ARENA_MAX": "8"})["MALLOC_ARENA_MAX"] == "8"
    admin = WorkersConfig(environment=(("MALLOC_ARENA_MAX", "4"),))
    assert workers_environ(admin, {"MALLOC_ARENA_MAX": "8"})["MALLOC_ARENA_MAX"] == "4"


def test_the_reasons_of_a_worker_out_of_memory() -> None:
    """MemoryError names the limit; a SIGKILL with a limit set says "out of memory?";
    any other death (or a SIGKILL without a limit) keeps the plain exit."""
    assert out_of_memory({MEMORY_LIMIT_ENV: str(4 * G)}) == "out of memory (memory_limit 4G)"
    assert out_of_memory({}) == "out of memory (MemoryError)"
    killed = Failure(ProcessTerminated(signal=signal.SIGKILL))
    assert died(killed, "signal 9", 4 * G).startswith(
        "out of memory? the worker process was killed (SIGKILL)"
    )
    assert "memory_limit 4G" in died(killed, "signal 9", 4 * G)
    assert died(killed, "signal 9", None) == (
        "the worker process died while running the analysis (signal 9)"
    )
    crashed = Failure(ProcessTerminated(exitCode=3))
    assert died(crashed, "exit code 3", G).endswith("(exit code 3)")
    assert [format_size(n) for n in (G, 1536 << 10, 1000)] == ["1G", "1536K", "1000"]


def test_the_worker_sets_rlimit_as_from_its_environment() -> None:
    """apply_memory_limit, in a process of its own: RLIMIT_AS is the limit after it."""
    code = (
        "import resource; from dpatia_daemon.workers.limits import apply_memory_limit; "
        "print(apply_memory_limit(), resource.getrlimit(resource.RLIMIT_AS)[0])"
    )
    env = {MEMORY_LIMIT_ENV: str(G), "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == [str(G), str(G)]
    assert resource.getrlimit(resource.RLIMIT_AS)[0] != G  # this process is untouched


# --- end to end -------------------------------------------------------------------------


def notification(sps: Any, slide_id: str, mode: str) -> dict[str, Any]:
    return {
        "action": "newImageFiles",
        "applicationId": "dpatia",
        "slideId": slide_id,
        "callbackInfo": {"url": sps.url, "token": sps.token},
        "cancellationToken": f"ct-{slide_id}",
        "context": {"limits": mode},
        "imageInfo": {"imageSize": {"width": 1000, "height": 500}},
    }


async def final(reactor: Any, sps: Any, slide: str, timeout: float = 60) -> Result:
    def is_final(result: Result) -> bool:
        return result.slideId == slide and frame_status(result) in (Status.DONE, Status.FAILED)

    for result in sps.fake.results_for(slide, "dpatia"):
        if is_final(result):
            return result
    stored: Result = await sps.fake.next_stored(is_final).addTimeout(timeout, reactor)
    return stored


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_a_memory_limited_worker_fails_a_greedy_analysis_readably(
    reactor: Any, sps: Any, tmp_path: Path
) -> None:
    """With memory_limit 1G: a greedy analysis fails its job with "out of memory
    (memory_limit 1G)", one killed by SIGKILL with "out of memory?", and an analysis
    that behaves sees cpu_threads in its environment and succeeds."""
    config = write_config(
        tmp_path,
        {
            "app": {"analysis": "tests.workers.analyses_limits:analyse"},
            "pipeline": {"download_wsi": "false"},
            "workers": {
                "count": 2,
                "memory_limit": "1G",
                "cpu_threads": 2,
                "max_attempts": 1,
                "min_backoff": 0.5,
            },
        },
    )
    slides = {"slide-greedy": "greedy", "slide-killed": "sigkill", "slide-threads": "threads"}
    for slide in slides:
        sps.fake.add_slide(slide, width=2000, height=1000)
    daemon = DaemonProcess(reactor=reactor, config=config, cwd=str(tmp_path))
    await daemon.start(timeout=60)
    try:
        for slide, mode in slides.items():
            response = await treq.post(
                daemon.url + "/dpatia/imagenotification",
                json.dumps(notification(sps, slide, mode)).encode(),
                headers={"Content-Type": ["application/json"]},
            )
            assert response.code == 200
            await response.content()
        results = await defer.gatherResults(
            [defer.ensureDeferred(final(reactor, sps, slide)) for slide in slides]
        )
    finally:
        await daemon.kill(signal.SIGTERM)
    greedy, killed, threads = results
    assert frame_status(greedy) is Status.FAILED
    assert "out of memory (memory_limit 1G)" in json.dumps(greedy.displayProperties)
    assert frame_status(killed) is Status.FAILED
    assert "out of memory?" in json.dumps(killed.displayProperties)
    assert frame_status(threads) is Status.DONE
    assert {name: threads.displayProperties[name] for name in THREAD_VARS} == dict.fromkeys(
        THREAD_VARS, "2"
    )
    failed = {
        json.loads(p.read_text())["slide_id"]: json.loads(p.read_text())
        for p in (tmp_path / "spool" / "failed").glob("*.json")
    }
    assert "out of memory (memory_limit 1G)" in failed["slide-greedy"]["last_error"]
    assert "out of memory?" in failed["slide-killed"]["last_error"]
