"""Installing an analysis plugin into a scratch folder, as ``pip install`` would.

A folder on ``sys.path`` (or a worker's PYTHONPATH) holding a ``*.dist-info`` with an
``entry_points.txt`` is an installed distribution as far as ``importlib.metadata`` is
concerned: no pip, no network, no build.
"""

from __future__ import annotations

from pathlib import Path

#: A vendor's analysis module: it reports what its process sees.
VENDOR_MODULE = '''
import os
import sys

from dpatia_daemon.analyses import AnalysisJob, AnalysisResult, item, rectangle


def analyse(job: AnalysisJob) -> AnalysisResult:
    job.progress(50, "vendor model running")
    return AnalysisResult(
        display_result="vendor model answer",
        display_properties={
            "Executable": sys.executable,
            "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "-"),
            "Marker": os.environ.get("VENDOR_MARKER", "-"),
            "Slot": os.environ.get("DPATIA_WORKER_SLOT", "-"),
        },
        items=[item(polygons=[rectangle(0.1, 0.1, 0.2, 0.2)])],
    )
'''


def install_plugin(
    site: Path,
    name: str,
    target: str,
    *,
    distribution: str = "vendor-model",
    version: str = "1.0",
    module: tuple[str, str] | None = None,
) -> Path:
    """Declare entry point ``name = target`` in group ``dpatia.analyses`` for a
    distribution in ``site``; with ``module`` (file name, source) write that module
    there too.  Returns ``site``."""
    info = site / f"{distribution.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {distribution}\nVersion: {version}\n"
    )
    (info / "entry_points.txt").write_text(f"[dpatia.analyses]\n{name} = {target}\n")
    if module is not None:
        (site / module[0]).write_text(module[1])
    return site
