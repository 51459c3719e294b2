"""Analyses as installed plugins: the ``dpatia.analyses`` entry-point group.

A plugin is "installed" by a dist-info folder on a scratch ``sys.path`` entry
(:mod:`plugin_helpers`), which is all ``importlib.metadata`` looks at.  The template
package under ``examples/`` is installed the same way and its own tests run here, so
the copy a vendor starts from keeps working.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from conftest import write_config
from plugin_helpers import VENDOR_MODULE, install_plugin

from dpatia_daemon.analyses.loader import (
    AnalysisLoadError,
    InstalledAnalysis,
    find_analysis,
    installed_analyses,
    load_analysis,
)
from dpatia_daemon.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent.parent
TEMPLATE = ROOT / "examples" / "analysis-template"


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A scratch site-packages on sys.path (removed again after the test)."""
    folder = tmp_path / "site"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    return folder


def test_an_installed_plugin_is_found_by_its_name(
    site: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``mymodel = vendor_model_a:analyse`` in the group: the name loads the callable,
    and finding it imports nothing."""
    install_plugin(site, "mymodel", "vendor_model_a:analyse", module=("vendor_model_a.py", VENDOR_MODULE))
    monkeypatch.delitem(sys.modules, "vendor_model_a", raising=False)
    assert find_analysis("mymodel") == "vendor_model_a:analyse"
    assert "vendor_model_a" not in sys.modules
    analysis = load_analysis("mymodel")
    assert analysis is sys.modules["vendor_model_a"].analyse
    assert InstalledAnalysis("mymodel", "vendor_model_a:analyse", "vendor-model 1.0") in (
        installed_analyses()
    )


def test_an_unknown_name_says_what_is_installed_in_one_line(site: Path) -> None:
    """The error names the spec, the built-ins and the installed plugins."""
    install_plugin(site, "othermodel", "vendor_model_b:analyse")
    with pytest.raises(AnalysisLoadError) as info:
        load_analysis("nosuchmodel")
    message = str(info.value)
    assert message.startswith("unknown analysis 'nosuchmodel': use a built-in name (demo, nuclei, tissue)")
    assert "othermodel" in message and "dpatia analyses" in message
    assert "\n" not in message


def test_a_plugin_whose_module_is_broken_fails_with_its_reason(site: Path) -> None:
    """The entry point exists but its module raises at import: one line saying so."""
    install_plugin(
        site, "broken", "vendor_broken:analyse", module=("vendor_broken.py", "raise ImportError('no CUDA')\n")
    )
    with pytest.raises(AnalysisLoadError, match=r"analysis 'broken': cannot import vendor_broken \(ImportError: no CUDA\)"):
        load_analysis("broken")


def test_a_name_two_distributions_declare_is_refused(site: Path) -> None:
    """Ambiguity is an error naming both distributions, not a coin toss."""
    install_plugin(site, "twin", "a_mod:analyse", distribution="vendor-a")
    install_plugin(site, "twin", "b_mod:analyse", distribution="vendor-b")
    with pytest.raises(AnalysisLoadError, match=r"more than one distribution \(vendor-a 1.0, vendor-b 1.0\)"):
        find_analysis("twin")


def test_built_in_names_win_over_a_plugin_of_the_same_name(site: Path) -> None:
    """A plugin cannot replace ``tissue``; the listing marks it shadowed."""
    from dpatia_daemon.analyses import tissue

    install_plugin(site, "tissue", "vendor_tissue:analyse")
    assert load_analysis("tissue") is tissue.analyse
    listed = [a for a in installed_analyses() if a.name == "tissue"]
    assert [(a.source, a.shadowed) for a in listed] == [
        ("built-in", False),
        ("vendor-model 1.0", True),
    ]


def test_the_config_check_at_start_refuses_an_unknown_name(tmp_path: Path, site: Path) -> None:
    """``[app] analysis = mymodel`` loads once the plugin is installed; an unknown
    name stops the start with one line; a daemon without workers does not care."""
    install_plugin(site, "mymodel", "vendor_model_c:analyse")
    assert load_config(write_config(tmp_path, {"app": {"analysis": "mymodel"}})).app.analysis == (
        "mymodel"
    )
    path = write_config(tmp_path, {"app": {"analysis": "my-other-model"}})
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(
        f"{path}: [app] analysis: unknown analysis 'my-other-model': use a built-in name"
    )
    assert "mymodel" in str(info.value)
    assert load_config(path, {"workers": "0"}).workers.count == 0


def test_the_template_package_is_a_working_plugin(
    tmp_path: Path, site: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """examples/analysis-template: its entry point loads its analysis, and its own tests
    pass (against a generated slide)."""
    monkeypatch.syspath_prepend(str(TEMPLATE / "src"))
    text = (TEMPLATE / "pyproject.toml").read_text()
    assert 'example = "dpatia_example.analysis:analyse"' in text
    install_plugin(site, "example", "dpatia_example.analysis:analyse", distribution="dpatia-example-analysis")
    from dpatia_example import analysis  # type: ignore[import-not-found]

    assert load_analysis("example") is analysis.analyse
    spec = importlib.util.spec_from_file_location(
        "template_tests", TEMPLATE / "tests" / "test_example_analysis.py"
    )
    assert spec is not None and spec.loader is not None
    tests = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tests)
    for name in ("test_the_stained_fraction_is_near_the_true_tissue_fraction", "test_a_cancelled_job_stops"):
        folder = tmp_path / name
        folder.mkdir()
        getattr(tests, name)(folder)
