"""skim: a large result answer parsed without its content, which stays as text."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dpatia_daemon.models import RawJSON, dumps
from dpatia_daemon.sps.skim import skim

# Strings with everything that could confuse a scan: quotes, escapes, brackets, and
# the very key names the scan looks for.
tricky_text = st.lists(
    st.sampled_from(list('ab"\\[]{}:,') + ["content", "result", "data", "é", "\n"]),
    max_size=8,
).map("".join)
scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | tricky_text
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(tricky_text, inner, max_size=4),
    max_leaves=20,
)
contents = st.lists(values, max_size=4) | st.dictionaries(tricky_text, values, max_size=4)


@st.composite
def results(draw: Any) -> dict[str, Any]:
    payload = {"type": "primitive", "content": draw(contents)}
    data: dict[str, Any] = {"context": draw(st.dictionaries(tricky_text, values, max_size=3))}
    if draw(st.booleans()):
        data["result"] = payload
    result = {
        "slideId": draw(tricky_text),
        "displayResult": draw(tricky_text),
        "data": data,
        "id": draw(st.integers(0, 10**6)),
        "versionId": draw(tricky_text),
    }
    if draw(st.booleans()):
        result.update(draw(st.dictionaries(tricky_text, values, max_size=2)))
    return result


def _without_content(value: Any) -> tuple[Any, Any]:
    """(the value with its data.result.content set to None, that content)."""
    try:
        holder = value["data"]["result"]
        content = holder["content"]
    except (KeyError, TypeError):
        return value, None
    holder["content"] = None
    return value, content


def _check_one(original: Any, skimmed: Any) -> None:
    expected, content = _without_content(json.loads(json.dumps(original)))
    got, raw = _without_content(skimmed)
    assert got == expected
    if isinstance(content, list | dict):
        assert isinstance(raw, RawJSON)
        assert json.loads(raw.text) == content
    else:
        assert raw == content


@settings(max_examples=300, deadline=None)
@given(results(), st.sampled_from([None, 1, 2]))
def test_a_result_is_parsed_as_json_loads_does_but_its_content(
    result: dict[str, Any], indent: int | None
) -> None:
    """Whatever the strings hold and however the SPS lays the JSON out, skim answers as
    json.loads does, except that the content stays as its own text."""
    body = json.dumps(result, indent=indent, ensure_ascii=indent == 2).encode("utf-8")
    _check_one(result, skim(body, min_bytes=0))


@settings(max_examples=200, deadline=None)
@given(st.lists(results() | values, max_size=4))
def test_an_array_of_results_keeps_each_content_as_text(items: list[Any]) -> None:
    """list_results' answer: every object item's content stays text; anything else in
    the array is parsed as usual."""
    body = json.dumps(items).encode("utf-8")
    skimmed = skim(body, array=True, min_bytes=0)
    assert isinstance(skimmed, list) and len(skimmed) == len(items)
    for original, got in zip(items, skimmed, strict=True):
        if isinstance(original, dict):
            _check_one(original, got)
        else:
            assert got == json.loads(json.dumps(original))


def test_the_content_text_is_spliced_back_unchanged() -> None:
    """A skimmed result sent on (dumps) carries the SPS's content byte for byte."""
    body = b'{"id": 3, "data": {"result": {"type": "primitive", "content": [ {"x" :1.50} ]}}}'
    skimmed = skim(body, min_bytes=0)
    assert skimmed["data"]["result"]["content"] == RawJSON('[ {"x" :1.50} ]')
    assert dumps(skimmed) == body


def test_a_repeated_key_counts_once_as_the_last_as_json_loads_does() -> None:
    body = (
        b'{"data": {"result": {"content": [1], "content": [2]}},'
        b' "data": {"result": {"content": [3]}}}'
    )
    assert skim(body, min_bytes=0) == {"data": {"result": {"content": RawJSON("[3]")}}}


def test_a_scalar_content_is_parsed() -> None:
    body = b'{"data": {"result": {"type": "primitive", "content": "text"}}}'
    assert skim(body, min_bytes=0) == json.loads(body)


def test_a_small_answer_is_parsed_whole() -> None:
    body = json.dumps({"id": 1, "data": {"result": {"content": [1, 2]}}}).encode()
    assert skim(body) == json.loads(body)


@pytest.mark.parametrize(
    "body",
    [
        b'{"data": {"result": {"content": [1, 2]}}',  # unbalanced
        b'{"data": {"result": {"content": ["a]}}}',  # odd quotes
        b'{"data": {"result": {"content": [1]}}} trailing',
        b'{"data": {"result": {"content": [1]}}, "id": }',
        b'{"data": {"result": {"content": ["\xff"]}}}',  # not UTF-8
        b"",
    ],
)
def test_a_body_that_is_not_json_raises_as_json_loads_does(body: bytes) -> None:
    with pytest.raises(ValueError):
        json.loads(body)
    with pytest.raises(ValueError):
        skim(body, min_bytes=0)


def test_inside_a_balanced_content_only_brackets_and_strings_are_checked() -> None:
    """What the module says: a content is not parsed, so a malformed one whose brackets
    and strings balance stays text (the daemon never reads a stored content)."""
    body = b'{"data": {"result": {"content": [1,,2]}}}'
    assert skim(body, min_bytes=0)["data"]["result"]["content"] == RawJSON("[1,,2]")


def test_a_large_answer_is_skimmed_by_default() -> None:
    """Above SKIM_BYTES the content of a real-sized answer stays text."""
    content = [{"polygons": [{"points": [{"x": i, "y": i / 3}] * 5} for i in range(40_000)]}]
    result = {"id": 9, "versionId": "v", "data": {"result": {"content": content}}}
    skimmed = skim(json.dumps(result).encode())
    assert isinstance(skimmed["data"]["result"]["content"], RawJSON)
    assert skimmed["versionId"] == "v"


def test_a_body_in_another_encoding_is_parsed_as_json_loads_does() -> None:
    """json.loads reads UTF-16 bytes too; the scan (made for UTF-8) must not stand in
    its way."""
    value = {"id": 1, "data": {"result": {"content": [1, "é"]}}}
    body = json.dumps(value).encode("utf-16")
    assert skim(body, min_bytes=0) == value
