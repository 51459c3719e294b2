"""patchCollection buttons as the viewer shows them, and what pressing one sends.

A patchCollection result may carry ``actions`` (IA-API.md §2.6): buttons the viewer
shows with the result.  Pressing one is a ``modify`` whose ``input`` is the stored
result with that action's ``state`` set to 1 (§1.3).  The simulator's page shows the
buttons of every result and its driver sends the press.
"""

from __future__ import annotations

import json
from typing import Any

from ..models import Result, unstructure


def actions_of(result: Result) -> list[dict[str, str]]:
    """The buttons of ``result`` (``id``, ``name``, ``tooltip``); none unless a gallery."""
    payload = result.data.result
    if payload is None or payload.type != "patchCollection":
        return []
    content = payload.content if isinstance(payload.content, dict) else {}
    return [
        {
            "id": str(a.get("id", "")),
            "name": str(a.get("name", "") or a.get("id", "")),
            "tooltip": str(a.get("tooltip", "")),
        }
        for a in content.get("actions") or []
        if isinstance(a, dict)
    ]


def pressed(result: Result, action_id: str) -> dict[str, Any]:
    """The ``modify`` input of pressing button ``action_id`` of ``result``; KeyError if it
    has no such button."""
    body = json.loads(json.dumps(unstructure(result)))
    actions = body["data"]["result"]["content"].get("actions") or []
    found = False
    for action in actions:
        if isinstance(action, dict):
            action["state"] = 1 if str(action.get("id", "")) == action_id else 0
            found = found or action["state"] == 1
    if not found:
        raise KeyError(action_id)
    return body


__all__ = ["actions_of", "pressed"]
