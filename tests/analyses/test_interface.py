"""The analysis interface: what an analysis may return, and the IA-API result it becomes."""

from __future__ import annotations

from typing import Any

import pytest

from dpatia_daemon.analyses import AnalysisResult, Patch, PatchCollection, item


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"quality_control": "Fine"}, "quality_control must be one of"),
        ({"items": [item()], "patches": PatchCollection(tags=["a"], patches=[])}, "not both"),
    ],
)
def test_a_malformed_analysis_result_is_refused(kwargs: dict[str, Any], message: str) -> None:
    """AnalysisResult checks its QC verdict and that it draws items or patches."""
    with pytest.raises(ValueError, match=message):
        AnalysisResult(display_result="x", **kwargs)


def test_a_patch_collection_result_has_the_ia_api_shape() -> None:
    """patches become a patchCollection result as IA-API.md §2.6 describes it."""
    collection = PatchCollection(
        tags=["tumour", "stroma"],
        patches=[Patch(x=0.5, y=0.25, tag=1, sort_key=0.9)],
        patch_size=128,
        magnification=10,
        actions=[{"id": "verify", "name": "Verify", "tooltip": "Mark as verified"}],
    )
    result = AnalysisResult(display_result="2 classes", patches=collection).to_result("s")
    assert result.data.result is not None
    assert result.data.result.type == "patchCollection"
    content = result.data.result.content
    assert content["tags"] == ["tumour", "stroma"]
    assert content["patches"] == [
        {"tag": 1, "position": {"x": 0.5, "y": 0.25}, "sortKeyValue": 0.9}
    ]
    assert (content["patchSize"], content["magnification"]) == (128, 10)
    assert content["actions"] == [
        {"id": "verify", "state": 0, "name": "Verify", "tooltip": "Mark as verified"}
    ]
    with pytest.raises(ValueError, match="not an index"):
        PatchCollection(tags=["a"], patches=[Patch(x=0, y=0, tag=3)])


def test_application_version_is_the_models_and_defaults_to_dpatias() -> None:
    """AnalysisResult(application_version=...) is stored as applicationVersion; unset,
    the stored result carries dpatia's version."""
    from dpatia_daemon._version import __version__
    from dpatia_daemon.analyses import AnalysisResult
    from dpatia_daemon.sps.writer import final_result

    mine = AnalysisResult("cells", application_version="model-2.3.1").to_result("s")
    assert final_result(mine, "job", "s").applicationVersion == "model-2.3.1"
    default = AnalysisResult("cells").to_result("s")
    assert final_result(default, "job", "s").applicationVersion == __version__
    import pytest

    with pytest.raises(ValueError):
        AnalysisResult("cells", application_version=" ")
