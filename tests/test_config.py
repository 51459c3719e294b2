"""The config contract: defaults, the shipped file, overrides, and one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from dpatia_daemon.config import AccessLog, ConfigError, URLPrefix, load_config
from dpatia_daemon.models import InputType

ROOT = Path(__file__).resolve().parent.parent
MINIMAL = "[sps]\nallowed_callback_urls = http://127.0.0.1:*/\n"


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "dpatia.ini"
    path.write_text(text)
    return str(path)


def test_shipped_config_loads_with_documented_defaults() -> None:
    """etc/dpatia.ini parses, and its values are the documented defaults."""
    config = load_config(str(ROOT / "etc" / "dpatia.ini"))
    assert config.server.listen == "tcp:5006"
    assert config.server.route == "/dpatia"
    assert config.server.public_url is None
    assert config.server.max_body_bytes == 1024 * 1024
    assert config.server.max_result_body_bytes == 64 * 1024 * 1024
    assert (config.server.max_json_depth, config.server.max_json_string) == (64, 1024 * 1024)
    assert (config.spool.min_free_bytes, config.spool.max_queued) == (100 * 1024 * 1024, 0)
    assert config.server.access_log is AccessLog.ERRORS
    assert config.app.input_type is InputType.WHOLE_SLIDE
    assert config.app.analysis == "tissue"
    assert config.spool.directory.path.endswith("var/spool")
    assert config.workers.count == 2
    assert config.sps.verify_tls is True
    assert config.sps.ca_file is None


def test_shipped_config_allows_only_loopback() -> None:
    """The shipped allowlist admits the simulator on loopback and nothing else."""
    sps = load_config(str(ROOT / "etc" / "dpatia.ini")).sps
    assert sps.allows("http://127.0.0.1:8080/SectraPathologyServer/external/imageanalysis/v1")
    assert sps.allows("http://localhost:1234/x")
    assert sps.allows("http://[::1]:1234/x")
    assert not sps.allows("http://10.0.0.5:8080/x")
    assert not sps.allows("https://127.0.0.1:8080/x")
    assert not sps.allows("http://127.0.0.1.evil.example/x")


def test_every_documented_key_is_in_the_shipped_file() -> None:
    """Each key the loader knows appears (set or commented) in etc/dpatia.ini."""
    from dpatia_daemon.config import SECTIONS
    from dpatia_daemon.sections import keys

    text = (ROOT / "etc" / "dpatia.ini").read_text()
    for section, cls in SECTIONS.items():
        assert f"[{section}]" in text
        for key in keys(cls):
            assert f"\n{key} =" in text or f"\n#{key} =" in text, key


def test_overrides_beat_the_file(tmp_path: Path) -> None:
    """--listen, --spool and --workers replace the file's values."""
    path = write(tmp_path, MINIMAL + "[workers]\ncount = 3\n")
    config = load_config(path, {"listen": "tcp:0", "spool": str(tmp_path / "s"), "workers": "5"})
    assert config.server.listen == "tcp:0"
    assert config.spool.directory.path == str(tmp_path / "s")
    assert config.workers.count == 5


