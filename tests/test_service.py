"""build_service: the named service tree, built without starting anything."""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest
from conftest import write_config
from twisted.internet.testing import MemoryReactorClock

from dpatia_daemon.config import Config, ConfigError, load_config
from dpatia_daemon.service import build_service


def config_for(tmp_path: Path, listen: str = "tcp:0:interface=127.0.0.1") -> Config:
    return load_config(write_config(tmp_path, {"server": {"listen": listen}}))


def test_tree_has_the_named_services_in_start_order(tmp_path: Path) -> None:
    """spool starts first and http last (so it stops first); nothing runs or is written yet."""
    root = build_service(config_for(tmp_path), MemoryReactorClock())
    names = [service.name for service in root]
    assert names[0] == "spool"
    assert names[-2:] == ["http", "ready"]
    assert {"sps", "api"} <= set(names)
    assert not root.running
    assert not (tmp_path / "spool").exists()


def test_systemd_listen_without_sockets_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """listen = systemd:... started outside systemd names the key and the remedy."""
    monkeypatch.delenv("LISTEN_FDS", raising=False)
    monkeypatch.delenv("LISTEN_PID", raising=False)
    with pytest.raises(ConfigError) as info:
        build_service(config_for(tmp_path, "systemd:domain=INET:index=0"), MemoryReactorClock())
    assert "[server] listen: systemd socket activation requested" in str(info.value)
    assert "\n" not in str(info.value)


def test_zero_workers_builds_a_front_door_only(tmp_path: Path) -> None:
    """[workers] count = 0: no supervisor in the tree; the daemon accepts and spools."""
    config = config_for(tmp_path)
    config = attrs.evolve(config, workers=attrs.evolve(config.workers, count=0))
    names = [service.name for service in build_service(config, MemoryReactorClock())]
    assert "workers" not in names
    assert {"spool", "api", "http"} <= set(names)
