"""The shipped systemd units pass ``systemd-analyze verify`` and say what the daemon
needs (Type=notify with a watchdog, hardening, the socket the systemd: endpoint takes)."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
UNITS = ROOT / "systemd"


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string((UNITS / name).read_text())
    return parser


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is not installed (make test installs it where it can: root with apt-get)",
)
def test_the_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    """Both units verify together; ExecStart points at this venv's twistd (verify
    checks that the program exists), everything else is as shipped."""
    twistd = Path(sys.executable).with_name("twistd")
    assert twistd.exists()
    service = (UNITS / "dpatia.service").read_text()
    shipped = "/opt/dpatia/venv/bin/twistd"
    assert shipped in service
    (tmp_path / "dpatia.service").write_text(service.replace(shipped, str(twistd)))
    shutil.copy(UNITS / "dpatia.socket", tmp_path / "dpatia.socket")
    run = subprocess.run(
        [
            "systemd-analyze",
            "verify",
            "--man=no",
            str(tmp_path / "dpatia.socket"),
            str(tmp_path / "dpatia.service"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (run.returncode, run.stderr, run.stdout) == (0, "", "")


def test_the_service_is_notify_with_a_watchdog_and_hardened() -> None:
    """Type=notify (READY from the daemon), a watchdog, its own user and state
    directory, and the hardening the README promises."""
    service = unit("dpatia.service")["Service"]
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "User": "dpatia",
        "StateDirectory": "dpatia",
        "ProtectSystem": "strict",
        "ProtectHome": "true",
        "PrivateTmp": "true",
        "NoNewPrivileges": "true",
        "ReadWritePaths": "/var/lib/dpatia",
        "CapabilityBoundingSet": "",
    }
    assert {k: service.get(k) for k in expected} == expected
    assert int(service["WatchdogSec"]) > 0
    assert "MemoryMax" not in service  # the admin's choice: a comment says how


def test_the_socket_matches_the_systemd_endpoint_of_the_config() -> None:
    """The socket is one IPv4 listening socket, as listen = systemd:domain=INET:index=0
    (the comment in etc/dpatia.ini) expects."""
    socket = unit("dpatia.socket")["Socket"]
    assert socket["ListenStream"].startswith("0.0.0.0:")
    assert socket.get("Accept", "no") == "no"
    assert "systemd:domain=INET:index=0" in (ROOT / "etc" / "dpatia.ini").read_text()
