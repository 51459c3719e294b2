"""Who may call the IA-API: ``[server] allowed_clients``, a list of IPv4 and IPv6
networks (empty: any client).

:class:`ClientCheck` decides from the connection's peer address alone, never from a
header a client writes (``X-Forwarded-For``): behind a reverse proxy, list the proxy.
An IPv4 client of a dual-stack (``tcp6:``) listener shows as ``::ffff:a.b.c.d`` and is
checked as ``a.b.c.d``, so one IPv4 list serves both kinds of listener.  A peer that
has no IP address (a UNIX socket from systemd) is refused while the list is set.

The request (:class:`~.site.IARequest`) asks as soon as the request's headers are in:
a refused client's body is not buffered, no route runs, nothing is written, and the
answer is ``403 {"error": ..., "field": null}`` naming the reason.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from attrs import define, field
from twisted.logger import Logger

log = Logger()

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: How many refused addresses are remembered, so each is logged once (a scanner
#: sweeping the network cannot grow this without bound).
_REMEMBERED = 1024


def client_ip(address: Any) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The peer's IP address (an IPv4-mapped IPv6 one as IPv4), or None if it has none."""
    host = getattr(address, "host", None)
    if not isinstance(host, str):
        return None
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])  # drop an IPv6 zone (fe80::1%eth0)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


@define
class ClientCheck:
    """``networks`` may call; :meth:`refusal` says why another peer may not."""

    networks: tuple[Network, ...] = ()
    _logged: set[str] = field(factory=set, init=False, repr=False)

    def refusal(self, address: Any) -> str | None:
        """None when the peer at ``address`` may call, else the reason it may not."""
        if not self.networks:
            return None
        ip = client_ip(address)
        if ip is None:
            reason = (
                "this connection has no IP address, and [server] allowed_clients "
                "admits only the networks it lists"
            )
            self._log(str(address), reason)
            return reason
        if any(ip in network for network in self.networks):
            return None
        reason = f"client address {ip} is not in [server] allowed_clients of this daemon"
        self._log(str(ip), reason)
        return reason

    def _log(self, key: str, reason: str) -> None:
        if key in self._logged:
            return
        if len(self._logged) >= _REMEMBERED:
            self._logged.clear()
        self._logged.add(key)
        log.warn("refused a request: {reason}", reason=reason)


# --- client certificates ([server] client_ca_file) ------------------------------------


def _ca_certificates(path: str) -> list[Any]:
    """The certificates of a PEM bundle, as pyOpenSSL objects (ValueError if none)."""
    from twisted.internet.ssl import Certificate
    from twisted.python.filepath import FilePath

    data = FilePath(path).getContent()
    marker = b"-----BEGIN CERTIFICATE-----"
    blocks = [marker + chunk for chunk in data.split(marker)[1:]]
    if not blocks:
        raise ValueError(f"no PEM certificate in {path}")
    return [Certificate.loadPEM(block).original for block in blocks]


def require_client_certificates(endpoint: Any, ca_file: str) -> Any:
    """``endpoint`` (an ``ssl:`` server endpoint) made to require a client certificate
    signed by a CA in the PEM bundle ``ca_file``; a client without one fails the
    handshake and never reaches HTTP.

    Twisted's ``ssl:`` server description has no option for this (``caCertsDir`` is
    a client-endpoint option only), so the endpoint's own key, certificate, chain and
    DH parameters are kept and its TLS options rebuilt with ``verify=True``.
    """
    from twisted.internet.endpoints import SSL4ServerEndpoint
    from twisted.internet.ssl import CertificateOptions

    if not isinstance(endpoint, SSL4ServerEndpoint):
        raise ValueError("needs an ssl: listener ([server] listen)")
    options = endpoint._sslContextFactory
    endpoint._sslContextFactory = CertificateOptions(
        privateKey=options.privateKey,
        certificate=options.certificate,
        extraCertChain=options.extraCertChain or None,
        dhParameters=getattr(options, "dhParameters", None),
        verify=True,
        caCerts=_ca_certificates(ca_file),
        requireCertificate=True,
    )
    return endpoint
