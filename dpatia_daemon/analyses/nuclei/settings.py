"""The ``[nuclei]`` settings, declared once: the config reads the section with this
class, and a worker parses the strings it is given (``--setting``) with it too.

Every key is optional; left empty or commented out, it is the default below.  The
bounds hold wherever a value comes from, so a bad value in the file stops the daemon
at start instead of failing every job.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from attrs import frozen

from ...sections import BadValue, at_least, at_most, from_strings, key, to_strings

#: The section's name in etc/dpatia.ini (and in the errors of its values).
SECTION = "nuclei"

#: The variable ``[workers] cpu_threads`` sets in a worker's environment (with the
#: MKL/OpenBLAS ones); ``cpu_threads = 0`` follows it.
THREADS_VARIABLE = "OMP_NUM_THREADS"


def _setting(default: float, lowest: float) -> Any:
    """A nuclei key: blank means ``default``; a value must be finite and ``lowest`` or more."""
    return key(default, at_least(lowest, finite=True), blank_is_default=True)


@frozen
class NucleiSettings:
    """The ``[nuclei]`` config section, parsed.

    ``target_mpp``: the resolution nuclei are found at, µm per pixel (the pyramid level
    nearest it, never coarser than twice it).  ``tile_px``: the side of a tile, in
    analysis pixels.  ``h_threshold``: the haematoxylin optical density above which a
    pixel belongs to a nucleus.  ``min_area_um2`` / ``max_area_um2``: smaller blobs are
    noise, larger ones are split at their distance-transform peaks (and at most one
    nucleus per ``min_distance_um``).  ``max_points``: cap on the points drawn (each
    nucleus is a small diamond of 5 points; beyond the cap an even sample is drawn and
    the count still covers all).  ``cpu_threads``: tiles analysed in parallel; 0 means
    as many as ``[workers] cpu_threads`` gives the worker (its ``OMP_NUM_THREADS``), or
    1.  ``tissue_mpp``: the resolution of the tissue mask the tiles are chosen by.
    """

    target_mpp: float = _setting(0.5, 0.05)
    tile_px: int = key(1024, at_least(128), at_most(8192), blank_is_default=True)
    h_threshold: float = _setting(0.06, 0.0)
    min_area_um2: float = _setting(8.0, 0.0)
    max_area_um2: float = _setting(80.0, 0.0)
    min_distance_um: float = _setting(3.0, 0.1)
    max_points: int = _setting(150_000, 100)
    cpu_threads: int = key(0, at_least(0), at_most(256), blank_is_default=True)
    tissue_mpp: float = _setting(8.0, 0.5)

    def __attrs_post_init__(self) -> None:
        if self.min_area_um2 > self.max_area_um2:
            raise BadValue(
                "min_area_um2",
                f"{self.min_area_um2} is larger than max_area_um2 {self.max_area_um2}",
            )

    def threads(self, environ: Mapping[str, str] | None = None) -> int:
        """The tiles to analyse at once: ``cpu_threads``, or if 0 the worker's
        ``OMP_NUM_THREADS`` (set by ``[workers] cpu_threads``), or 1."""
        if self.cpu_threads:
            return self.cpu_threads
        raw = (os.environ if environ is None else environ).get(THREADS_VARIABLE, "")
        try:
            return max(1, int(raw))
        except ValueError:
            return 1

    @classmethod
    def from_mapping(cls, settings: Mapping[str, Any] | None) -> NucleiSettings:
        """Parse the strings a worker got; raise ``ValueError`` naming the key."""
        return from_strings(cls, settings, name=SECTION)

    def to_mapping(self) -> dict[str, str]:
        """Every setting as the string :meth:`from_mapping` reads back exactly."""
        return to_strings(self)


__all__ = ["SECTION", "THREADS_VARIABLE", "NucleiSettings"]
