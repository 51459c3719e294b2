"""``[server] allowed_clients``: only listed networks may call; others get 403 JSON
naming the reason, their body unread and nothing written, in every front-door
process.  The decision uses the connection's peer address, never a header."""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from conftest import write_config
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.address import UNIXAddress
from twisted.internet.defer import ensureDeferred
from twisted.internet.testing import MemoryReactorClock
from twisted.web.client import Agent, HTTPConnectionPool

from dpatia_daemon.config import ConfigError, load_config
from dpatia_daemon.frontdoor.clients import ClientCheck
from dpatia_daemon.service import build_service

from .conftest import PROFILE
from .harness import FrontDoor, exchange, peer, request, start_front_door

NETWORKS = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00:20::/64"))


@pytest.fixture
def door(reactor: Any, tmp_path: Path) -> Iterator[FrontDoor]:
    front = pytest_twisted.blockon(
        ensureDeferred(start_front_door(reactor, tmp_path, allowed_clients=NETWORKS))
    )
    yield front
    pytest_twisted.blockon(ensureDeferred(front.close()))


@PROFILE
@given(
    address=st.ip_addresses(),
    networks=st.lists(st.ip_addresses().map(lambda a: ipaddress.ip_network(a)), max_size=3)
    | st.lists(
        st.tuples(st.ip_addresses(v=4), st.integers(0, 32)).map(
            lambda t: ipaddress.ip_network(f"{t[0]}/{t[1]}", strict=False)
        ),
        min_size=1,
        max_size=3,
    ),
)
def test_a_peer_is_refused_exactly_when_no_network_holds_it(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address, networks: list[Any]
) -> None:
    """Any address against any list: refused iff the list is set and no network
    contains it (an IPv4-mapped IPv6 address counting as its IPv4 address); the
    reason names the address."""
    check = ClientCheck(tuple(networks))
    refusal = check.refusal(peer(str(address)))
    mapped = getattr(address, "ipv4_mapped", None)
    effective = mapped if mapped is not None else address
    if not networks or any(effective in n for n in networks):
        assert refusal is None
    else:
        assert refusal is not None and str(effective) in refusal


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("10.1.2.3", True),
        ("::ffff:10.1.2.3", True),  # an IPv4 client of a dual-stack listener
        ("fd00:20::5", True),
        ("fd00:20::5%eth0", True),
        ("11.0.0.1", False),
        ("127.0.0.1", False),
        ("::1", False),
        ("::ffff:127.0.0.1", False),
        ("fd00:21::5", False),
        ("::a01:203", False),  # 10.1.2.3 as an IPv4-compatible address is not IPv4
    ],
)
def test_address_forms(host: str, allowed: bool) -> None:
    """Mapped IPv4 counts as IPv4; zones are dropped; nothing else is translated."""
    assert (ClientCheck(NETWORKS).refusal(peer(host)) is None) is allowed


def test_a_peer_without_an_ip_address_is_refused_while_the_list_is_set() -> None:
    """A UNIX-socket peer (systemd) has no address to check."""
    assert ClientCheck(NETWORKS).refusal(UNIXAddress(b"/run/x.sock")) is not None
    assert ClientCheck(()).refusal(UNIXAddress(b"/run/x.sock")) is None


@pytest_twisted.ensureDeferred
async def test_others_get_403_json_and_nothing_is_written(door: FrontDoor) -> None:
    """A notification from an address outside the list: 403 naming it, spool
    untouched, no SPS call; X-Forwarded-For naming a listed address changes
    nothing; a listed address is answered."""
    spool, sps_calls = door.spool_files(), len(door.fake.requests)
    body = json.dumps(door.notification()).encode()
    for headers in ([], [(b"X-Forwarded-For", b"10.0.0.1")], [(b"X-Real-IP", b"10.0.0.1")]):
        raw = request(b"POST", b"/dpatia/imagenotification", body, headers=headers)
        answer = await door.send(raw, client="192.0.2.7")
        assert answer.status == 403
        assert answer.json() == {
            "error": "client address 192.0.2.7 is not in [server] allowed_clients of this daemon",
            "field": None,
        }
    for route in (b"/", b"/dpatia", b"/dpatia/info", b"/nowhere"):
        answer = await door.send(request(b"GET", route, content_type=None), client="::1")
        assert answer.status == 403
    await door.settle()
    assert door.spool_files() == spool
    assert len(door.fake.requests) == sps_calls
    answer = await door.send(request(b"POST", b"/dpatia/imagenotification", body), "10.9.9.9")
    assert answer.status == 200
    await door.settle()
    assert door.spool_files() != spool


