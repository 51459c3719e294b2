"""An ``[app] on_action`` callable for the worker tests (tests/workers/test_actions.py).

Workers import it as ``tests.actions_for_tests:press``.  It answers a button press with
an updated patchCollection: every patch moved to the tag the button names, the button
kept (its state back to 0), and its own application version.
"""

from __future__ import annotations

from dpatia_daemon.analyses import AnalysisJob, AnalysisResult, Patch, PatchCollection


def press(job: AnalysisJob) -> AnalysisResult:
    """Re-tag every patch of the pressed result with tag 1."""
    pressed = job.input["result"]
    content = pressed["data"]["result"]["content"]
    patches = [
        Patch(p["position"]["x"], p["position"]["y"], tag=1) for p in content.get("patches") or []
    ]
    return AnalysisResult(
        f"pressed {job.input['actionId']}",
        display_properties={"Patches": len(patches)},
        patches=PatchCollection(
            tags=content["tags"],
            patches=patches,
            actions=[{k: a[k] for k in ("id", "name", "tooltip")} for a in content["actions"]],
        ),
        application_version="press-1",
    )
