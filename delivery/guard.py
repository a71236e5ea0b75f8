"""Request-forgery guard (SPEC §8): which addresses a buyer URL may make us connect to.

libcurl resolves the host and asks ``delivery.http_client.Transfer`` for a socket just before
each connect; the check below runs on that very address, so the address checked is the
address connected to (DNS rebinding cannot slip a second answer in)."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from cgrid.settings import IPNetwork

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def _embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (mapped, NAT64, 6to4), if any."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.sixtofour is not None:
        return ip.sixtofour
    return None


def forbidden_reason(ip: IPAddress, allowed: Iterable[IPNetwork] = ()) -> str | None:
    """Why connecting to ``ip`` is refused, or None if it may be connected to."""
    inner = _embedded_ipv4(ip)
    for candidate in (ip, inner):
        if candidate is None:
            continue
        if any(candidate.version == net.version and candidate in net for net in allowed):
            return None
    target = inner if inner is not None else ip
    if target.is_unspecified:
        return "unspecified address"
    if target.is_loopback:
        return "loopback address"
    if target.is_link_local:
        return "link-local address"
    if target.is_multicast:
        return "multicast address"
    if isinstance(target, ipaddress.IPv4Address) and target in _CGNAT:
        return "carrier-grade NAT address"
    if target.is_reserved:
        return "reserved address"
    if target.is_private:
        return "private address"
    if not target.is_global:
        return "not a globally routable address"
    return None
