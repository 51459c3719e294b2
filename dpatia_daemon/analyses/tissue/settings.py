"""The ``[tissue]`` settings, declared once: the config reads the section with this
class, and a worker parses the strings it is given (``--setting``) with it too.

Every key is optional; left empty or commented out, it is the default below.  The
bounds hold wherever a value comes from, so a bad value in the file stops the daemon
at start instead of failing every job.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from attrs import frozen

from ...sections import BadValue, at_least, from_strings, key, to_strings

#: The section's name in etc/dpatia.ini (and in the errors of its values).
SECTION = "tissue"


def _setting(default: float, lowest: float) -> Any:
    """A tissue key: blank means ``default``; a value must be finite and ``lowest`` or more."""
    return key(default, at_least(lowest, finite=True), blank_is_default=True)


@frozen
class TissueSettings:
    """The ``[tissue]`` config section, parsed.

    ``min_area_mm2``: smaller regions are specks.  ``min_hole_mm2``: smaller holes are
    filled.  ``target_mpp``: the analysis resolution read from a WSI, in µm per pixel.
    ``min_side`` / ``max_side``: bounds on the analysis image's longer side (finer than
    ``target_mpp`` for small slides, coarser for huge ones).  ``max_points``: cap on
    all outline points together.  ``simplify_px``: Douglas–Peucker tolerance in
    analysis pixels.  ``min_od``: the least optical density above the glass that
    counts as tissue.
    """

    min_area_mm2: float = _setting(0.01, 0.0)
    min_hole_mm2: float = _setting(0.01, 0.0)
    target_mpp: float = _setting(8.0, 1e-3)
    min_side: int = _setting(1024, 16)
    max_side: int = _setting(4096, 16)
    max_points: int = _setting(20_000, 100)
    simplify_px: float = _setting(1.0, 0.0)
    min_od: float = _setting(0.05, 0.0)

    def __attrs_post_init__(self) -> None:
        if self.min_side > self.max_side:
            raise BadValue("min_side", f"{self.min_side} is larger than max_side {self.max_side}")

    @classmethod
    def from_mapping(cls, settings: Mapping[str, Any] | None) -> TissueSettings:
        """Parse the strings a worker got; raise ``ValueError`` naming the key.

        Values may be strings (as read from the config file) or numbers.  Unknown keys
        are ignored (the section may hold keys of other versions); empty values mean
        the default.
        """
        return from_strings(cls, settings, name=SECTION)

    def to_mapping(self) -> dict[str, str]:
        """Every setting as the string :meth:`from_mapping` reads back exactly."""
        return to_strings(self)


__all__ = ["SECTION", "TissueSettings"]
