"""The s2s request headers, exactly per the table of SPEC §3."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable

from cgrid.event import Event, Kind, Upstream

CGRID_USER_AGENT = "CGRID/1.0"
USER_AGENT_MAX_CHARS = 1024


def clean_user_agent(user_agent: str | None) -> str | None:
    """The original UA with control and non-ASCII characters removed, cut to a sane
    length; None when nothing is left. A hostile UA can never split a header."""
    if user_agent is None:
        return None
    # Fast path: printable ASCII already (isprintable() is False for every control character).
    cleaned = user_agent if user_agent.isascii() and user_agent.isprintable() else _NOT_PRINTABLE.sub("", user_agent)
    cleaned = cleaned.strip()[:USER_AGENT_MAX_CHARS].strip()
    return cleaned or None


_NOT_PRINTABLE = re.compile(r"[^ -~]+")
# A dotted-quad IPv4 address exactly as ipaddress writes it (no leading zeros), so it can be
# kept as it is without parsing; anything else goes through ipaddress.
_PLAIN_IPV4 = re.compile(r"(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)")


def client_ip(entry: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """One ``forwarded_for`` entry as an address; None when it is not a valid one."""
    entry = entry.strip()
    if "%" in entry:  # IPv6 zone ids are local to the sender, never a client address
        return None
    try:
        return ipaddress.ip_address(entry)
    except ValueError:
        return None


def clean_forwarded_for(chain: Iterable[str] | None) -> str | None:
    """Valid IPv4/IPv6 entries, originating address first, joined with ", "; None if empty."""
    if chain is None:
        return None
    kept = []
    for entry in chain:
        if _PLAIN_IPV4.fullmatch(entry):
            kept.append(entry)
        else:
            ip = client_ip(entry)
            if ip is not None:
                kept.append(str(ip))
    return ", ".join(kept) or None


def build_headers(event: Event) -> dict[str, str]:
    """Headers of the s2s call for this event's kind and upstream."""
    headers = {"User-Agent": CGRID_USER_AGENT}
    server_upstream = event.upstream is Upstream.S2S
    if server_upstream:
        headers["X-CGRID-ServerUpstream"] = "1"
    # A win notice for a server-upstream impression carries no user data at all.
    if server_upstream and event.kind is Kind.NURL:
        return headers
    user_agent = clean_user_agent(event.user_agent)
    if user_agent:
        headers["X-User-Agent"] = user_agent
    forwarded_for = clean_forwarded_for(event.forwarded_for)
    if forwarded_for:
        headers["X-Forwarded-For"] = forwarded_for
    return headers
