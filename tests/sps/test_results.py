"""The result frames: what a pathologist sees on the slide for each state of a job."""

from __future__ import annotations

from typing import Any

import attrs
import pytest

from dpatia_daemon.models import Result, ResultData, result_from_json, unstructure
from dpatia_daemon.sps.results import (
    CONTEXT_KEY,
    STYLES,
    Status,
    frame_status,
    image_size_of,
    latest,
    region_polygons,
    replacing,
    result_key,
    slide_frame,
    status_frame,
)


def _frame(status: Status = Status.RUNNING, **extra: Any) -> Result:
    return status_frame(
        slide_id="slide-1",
        status=status,
        text="Analysing",
        job_id="job-1",
        application_version="1.2.3",
        **extra,
    )


def _items(result: Result) -> list[Any]:
    """The primitive items of a frame, as the JSON sent to the SPS."""
    assert result.data.result is not None
    content = result.data.result.content
    assert isinstance(content, list)
    return content


def test_a_frame_shows_its_state_and_progress() -> None:
    """The label and display text carry the progress; properties say status and progress."""
    result = _frame(progress=40, image_size=(2000, 1000))
    assert result.slideId == "slide-1"
    assert result.applicationVersion == "1.2.3"
    assert result.displayResult == "Analysing (40 %)"
    assert result.displayProperties == {"Status": "Running", "Progress": "40 %"}
    (item,) = _items(result)
    assert item["labels"] == [{"location": {"x": 0.01, "y": 0.01}, "label": "Analysing (40 %)"}]


def test_a_frame_is_a_list_of_primitive_items_with_a_full_slide_rectangle() -> None:
    """IA-API.md §6: content is a list; y runs to height/width; the rectangle is closed."""
    result = _frame(image_size=(2000, 1000))
    assert result.data.result is not None
    assert result.data.result.type == "primitive"
    content = result.data.result.content
    assert isinstance(content, list) and len(content) == 1
    (polygon,) = content[0]["polygons"]
    points = [(p["x"], p["y"]) for p in polygon["points"]]
    assert points == [(0.0, 0.0), (1.0, 0.0), (1.0, 0.5), (0.0, 0.5), (0.0, 0.0)]


def test_a_frame_without_a_known_size_draws_only_its_label() -> None:
    """No image size, or a degenerate one: no rectangle, the label still shows."""
    for size in (None, (0, 100), (100, 0)):
        (item,) = _items(_frame(image_size=size))
        assert item["polygons"] == []
        assert item["labels"]
    assert slide_frame(None) == []


@pytest.mark.parametrize("status", list(Status))
def test_each_state_has_its_style_and_is_read_back(status: Status) -> None:
    """Failed is red and thick, cancelled grey, queued and running yellow; the frame
    records job and state so the daemon tells its frames from final answers."""
    result = _frame(status)
    (item,) = _items(result)
    assert item["style"] == unstructure(STYLES.get(status, STYLES[Status.RUNNING]))
    assert result.data.context == {CONTEXT_KEY: {"jobId": "job-1", "status": status.value}}
    assert frame_status(result) is status
    # ... also after a round trip through the SPS's JSON.
    assert frame_status(result_from_json(unstructure(result))) is status


def test_failed_frames_stand_out() -> None:
    """A failure cannot be mistaken for work in progress."""
    assert STYLES[Status.FAILED].strokeStyle != STYLES[Status.RUNNING].strokeStyle
    assert STYLES[Status.FAILED].size == 3
    assert STYLES[Status.CANCELLED].strokeStyle != STYLES[Status.RUNNING].strokeStyle


def test_an_error_is_shown_cut_to_500_characters() -> None:
    """The error goes into the properties table, bounded."""
    result = _frame(Status.FAILED, error="x" * 2000)
    assert result.displayProperties["Error"] == "x" * 500
    assert "Error" not in _frame(Status.FAILED, error="").displayProperties


@pytest.mark.parametrize(
    "context",
    [
        None,
        {},
        {"other": 1},
        {CONTEXT_KEY: "not a dict"},
        {CONTEXT_KEY: {"status": "Exploded"}},
        {CONTEXT_KEY: {}},
    ],
)
def test_other_results_are_not_frames(context: Any) -> None:
    """A final answer, another app's context or a garbled one has no frame status."""
    assert frame_status(Result(slideId="s", data=ResultData(context=context))) is None


