"""Package attributes imported on first use.

A built-in analysis package (``tissue``, ``nuclei``) is imported by the daemon's config
for its settings alone, and must not pay for numpy and scikit-image there: only the
workers that run the analysis need them.  Its ``__init__`` names where each heavy
attribute lives, and :func:`lazy_getattr` makes the module ``__getattr__`` that imports
it on first use.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_getattr(package: str, where: Mapping[str, str]) -> Callable[[str], Any]:
    """The module ``__getattr__`` of ``package``: ``where[name]`` is the (relative)
    module holding ``name``; the value is kept on the package once imported."""

    def __getattr__(name: str) -> Any:
        try:
            module = where[name]
        except KeyError:
            raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        value = getattr(importlib.import_module(module, package), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__


__all__ = ["lazy_getattr"]