@pytest_twisted.ensureDeferred
async def test_a_refused_peers_body_is_not_buffered(door: FrontDoor) -> None:
    """A body far over the limit from a refused peer is a 403 (not a 413): the
    refusal comes as soon as the headers are in, and the body is dropped."""
    raw = request(b"POST", b"/dpatia", b"x" * (4 * 1024 * 1024))
    answer = await door.send(raw, client="203.0.113.9")
    assert answer.status == 403


@pytest_twisted.ensureDeferred
async def test_over_a_real_socket(reactor: Any, tmp_path: Path) -> None:
    """On 127.0.0.1: refused while only 10/8 is listed, answered once 127.0.0.1 is."""
    pool = HTTPConnectionPool(reactor, persistent=False)
    client = treq.client.HTTPClient(Agent(reactor, pool=pool))
    for networks, status in (
        (NETWORKS, 403),
        ((*NETWORKS, ipaddress.ip_network("127.0.0.1/32")), 200),
    ):
        front = await start_front_door(reactor, tmp_path / str(status), allowed_clients=networks)
        port = reactor.listenTCP(0, front.site, interface="127.0.0.1")
        try:
            d = client.get(f"http://127.0.0.1:{port.getHost().port}/dpatia")
            d.addTimeout(10, reactor)
            response = await d
            assert response.code == status
            await response.content()
        finally:
            await port.stopListening()
            await front.close()


def _site_of(tree: Any) -> Any:
    return tree.getServiceNamed("http").factory


@pytest_twisted.ensureDeferred
async def test_every_front_door_process_applies_the_list(reactor: Any, tmp_path: Path) -> None:
    """With ``processes = 2`` the main process's site and an extra front door's (the
    tree ``--front-door 1`` builds from the same file) both refuse an unlisted peer."""
    path = write_config(
        tmp_path,
        {
            "server": {"processes": 2, "listen": "tcp:0", "allowed_clients": "10.0.0.0/8"},
            "workers": {"count": 0},
        },
    )
    config = load_config(path)
    raw = request(b"GET", b"/dpatia", content_type=None)
    for front_door in (None, 1):
        site = _site_of(build_service(config, MemoryReactorClock(), front_door=front_door))
        assert (await exchange(reactor, site, raw, client="192.0.2.1")).status == 403
        assert (await exchange(reactor, site, raw, client="10.0.0.1")).status == 200


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("10.0.0.1/8", "has host bits set"),
        ("10.0.0.0/33", "not an IPv4 or IPv6 network"),
        ("hospital.example", "not an IPv4 or IPv6 network"),
    ],
)
def test_a_bad_network_stops_the_start(tmp_path: Path, value: str, problem: str) -> None:
    """A value that is no network is one line naming the key and the item."""
    path = write_config(tmp_path, {"server": {"allowed_clients": value}})
    with pytest.raises(ConfigError, match=r"\[server\] allowed_clients: .*" + problem):
        load_config(path)


def test_the_list_is_read_from_the_file(tmp_path: Path) -> None:
    """Spaces and commas separate items; a bare address is a /32 or /128."""
    path = write_config(
        tmp_path, {"server": {"allowed_clients": "10.0.0.0/8, 192.0.2.5  fd00:20::/64 ::1"}}
    )
    assert load_config(path).server.allowed_clients == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("192.0.2.5/32"),
        ipaddress.ip_network("fd00:20::/64"),
        ipaddress.ip_network("::1/128"),
    )
