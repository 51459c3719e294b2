"""Which image notifications dpatia takes on: the ``[notifications]`` rules.

The SPS sends a notification for *every* imported slide (IA-API.md §1.4, §3.4): an
app that took them all would download a copy of the whole archive.  These rules look
only at the ``imageInfo`` the notification carries, so a filtered notification costs
no SPS call, no spool write and no download; it is answered ``{}`` like any other.

All rules are optional and combined with AND; a rule that is not set admits anything.
A slide whose ``imageInfo`` lacks the field a rule needs does not match that rule
(a filter for "H&E" must not take slides of unknown staining).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from attrs import define, field, frozen


def _norm(text: str) -> str:
    return " ".join(text.split()).casefold()


def _names(values: tuple[str, ...]) -> frozenset[str]:
    return frozenset(_norm(v) for v in values if v.strip())


@frozen
class NotificationRules:
    """The ``[notifications]`` section.

    ``stainings``, ``body_parts`` and ``exam_codes`` are compared case-insensitively,
    whitespace-normalised, with ``staining.displayName``, ``bodyPart`` and
    ``examCode``; ``min_mpp``/``max_mpp`` bound ``micronsPerPixel`` (inclusive).
    """

    enabled: bool = True
    stainings: frozenset[str] = field(default=frozenset(), converter=_names)
    body_parts: frozenset[str] = field(default=frozenset(), converter=_names)
    exam_codes: frozenset[str] = field(default=frozenset(), converter=_names)
    min_mpp: float | None = None
    max_mpp: float | None = None

    def refusal(self, image_info: dict[str, Any] | None) -> str | None:
        """Why a notification with this ``imageInfo`` is not taken, or None to take it."""
        if not self.enabled:
            return "image notifications are disabled ([notifications] enabled = false)"
        info = image_info or {}
        if self.stainings:
            staining = info.get("staining")
            name = staining.get("displayName") if isinstance(staining, dict) else None
            if not isinstance(name, str) or _norm(name) not in self.stainings:
                return f"staining {name!r} is not one of the configured stainings"
        for rule, key, what in (
            (self.body_parts, "bodyPart", "body part"),
            (self.exam_codes, "examCode", "exam code"),
        ):
            if rule:
                value = info.get(key)
                if not isinstance(value, str) or _norm(value) not in rule:
                    return f"{what} {value!r} is not one of the configured {what}s"
        if self.min_mpp is not None or self.max_mpp is not None:
            mpp = info.get("micronsPerPixel")
            if isinstance(mpp, bool) or not isinstance(mpp, int | float):
                return "micronsPerPixel is unknown and an mpp range is configured"
            if self.min_mpp is not None and mpp < self.min_mpp:
                return f"micronsPerPixel {mpp} is below min_mpp {self.min_mpp}"
            if self.max_mpp is not None and mpp > self.max_mpp:
                return f"micronsPerPixel {mpp} is above max_mpp {self.max_mpp}"
        return None


@define
class NotificationCounts:
    """How many notifications were taken and filtered, for the status page."""

    counter: Counter[str] = field(factory=Counter)

    def count(self, taken: bool) -> None:
        self.counter["accepted" if taken else "filtered"] += 1

    def as_dict(self) -> dict[str, int]:
        return {"accepted": self.counter["accepted"], "filtered": self.counter["filtered"]}
