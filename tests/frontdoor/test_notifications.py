"""The [notifications] rules: which imported slides dpatia takes on."""

from __future__ import annotations

from typing import Any

import pytest

from dpatia_daemon.frontdoor.notifications import NotificationRules

HE = {
    "staining": {"displayName": "H&E"},
    "bodyPart": "Colon",
    "examCode": "PAT01",
    "micronsPerPixel": 0.25,
}


def test_no_rules_take_everything() -> None:
    """With no rule set, every notification is taken, even without imageInfo."""
    rules = NotificationRules()
    assert rules.refusal(HE) is None
    assert rules.refusal(None) is None
    assert rules.refusal({}) is None


def test_disabled_takes_nothing() -> None:
    """enabled = false refuses every notification, naming the setting."""
    assert "disabled" in (NotificationRules(enabled=False).refusal(HE) or "")


@pytest.mark.parametrize(
    ("rules", "info", "taken"),
    [
        ({"stainings": ("H&E", "PAS")}, HE, True),
        ({"stainings": (" h&e ",)}, HE, True),
        ({"stainings": ("PAS",)}, HE, False),
        ({"stainings": ("H&E",)}, {"staining": None}, False),
        ({"stainings": ("H&E",)}, {}, False),
        ({"body_parts": ("colon",)}, HE, True),
        ({"body_parts": ("Lung",)}, HE, False),
        ({"exam_codes": ("PAT01",)}, HE, True),
        ({"exam_codes": ("PAT02",)}, HE, False),
        ({"min_mpp": 0.2, "max_mpp": 0.3}, HE, True),
        ({"min_mpp": 0.25}, HE, True),
        ({"max_mpp": 0.25}, HE, True),
        ({"min_mpp": 0.3}, HE, False),
        ({"max_mpp": 0.2}, HE, False),
        ({"max_mpp": 1.0}, {"micronsPerPixel": "0.25"}, False),
        ({"max_mpp": 1.0}, {}, False),
        ({"stainings": ("H&E",), "body_parts": ("Colon",), "max_mpp": 0.5}, HE, True),
        ({"stainings": ("H&E",), "body_parts": ("Lung",), "max_mpp": 0.5}, HE, False),
    ],
)
def test_rules_combine_with_and(rules: dict[str, Any], info: dict[str, Any], taken: bool) -> None:
    """Each rule admits matching values only; a missing field never matches a rule."""
    refusal = NotificationRules(**rules).refusal(info)
    assert (refusal is None) is taken
    if not taken:
        assert isinstance(refusal, str) and refusal