def test_replacing_keeps_the_stored_identity() -> None:
    """An update carries the stored result's id and versionId, and the new content."""
    stored = attrs.evolve(_frame(Status.QUEUED), id=7, versionId="v3")
    new = _frame(Status.RUNNING, progress=10)
    updated = replacing(stored, new)
    assert (updated.id, updated.versionId) == (7, "v3")
    assert updated.displayResult == new.displayResult
    assert frame_status(updated) is Status.RUNNING


def test_latest_is_the_highest_stored_id() -> None:
    """List order is undocumented: the highest id wins; unstored results never do."""
    results = [
        Result(slideId="s", id=3),
        Result(slideId="s", id=11),
        Result(slideId="s"),
        Result(slideId="s", id=5),
    ]
    chosen = latest(results)
    assert chosen is not None and chosen.id == 11
    assert latest([Result(slideId="s")]) is None
    assert latest([]) is None


def _keyed(result_id: int, key: str | None) -> Result:
    return attrs.evolve(_frame(key=key), id=result_id)


def test_latest_of_a_key_is_that_regions_own_result() -> None:
    """With a key, a region job reuses only results recording its key; a whole-slide
    job also takes results recording no key (older ones), never a region's."""
    results = [_keyed(1, None), _keyed(2, "whole"), _keyed(3, "region-a"), _keyed(4, "region-b")]
    assert [result_key(r) for r in results] == [None, "whole", "region-a", "region-b"]
    assert latest(results, "region-a", region=True).id == 3  # type: ignore[union-attr]
    assert latest(results, "region-c", region=True) is None
    assert latest(results, "whole").id == 2  # type: ignore[union-attr]
    older = latest([_keyed(1, None), _keyed(4, "region-b")], "whole")
    assert older is not None and older.id == 1
    assert latest(results).id == 4  # type: ignore[union-attr]


def test_a_region_frame_outlines_the_region_and_records_the_key() -> None:
    """A region job's frame draws its selection (label at the region's corner) instead
    of the full-slide rectangle, and records its key in dpatia's context."""
    tagged = {
        "type": "taggedPolygon",
        "content": {
            "polygon": {
                "points": [{"x": 0.2, "y": 0.3}, {"x": 0.4, "y": 0.3}, {"x": 0.3, "y": 0.5}]
            },
            "tags": ["Tumour"],
            "tagIndex": 0,
        },
    }
    region = region_polygons(tagged)
    frame = _frame(key="k1", region=region, image_size=(2000, 1000))
    (item,) = _items(frame)
    assert item["polygons"] == [unstructure(region[0])]
    assert item["labels"][0]["location"] == {"x": 0.2, "y": 0.3}
    assert (frame.data.context or {})[CONTEXT_KEY]["key"] == "k1"
    assert result_key(frame) == "k1"


@pytest.mark.parametrize(
    ("input", "count"),
    [
        ({"type": "wholeSlide"}, 0),
        ({"type": "multiArea", "content": {"polygons": [{"points": [{"x": 0, "y": 0}]}] * 2}}, 2),
        ({"type": "multiArea", "content": {"polygons": [{"points": [{"x": "a", "y": 0}]}]}}, 0),
        ({"type": "taggedPolygon", "content": {"polygon": None}}, 0),
        ({"type": "taggedPolygon"}, 0),
        (None, 0),
    ],
)
def test_region_polygons_reads_both_region_types_tolerantly(input: Any, count: int) -> None:
    """The polygons of a taggedPolygon or multiArea input; nothing unusable."""
    assert len(region_polygons(input)) == count


@pytest.mark.parametrize(
    ("info", "size"),
    [
        ({"imageSize": {"width": 2000, "height": 1000}}, (2000, 1000)),
        ({"imageSize": {"width": "2000", "height": "1000"}}, (2000, 1000)),
        ({"imageSize": {"width": 0, "height": 1000}}, None),
        ({"imageSize": {"width": -5, "height": 10}}, None),
        ({"imageSize": {"width": "wide", "height": 10}}, None),
        ({"imageSize": {"width": 10}}, None),
        ({"imageSize": None}, None),
        ({}, None),
        (None, None),
    ],
)
def test_image_size_tolerates_what_is_missing(info: Any, size: Any) -> None:
    """imageSize is read when usable, and None for anything else."""
    assert image_size_of(info) == size
