"""Resolve ``[app] analysis`` to a callable, with an error an operator can act on.

The spec is one of:

* a built-in short name (``demo``, ``tissue``);
* the name of an installed plugin: a distribution that declares an entry point in the
  ``dpatia.analyses`` group (:data:`ENTRY_POINT_GROUP`), e.g. in its pyproject.toml::

      [project.entry-points."dpatia.analyses"]
      mymodel = "mypackage.analysis:analyse"

  so that ``pip install mypackage`` is all it takes for ``analysis = mymodel``;
* ``package.module:callable``, importable by the workers' Python.

Resolution imports code, so :func:`load_analysis` runs in the worker (never in the
daemon): a broken analysis can only break workers.  :func:`find_analysis` and
:func:`installed_analyses` only read installed metadata (nothing is imported), so the
daemon may use them to check a name at start and ``dpatia analyses`` to list them.
Every failure is an :class:`AnalysisLoadError` whose message is one line naming the
spec and the problem.
"""

from __future__ import annotations

import importlib
import re
from importlib import metadata
from typing import cast

from attrs import frozen

from . import Analysis

#: Built-in short names and where they live.
BUILTINS: dict[str, str] = {
    "demo": "dpatia_daemon.analyses.demo:run",
    "tissue": "dpatia_daemon.analyses.tissue:analyse",
    "nuclei": "dpatia_daemon.analyses.nuclei:analyse",
}

#: The entry-point group an installable analysis declares itself in.
ENTRY_POINT_GROUP = "dpatia.analyses"

_SPEC = re.compile(r"([A-Za-z_][\w.]*):([A-Za-z_]\w*)\Z")


class AnalysisLoadError(Exception):
    """The analysis named by the spec cannot be used; the message says why, in one line."""


@frozen
class InstalledAnalysis:
    """One analysis a short name can select: ``name``, the ``target`` it names
    (``module:callable``) and where it comes from (``"built-in"`` or the installed
    distribution and its version)."""

    name: str
    target: str
    source: str
    #: A built-in of the same name wins over this plugin.
    shadowed: bool = False


def _plugins() -> list[InstalledAnalysis]:
    """The ``dpatia.analyses`` entry points on the current ``sys.path``, by name."""
    found = []
    for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = entry.dist
        source = f"{dist.name} {dist.version}" if dist is not None else "(unknown distribution)"
        found.append(
            InstalledAnalysis(entry.name, entry.value, source, shadowed=entry.name in BUILTINS)
        )
    return sorted(found, key=lambda a: (a.name, a.source))


def installed_analyses() -> list[InstalledAnalysis]:
    """The built-ins, then the installed plugins (metadata only: nothing is imported)."""
    builtins = [InstalledAnalysis(name, target, "built-in") for name, target in BUILTINS.items()]
    return builtins + _plugins()


def find_analysis(spec: str) -> str:
    """The ``module:callable`` target ``spec`` names, without importing anything.

    Raises :class:`AnalysisLoadError` for a short name that is neither a built-in nor
    exactly one installed plugin, or a spec of no known form.
    """
    if spec in BUILTINS:
        return BUILTINS[spec]
    if ":" in spec:
        if _SPEC.match(spec) is None:
            raise AnalysisLoadError(f"analysis {spec!r}: not of the form package.module:callable")
        return spec
    plugins = [p for p in _plugins() if p.name == spec]
    if len(plugins) > 1:
        sources = ", ".join(p.source for p in plugins)
        raise AnalysisLoadError(
            f"analysis {spec!r}: installed by more than one distribution ({sources}); "
            "uninstall one, or name it as package.module:callable"
        )
    if not plugins:
        names = ", ".join(sorted(BUILTINS))
        others = ", ".join(sorted({p.name for p in _plugins() if not p.shadowed})) or "none"
        raise AnalysisLoadError(
            f"unknown analysis {spec!r}: use a built-in name ({names}), an installed "
            f"plugin (installed: {others}; `dpatia analyses` lists them) or "
            "package.module:callable"
        )
    return plugins[0].target


def load_analysis(spec: str) -> Analysis:
    """Import and return the analysis callable named by ``spec``."""
    target = find_analysis(spec)
    module_name, _, attribute = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except (Exception, SystemExit) as e:
        # An analysis module that raises (or calls sys.exit) while importing is a
        # broken analysis, not a reason to lose the worker's explanation.
        raise AnalysisLoadError(
            f"analysis {spec!r}: cannot import {module_name} ({type(e).__name__}: {e})"
        ) from None
    analysis: object = module
    try:
        # An entry point may name a nested attribute (module:Class.method).
        for part in attribute.split(".") if attribute else ():
            analysis = getattr(analysis, part)
    except AttributeError:
        raise AnalysisLoadError(
            f"analysis {spec!r}: module {module_name} has no attribute {attribute!r}"
        ) from None
    if not callable(analysis):
        raise AnalysisLoadError(f"analysis {spec!r}: {module_name}.{attribute} is not callable")
    return cast(Analysis, analysis)


__all__ = [
    "BUILTINS",
    "ENTRY_POINT_GROUP",
    "AnalysisLoadError",
    "InstalledAnalysis",
    "find_analysis",
    "installed_analyses",
    "load_analysis",
]
