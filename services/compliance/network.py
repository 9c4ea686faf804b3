"""Optional IP allowlist for sensitive operations (erasure, export, key management).

Empty list: no restriction. The client address is the transport peer; the first
`x-forwarded-for` hop is used instead only when `trust_forwarded_for` is set, i.e. when
every client reaches the service through a proxy (Envoy) that overwrites the header;
otherwise any client could claim an allowed address.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from services.platform.errors import AnalyticsError, StatusCode


def peer_ip(peer: str) -> str:
    """`ipv4:1.2.3.4:5678` / `ipv6:[::1]:5678` → the address alone; "" if unknown."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    if kind == "ipv6":
        return rest.rsplit(":", 1)[0].strip("[]")
    return ""


class IpAllowlist:
    def __init__(self, networks: Sequence[str], trust_forwarded_for: bool = False) -> None:
        self._networks = [ipaddress.ip_network(n, strict=False) for n in networks]
        self._trust_forwarded_for = trust_forwarded_for

    def check(self, peer: str, forwarded_for: str) -> None:
        if not self._networks:
            return
        address = peer_ip(peer)
        if self._trust_forwarded_for and forwarded_for:
            address = forwarded_for.split(",")[0].strip()
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            ip = None
        if ip is None or not any(ip in network for network in self._networks):
            raise AnalyticsError(
                StatusCode.PERMISSION_DENIED,
                "SCOPE_MISSING",
                "this operation is only allowed from the configured networks",
                metadata={"client_address": address},
            )
