"""The package layout is the architecture: layers import only downwards, no cycles.

Layers, lowest first (README "Layout" says the same in prose):

0. values and helpers every part shares: ``models``, ``jobs``, ``durable``, ...;
1. the records and the SPS: ``spool/``, ``sps/``;
2. the work on a slide: ``pipeline/``, ``analyses/``;
3. ``config``, the contract every configurable part reads;
4. the processes' parts: ``frontdoor/``, ``workers/`` (and the ``worker`` alias),
   ``lifecycle`` (the service tree's ordered stop, "ready" line, stop-only services),
   ``ops/`` (systemd notifications, the log observer: they read the other parts);
5. the wiring: ``service``, ``tap``;
6. separate programs nothing in the daemon imports: ``simulator/``, ``demo``, ``cli``,
   ``admin/`` (the operator's commands ``cli`` dispatches to).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "dpatia_daemon"

#: Layer of each top-level module or subpackage of dpatia_daemon.
LAYERS: dict[str, int] = {
    "": 0,  # dpatia_daemon/__init__.py
    "_version": 0,
    "models": 0,
    "jobs": 0,
    "durable": 0,
    "text": 0,
    "backoff": 0,
    "sections": 0,
    "twistedcompat": 0,
    "spool": 1,
    "sps": 1,
    "pipeline": 2,
    "analyses": 2,
    "config": 3,
    "frontdoor": 4,
    "workers": 4,
    "worker": 4,
    "lifecycle": 4,
    "ops": 4,
    "service": 5,
    "tap": 5,
    "simulator": 6,
    "demo": 6,
    "cli": 6,
    "admin": 6,
}

#: Modules that sit below their package's layer, and why.
EXCEPTIONS: dict[str, int] = {
    # The notification rules are plain values with no imports of their own; the config
    # contract carries them, the front door applies them.
    "frontdoor.notifications": 0,
    # The names of a job's work-folder files: the pipeline fills the folder the
    # workers' daemon side creates, and both read the names from this leaf module.
    "workers.workfolder": 0,
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _layer(module: str) -> int:
    for name in (module, *(module.rsplit(".", n)[0] for n in range(1, module.count(".") + 1))):
        if name in EXCEPTIONS:
            return EXCEPTIONS[name]
    top = module.split(".")[0]
    assert top in LAYERS, f"dpatia_daemon.{top} has no layer: add it to LAYERS"
    return LAYERS[top]


def _imports(module: str, path: Path, *, top_level_only: bool) -> set[str]:
    """The dpatia_daemon modules ``module`` imports (names relative to the package)."""
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if module else []
                if not is_package:
                    base = base[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            elif node.module and (node.module + ".").startswith("dpatia_daemon."):
                target = node.module.removeprefix("dpatia_daemon").lstrip(".")
            else:
                continue
            found.add(target)
            for alias in node.names:  # "from . import x" may name a submodule
                candidate = f"{target}.{alias.name}" if target else alias.name
                if (PACKAGE / candidate.replace(".", "/")).with_suffix(".py").exists():
                    found.add(candidate)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("dpatia_daemon."):
                    found.add(alias.name.removeprefix("dpatia_daemon."))
    found.discard(module)
    return found


def test_every_import_goes_to_the_same_layer_or_below() -> None:
    """No module imports one of a higher layer, not even inside a function."""
    wrong = []
    for module, path in _modules().items():
        for target in sorted(_imports(module, path, top_level_only=False)):
            if _layer(target) > _layer(module):
                wrong.append(f"{module} (layer {_layer(module)}) imports {target} "
                             f"(layer {_layer(target)})")
    assert wrong == []


def test_there_are_no_import_cycles() -> None:
    """Module-level imports form no cycle (a cycle hides which module is the lower one)."""
    modules = _modules()
    graph = {m: {t for t in _imports(m, p, top_level_only=True) if t in modules}
             for m, p in modules.items()}
    # A package's __init__ runs before its submodules: importing "a.b" imports "a".
    for m in list(graph):
        graph[m] = {t for t in graph[m] if not m.startswith(t + ".") or t == ""}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt):], nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert cycles == []


@pytest.mark.parametrize("module", ["simulator", "demo", "cli"])
def test_nothing_in_the_daemon_imports_the_separate_programs(module: str) -> None:
    """The simulator and the demo are programs of their own, not parts of the daemon."""
    users = [m for m, p in _modules().items()
             if _layer(m) < LAYERS[module]
             and any(t == module or t.startswith(module + ".")
                     for t in _imports(m, p, top_level_only=False))]
    assert users == []


#: Longest module, in lines, outside the simulator (a separate program).
MAX_LINES = 800


def test_no_module_of_the_daemon_is_over_800_lines() -> None:
    """A module one can read whole: none over MAX_LINES lines outside simulator/."""
    long = {m: n for m, p in _modules().items()
            if not m.startswith("simulator")
            and (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}
