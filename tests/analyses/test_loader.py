"""The analysis loader: built-in short names and ``package.module:callable`` specs."""

from __future__ import annotations

import pytest

from dpatia_daemon.analyses.loader import AnalysisLoadError, load_analysis

TEST_ANALYSIS = "tests.analyses_for_tests:run"


def test_the_built_in_analyses_load() -> None:
    """The short names demo and tissue resolve to their callables."""
    from dpatia_daemon.analyses import demo, tissue

    assert load_analysis("demo") is demo.run
    assert load_analysis("tissue") is tissue.analyse


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nosuch", "unknown analysis 'nosuch': use a built-in name (demo, nuclei, tissue)"),
        ("no_such_module_x:run", "cannot import no_such_module_x (ModuleNotFoundError"),
        ("tests.analyses_for_tests:nope", "has no attribute 'nope'"),
        ("tests.analyses_for_tests:TEST_ANALYSIS_X", "has no attribute"),
    ],
)
def test_a_broken_analysis_spec_is_one_clear_line(spec: str, message: str) -> None:
    """Every way a spec can be wrong is an AnalysisLoadError naming it."""
    with pytest.raises(AnalysisLoadError) as info:
        load_analysis(spec)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_the_demo_and_test_analyses_load() -> None:
    """Built-in short names and package.module:callable both resolve."""
    assert callable(load_analysis("demo"))
    assert callable(load_analysis(TEST_ANALYSIS))
