"""Request-forgery guard (SPEC §8): which addresses a buyer URL may make us connect to."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from typing import Any

from cgrid.errors import ForbiddenDestination
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


def resolve_checked(host: str, port: int, allowed: Iterable[IPNetwork] = ()) -> list[tuple[int, Any]]:
    """Resolve ``host`` once and keep the addresses that may be connected to, as
    ``(family, sockaddr)`` pairs. Connects to nothing. Raises ``socket.gaierror`` when the
    name does not resolve and :class:`ForbiddenDestination` when no address is allowed."""
    allowed = tuple(allowed)
    kept: list[tuple[int, Any]] = []
    refusals: list[str] = []
    for family, _, _, _, sockaddr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        ip = ipaddress.ip_address(sockaddr[0])
        reason = forbidden_reason(ip, allowed)
        if reason is None:
            kept.append((family, sockaddr))
        else:
            refusals.append(f"{ip} is a {reason}")
    if not kept:
        raise ForbiddenDestination(f"host {host!r}: {'; '.join(dict.fromkeys(refusals))}")
    return kept