@pytest.mark.parametrize(
    ("text", "overrides", "expected"),
    [
        ("[server]\nport = 1\n" + MINIMAL, {}, "[server] port: unknown key"),
        ("[srv]\n" + MINIMAL, {}, "[srv]: unknown section"),
        ("[workers]\ncount = two\n" + MINIMAL, {}, "[workers] count: 'two' is not a number"),
        ("[workers]\ncount = -1\n" + MINIMAL, {}, "[workers] count: must not be negative"),
        ("[server]\nlisten = nonsense:1\n" + MINIMAL, {}, "[server] listen: not a usable"),
        ("[server]\nroute = dpatia\n" + MINIMAL, {}, "[server] route: must be a path"),
        ("[server]\npublic_url = ftp://x\n" + MINIMAL, {}, "[server] public_url: must be an"),
        ("[app]\ninput_type = slide\n" + MINIMAL, {}, "[app] input_type: must be one of"),
        ("[server]\naccess_log = some\n" + MINIMAL, {}, "[server] access_log: must be one of"),
        ("[app]\nanalysis = a b\n" + MINIMAL, {}, "[app] analysis: must be a short name"),
        (
            "[sps]\nallowed_callback_urls = ftp://x/\n",
            {},
            "[sps] allowed_callback_urls: 'ftp://x/'",
        ),
        ("[sps]\nallowed_callback_urls =\n", {}, "[sps] allowed_callback_urls: must list"),
        ("[server]\n", {}, "[sps] allowed_callback_urls: must list"),
        (MINIMAL + "verify_tls = maybe\n", {}, "[sps] verify_tls: must be true or false"),
        (MINIMAL + "ca_file = /nonexistent.pem\n", {}, "[sps] ca_file: '/nonexistent.pem' is not"),
        (MINIMAL + "timeout = -1\n", {}, "[sps] timeout: must be greater than 0"),
        (
            "[notifications]\nmin_mpp = 1\nmax_mpp = 0.5\n" + MINIMAL,
            {},
            "[notifications] min_mpp: 1.0 is greater",
        ),
        (
            "[notifications]\nenabled = sometimes\n" + MINIMAL,
            {},
            "[notifications] enabled: must be true or false",
        ),
        ("[server]\nmax_json_depth = 1\n" + MINIMAL, {}, "[server] max_json_depth: must be at"),
        ("[server]\nmax_json_depth = 501\n" + MINIMAL, {}, "max_json_depth: must be at most 500"),
        ("[server]\nmax_result_body_bytes = 0\n" + MINIMAL, {}, "max_result_body_bytes: must be"),
        ("[spool]\nmin_free_bytes = -1\n" + MINIMAL, {}, "[spool] min_free_bytes: must not"),
        ("[spool]\nmax_queued = lots\n" + MINIMAL, {}, "[spool] max_queued: 'lots' is not"),
        ("garbage\n", {}, "not a valid INI file"),
        (MINIMAL, {"workers": "x"}, "command line --workers: [workers] count: 'x' is not a number"),
    ],
)
def test_bad_config_is_one_line_naming_the_problem(
    tmp_path: Path, text: str, overrides: dict[str, str], expected: str
) -> None:
    """Each bad value stops loading with one line naming file, section, key, problem."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    message = str(info.value)
    assert "\n" not in message
    assert expected in message
    if not overrides:
        assert message.startswith(path)


def test_missing_file(tmp_path: Path) -> None:
    """A missing file is named in the error."""
    with pytest.raises(ConfigError, match="nope.ini: no such file"):
        load_config(str(tmp_path / "nope.ini"))


@pytest.mark.parametrize(
    ("prefix", "url", "allowed"),
    [
        ("https://sps.h.org/SPS/v1", "https://sps.h.org/SPS/v1", True),
        ("https://sps.h.org/SPS/v1", "https://sps.h.org/SPS/v1/", True),
        ("https://sps.h.org/SPS/v1", "https://SPS.H.ORG:443/SPS/v1/x", True),
        ("https://sps.h.org/SPS/v1", "https://sps.h.org/SPS/v10", False),
        ("https://sps.h.org/SPS/v1", "https://sps.h.org/SPS/v1/../../admin", False),
        ("https://sps.h.org/SPS/v1", "https://sps.h.org/SPS/v1/%2e%2e/admin", False),
        ("https://sps.h.org/SPS/v1", "https://sps.h.org:8443/SPS/v1", False),
        ("https://sps.h.org/SPS/v1", "http://sps.h.org/SPS/v1", False),
        ("https://sps.h.org/SPS/v1", "https://user:pw@sps.h.org/SPS/v1", False),
        ("https://sps.h.org/SPS/v1", "https://sps.h.org.evil.net/SPS/v1", False),
        ("https://sps.h.org/SPS/v1", "not a url", False),
        ("http://127.0.0.1:*/", "http://127.0.0.1:1/any/path", True),
        ("http://127.0.0.1:8080", "http://127.0.0.1:8081/", False),
    ],
)
def test_callback_prefix_matching(prefix: str, url: str, allowed: bool) -> None:
    """Scheme, host, port and whole path segments must all match."""
    assert URLPrefix.parse(prefix).matches(url) is allowed


#: Each tissue setting's type and least allowed value.
TISSUE_LIMITS: dict[str, tuple[type[int] | type[float], float]] = {
    "min_area_mm2": (float, 0.0),
    "min_hole_mm2": (float, 0.0),
    "target_mpp": (float, 1e-3),
    "min_side": (int, 16),
    "max_side": (int, 16),
    "max_points": (int, 100),
    "simplify_px": (float, 0.0),
    "min_od": (float, 0.0),
}


def test_tissue_section_matches_the_analysis_settings(tmp_path: Path) -> None:
    """[tissue] offers exactly the settings the tissue analysis reads, with its lower
    bounds (a bad value stops the start, not every job), and values set in the file
    reach it as strings it accepts."""
    from dpatia_daemon.analyses.tissue import TissueSettings
    from dpatia_daemon.config import SECTIONS
    from dpatia_daemon.sections import keys

    assert SECTIONS["tissue"] is TissueSettings
    assert set(keys(TissueSettings)) == set(TISSUE_LIMITS)
    for name, (kind, lowest) in TISSUE_LIMITS.items():
        below = lowest - 1 if kind is int else (lowest / 2 if lowest else -1.0)
        path = write(tmp_path, f"[tissue]\n{name} = {below}\n" + MINIMAL)
        with pytest.raises(ConfigError, match=rf"\[tissue\] {name}: must be at least"):
            load_config(path)
        # (max_side at its least needs min_side no larger: that bound spans two keys.)
        other = "min_side = 16\n" if name == "max_side" else ""
        path = write(tmp_path, f"[tissue]\n{name} = {kind(lowest)}\n{other}" + MINIMAL)
        assert getattr(load_config(path).tissue, name) == lowest
    path = write(
        tmp_path, "[tissue]\nmin_area_mm2 = 0.02\nmax_points = 5000\nmin_od = 0\n" + MINIMAL
    )
    config = load_config(path)
    parsed = TissueSettings.from_mapping(config.analysis_settings())
    assert (parsed.min_area_mm2, parsed.max_points, parsed.min_od) == (0.02, 5000, 0.0)
    assert parsed == config.tissue


def test_an_empty_tissue_key_is_its_default(tmp_path: Path) -> None:
    """``key =`` with nothing after it means the analysis's default (etc/dpatia.ini)."""
    from dpatia_daemon.analyses.tissue import TissueSettings

    path = write(tmp_path, "[tissue]\nmin_area_mm2 =\nmax_side =\n" + MINIMAL)
    assert load_config(path).tissue == TissueSettings()


