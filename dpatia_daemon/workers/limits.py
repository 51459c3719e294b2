"""Limits per analysis: ``[workers] memory_limit`` and ``[workers] cpu_threads``, and
the failure reasons a worker that ran out of memory gets.

So that a model cannot starve the daemon (or the other workers) of memory or CPU:

- ``memory_limit`` travels to each worker in :data:`MEMORY_LIMIT_ENV`, and the worker
  sets ``RLIMIT_AS`` to it first thing at its start (:func:`apply_memory_limit`),
  before the analysis is imported: an allocation past it raises ``MemoryError`` in the
  analysis, and the job fails with ``out of memory (memory_limit 4G)``.  ``RLIMIT_AS``
  bounds the address space, not resident memory (thread stacks and malloc arenas
  count), so set it generously.  A worker killed with SIGKILL while a limit is set
  (the kernel's OOM killer, or a cgroup's ``memory.max`` around the service) fails
  its job with ``out of memory?`` and the signal, not a bare signal number.
- ``cpu_threads`` sets the thread counts of the common numeric libraries
  (:data:`THREAD_VARS`) in the workers' environment, unless ``[workers] environment``
  sets them itself (the admin's word wins).
- ``MALLOC_ARENA_MAX`` is :data:`MALLOC_ARENAS` unless already set, so that a
  worker's memory stays flat from job to job.
"""

from __future__ import annotations

import os
import resource
import signal
from collections.abc import Mapping, MutableMapping
from typing import TYPE_CHECKING

from twisted.internet import error as ierror
from twisted.python.failure import Failure

if TYPE_CHECKING:  # the worker imports this module: keep it light
    from ..config import WorkersConfig

#: The variable that carries ``[workers] memory_limit`` (bytes) to a worker.
MEMORY_LIMIT_ENV = "DPATIA_MEMORY_LIMIT"

#: The thread-count variables ``[workers] cpu_threads`` sets: OpenMP, MKL, OpenBLAS,
#: numexpr (PyTorch and most numpy builds follow one of them).
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")

#: glibc's malloc arenas per worker, unless the daemon's environment or ``[workers]
#: environment`` sets ``MALLOC_ARENA_MAX``.  glibc's default (8 per core) gives each
#: new thread (every job's analysis thread, its tile threads, the download's) an
#: arena of its own, and each keeps what it freed: a worker's RSS climbed job after
#: job.  Two keep it flat and made the streamed download no slower than a raw copy.
MALLOC_ARENAS = "2"


def format_size(size: int) -> str:
    """``4G``, ``512M``, ``1536K``: the shortest exact binary-unit spelling of ``size``."""
    for unit, factor in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


def limits_environ(config: WorkersConfig, env: MutableMapping[str, str]) -> None:
    """Put the limits of ``config`` into a worker's environment ``env`` (in place)."""
    env.pop(MEMORY_LIMIT_ENV, None)
    if config.memory_limit is not None:
        env[MEMORY_LIMIT_ENV] = str(config.memory_limit)
    if config.cpu_threads:
        admin = {name for name, _ in config.environment}
        for name in THREAD_VARS:
            if name not in admin:
                env[name] = str(config.cpu_threads)
    env.setdefault("MALLOC_ARENA_MAX", MALLOC_ARENAS)


def apply_memory_limit(environ: Mapping[str, str] = os.environ) -> int | None:
    """In the worker, at its start: set ``RLIMIT_AS`` to :data:`MEMORY_LIMIT_ENV`'s
    bytes (never above a hard limit already lower); return the limit set, or None."""
    text = environ.get(MEMORY_LIMIT_ENV)
    if not text:
        return None
    limit = int(text)
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY and hard < limit:
        limit = hard
    resource.setrlimit(
        resource.RLIMIT_AS, (limit, hard if hard != resource.RLIM_INFINITY else limit)
    )
    return limit


def out_of_memory(environ: Mapping[str, str] = os.environ) -> str:
    """The failure reason of an analysis that raised ``MemoryError``."""
    text = environ.get(MEMORY_LIMIT_ENV)
    if text:
        return f"out of memory (memory_limit {format_size(int(text))})"
    return "out of memory (MemoryError)"


def died(exit: Failure | None, how: str, memory_limit: int | None) -> str:
    """The failure reason of a job whose worker died during the analysis; ``how`` is
    the exit as :func:`~.pool.describe_exit` says it.  A SIGKILL nobody in the daemon
    sent, with a memory limit set, is most likely the OOM killer or a cgroup."""
    value = exit.value if exit is not None else None
    killed = isinstance(value, ierror.ProcessTerminated) and value.signal == signal.SIGKILL
    if killed and memory_limit is not None:
        return (
            f"out of memory? the worker process was killed (SIGKILL) while running the "
            f"analysis, with memory_limit {format_size(memory_limit)}: the kernel's OOM "
            "killer or a cgroup memory limit"
        )
    return f"the worker process died while running the analysis ({how})"


__all__ = [
    "MEMORY_LIMIT_ENV",
    "THREAD_VARS",
    "apply_memory_limit",
    "died",
    "format_size",
    "limits_environ",
    "out_of_memory",
]
