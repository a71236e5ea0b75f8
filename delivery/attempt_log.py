"""The attempt line: one JSON line per attempt, with personal data truncated or hashed."""

from __future__ import annotations

import hashlib
import ipaddress
from typing import Any
from urllib.parse import urlsplit

from cgrid.event import Event
from cgrid.logs import get_logger, info_enabled
from delivery.attempt import Attempt
from delivery.headers import client_ip


def hash_user_agent(user_agent: str | None) -> str | None:
    """A short, stable digest: the same UA can be correlated, but not read back."""
    if not user_agent:
        return None
    return hashlib.sha256(user_agent.encode("utf-8", "replace")).hexdigest()[:12]


def truncate_ip(address: str) -> str | None:
    """The network, not the person: IPv4 to /24, IPv6 to /48; None if not an address
    (by the rule the X-Forwarded-For header uses)."""
    ip = client_ip(address)
    if ip is None:
        return None
    if ip.version == 4:
        return str(ip).rsplit(".", 1)[0] + ".0/24"
    return str(ipaddress.ip_network(f"{ip}/48", strict=False))


def _client_net(chain: tuple[str, ...] | None) -> str | None:
    """The originating address (the first valid one of the chain), truncated."""
    for entry in chain or ():
        net = truncate_ip(entry)
        if net is not None:
            return net
    return None


def attempt_fields(event: Event, attempt: Attempt) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "event_id": event.id,
        "kind": event.kind.value,
        "buyer": event.buyer,
        "attempt": attempt.n,
        "outcome": attempt.outcome.value,
        "status": attempt.status,
        "error": attempt.error.value if attempt.error else None,
        "duration_ms": round(attempt.duration_ms, 1),
        "host": urlsplit(event.url).hostname,
        "upstream": event.upstream.value,
        "ua_hash": hash_user_agent(event.user_agent),
        "client_net": _client_net(event.forwarded_for),
    }
    if attempt.reason:
        fields["reason"] = attempt.reason
    return fields


def log_attempt(event: Event, attempt: Attempt, state: str) -> None:
    failed = attempt.outcome.value in ("fail", "rejected", "expired")
    if not failed and not info_enabled():
        return  # skip building the fields of a line nobody will see
    fields = attempt_fields(event, attempt)
    if failed:
        get_logger().warning("attempt", state=state, **fields)
    else:
        get_logger().info("attempt", state=state, **fields)
