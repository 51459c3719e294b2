"""Resolve ``[app] analysis`` to a callable, with an error an operator can act on.

The spec is a built-in short name (``demo``, ``tissue``)
or ``package.module:callable``.  Resolution imports code, so it runs in the worker
(never in the daemon): a broken analysis can only break workers.  Every failure is an
:class:`AnalysisLoadError` whose message is one line naming the spec and the problem.
"""

from __future__ import annotations

import importlib
import re
from typing import cast

from . import Analysis

#: Built-in short names and where they live.
BUILTINS: dict[str, str] = {
    "demo": "dpatia_daemon.analyses.demo:run",
    "tissue": "dpatia_daemon.analyses.tissue:analyse",
}

#: Short names that are reserved but not implemented yet, with the message to show.

_SPEC = re.compile(r"([A-Za-z_][\w.]*):([A-Za-z_]\w*)\Z")


class AnalysisLoadError(Exception):
    """The analysis named by the spec cannot be used; the message says why, in one line."""


def load_analysis(spec: str) -> Analysis:
    """Import and return the analysis callable named by ``spec``."""
    target = BUILTINS.get(spec, spec)
    match = _SPEC.match(target)
    if match is None:
        names = ", ".join(sorted(BUILTINS))
        raise AnalysisLoadError(
            f"unknown analysis {spec!r}: use a built-in name ({names}) or package.module:callable"
        )
    module_name, attribute = match.groups()
    try:
        module = importlib.import_module(module_name)
    except (Exception, SystemExit) as e:
        # An analysis module that raises (or calls sys.exit) while importing is a
        # broken analysis, not a reason to lose the worker's explanation.
        raise AnalysisLoadError(
            f"analysis {spec!r}: cannot import {module_name} ({type(e).__name__}: {e})"
        ) from None
    try:
        analysis = getattr(module, attribute)
    except AttributeError:
        raise AnalysisLoadError(
            f"analysis {spec!r}: module {module_name} has no attribute {attribute!r}"
        ) from None
    if not callable(analysis):
        raise AnalysisLoadError(f"analysis {spec!r}: {module_name}.{attribute} is not callable")
    return cast(Analysis, analysis)


__all__ = ["BUILTINS", "AnalysisLoadError", "load_analysis"]