def test_tissue_bounds_that_span_keys_stop_the_start(tmp_path: Path) -> None:
    """min_side above max_side is refused at load, naming the section and the key."""
    path = write(tmp_path, "[tissue]\nmin_side = 4000\nmax_side = 2000\n" + MINIMAL)
    with pytest.raises(ConfigError, match=r"\[tissue\] min_side: 4000 is larger than max_side"):
        load_config(path)


def test_analysis_settings_round_trip_exactly(tmp_path: Path) -> None:
    """A worker reads back exactly the values of the file, however many digits, and
    the demo's section reaches its workers too."""
    from dpatia_daemon.analyses.demo import DemoSettings
    from dpatia_daemon.analyses.tissue import TissueSettings

    text = "[tissue]\nmin_area_mm2 = 0.0123456789\nmax_points = 1000000\n" + MINIMAL
    config = load_config(write(tmp_path, text))
    assert TissueSettings.from_mapping(config.analysis_settings()) == config.tissue
    demo = load_config(
        write(tmp_path, "[app]\nanalysis = demo\n[demo]\nstep_seconds = 0.25\n" + MINIMAL)
    )
    assert demo.analysis_settings() == {"step_seconds": "0.25"}
    assert DemoSettings(step_seconds=0.25) == demo.demo
    custom = load_config(write(tmp_path, "[app]\nanalysis = tests.x:run\n" + MINIMAL))
    assert custom.analysis_settings() == {}


def test_pipeline_settings_defaults_are_the_config_defaults() -> None:
    """The worker's pipeline settings built from a default config are its defaults, so
    the keys they copy from other sections cannot drift apart from those sections."""
    from dpatia_daemon.config import Config
    from dpatia_daemon.pipeline.prepare import PipelineSettings

    assert Config().pipeline_settings() == PipelineSettings()


def test_pipeline_settings_carry_the_sections_they_copy(tmp_path: Path) -> None:
    """[pipeline] keys and the [sps], [server] and [app] keys a worker's SPS client needs
    reach the worker's settings, and survive its JSON."""
    from dpatia_daemon.pipeline.prepare import PipelineSettings

    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    text = (
        "[pipeline]\nthumbnail_mpp = 8\ndownload_wsi = false\n"
        "[app]\ninclude_phi = yes\napplication_id = other\n"
        "[server]\napi_version = 1.10\n" + MINIMAL + f"timeout = 7\nretries = 0\nca_file = {ca}\n"
    )
    settings = load_config(write(tmp_path, text)).pipeline_settings()
    assert settings == PipelineSettings(
        thumbnail_mpp=8.0,
        download_wsi=False,
        include_phi=True,
        application_id="other",
        api_version="1.10",
        sps_timeout=7.0,
        sps_retries=0,
        ca_file=str(ca),
    )
    assert PipelineSettings.from_json(settings.to_json()) == settings


def test_credentials_come_from_the_sps_section(tmp_path: Path) -> None:
    """Both client credentials make Credentials; neither makes none."""
    from dpatia_daemon.sps.tokens import Credentials

    assert load_config(write(tmp_path, MINIMAL)).sps.credentials() is None
    path = write(tmp_path, MINIMAL + "client_id = me\nclient_secret = s3cret\n")
    (tmp_path / "dpatia.ini").chmod(0o600)
    assert load_config(path).sps.credentials() == Credentials("me", "s3cret")


def test_a_section_built_in_code_is_checked() -> None:
    """The checks are the fields' own: a section built in code is refused as one read
    from the file would be, naming the key."""
    from dpatia_daemon.config import ServerConfig, WorkersConfig
    from dpatia_daemon.sections import BadValue

    with pytest.raises(BadValue, match="count: must not be negative"):
        WorkersConfig(count=-1)
    with pytest.raises(BadValue, match="processes: must be at most 16"):
        ServerConfig(processes=17)


def test_reading_the_config_loads_no_analysis_code() -> None:
    """The daemon reads [tissue] with the analysis's own declaration, yet imports
    neither numpy nor scikit-image: only workers running the analysis need them."""
    import subprocess
    import sys

    code = (
        "import sys, dpatia_daemon.config; "
        "print(sorted(m for m in ('numpy', 'skimage', 'scipy') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.strip() == "[]"
