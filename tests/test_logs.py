"""One JSON line per attempt, with personal data truncated or hashed."""

from __future__ import annotations

import json

import pytest

from cgrid import logs as cgrid_logs
from cgrid.event import parse_event
from cgrid.ledger import Outcome
from delivery import attempt_log as logs
from delivery.attempt import Attempt

UA = "Mozilla/5.0 (Linux; Android 14; Pixel 8) Secret/1.2.3"


def test_attempt_line_has_the_fields_and_no_personal_data(capsys: pytest.CaptureFixture[str]) -> None:
    cgrid_logs.configure("INFO")
    event = parse_event({"id": "e-1", "kind": "burl", "upstream": "u2s", "buyer": "dsp-7",
                         "url": "https://dsp.example/b?p=${AUCTION_PRICE}", "user_agent": UA,
                         "forwarded_for": ["77.16.215.3", "18.196.6.164"], "macros": {"AUCTION_PRICE": 3}})
    logs.log_attempt(event, Attempt(2, Outcome.OK, 1.0, 12.34, status=204), "delivered")
    [line] = capsys.readouterr().out.strip().splitlines()
    record = json.loads(line)
    assert record["event"] == "attempt" and record["level"] == "info"
    assert (record["event_id"], record["kind"], record["buyer"], record["attempt"]) == ("e-1", "burl", "dsp-7", 2)
    assert (record["status"], record["error"], record["duration_ms"], record["state"]) == (204, None, 12.3, "delivered")
    assert record["client_net"] == "77.16.215.0/24" and len(record["ua_hash"]) == 12
    assert "77.16.215.3" not in line and "18.196.6.164" not in line and "Secret" not in line


def test_ipv6_is_cut_to_a_48() -> None:
    assert logs.truncate_ip("2001:db8:1234:5678::1") == "2001:db8:1234::/48"


def test_client_net_skips_what_the_header_drops() -> None:
    # A leading zero or an IPv6 zone id is not a client address in X-Forwarded-For either.
    event = parse_event({"kind": "nurl", "upstream": "u2s", "url": "https://dsp.example/",
                         "forwarded_for": ["010.1.2.3", "fe80::1%eth0", "bogus", "18.196.6.164"]})
    assert logs.attempt_fields(event, Attempt(1, Outcome.OK, 1.0, 1.0, status=204))["client_net"] == "18.196.6.0/24"
