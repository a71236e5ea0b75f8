"""Classifying the buyer's answer (SPEC §4)."""

from __future__ import annotations

from enum import StrEnum

from cgrid.ledger import Outcome


class ErrorClass(StrEnum):
    """Why an attempt made no HTTP answer; recorded in the attempt's ``error``."""

    TIMEOUT = "timeout"  # the wall-clock deadline passed (slow or trickling server)
    CONNECT_REFUSED = "connect_refused"
    CONNECT_TIMEOUT = "connect_timeout"
    CONNECTION_RESET = "connection_reset"
    DNS = "dns_error"
    TLS = "tls_error"
    PROTOCOL = "protocol_error"  # malformed response
    TRANSPORT = "transport_error"  # any other failure of the network call
    LOST = "lost"  # started, but the worker died before recording the outcome


def classify_status(status: int) -> Outcome:
    """200, 204, 302 and every 3xx: delivered. Other 2xx: delivered but flagged. 400 and
    above: failed; so is anything below 200 — a 1xx is interim, not the buyer's answer
    (the HTTP client waits past it and never returns one; this is the last guard)."""
    if status in (200, 204) or 300 <= status < 400:
        return Outcome.OK
    if 200 <= status < 400:
        return Outcome.UNEXPECTED
    return Outcome.FAIL
