"""Header assembly: the table of SPEC §3, all four kind/upstream combinations."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cgrid.event import parse_event
from delivery.headers import build_headers, clean_forwarded_for, clean_user_agent

UA = "Mozilla/5.0 (iPhone; CPU iPhone OS 11_2_1 like Mac OS X) AppleWebKit/604.4.7 [FBAN/FBIOS;...]"
CHAIN = ["77.16.215.3", "18.196.6.164"]


def headers(kind: str, upstream: str, **fields: object) -> dict[str, str]:
    return build_headers(parse_event({"kind": kind, "url": "https://d.example/", "upstream": upstream, **fields}))


@pytest.mark.parametrize("with_data", [True, False])
def test_nurl_s2s_sends_no_user_data(with_data: bool) -> None:
    fields = {"user_agent": UA, "forwarded_for": CHAIN} if with_data else {}
    assert headers("nurl", "s2s", **fields) == {"User-Agent": "CGRID/1.0", "X-CGRID-ServerUpstream": "1"}


def test_burl_s2s_with_ua_and_ip() -> None:
    assert headers("burl", "s2s", user_agent=UA, forwarded_for=CHAIN) == {
        "User-Agent": "CGRID/1.0",
        "X-CGRID-ServerUpstream": "1",
        "X-User-Agent": UA,
        "X-Forwarded-For": "77.16.215.3, 18.196.6.164",
    }


def test_burl_s2s_without_ua_and_ip_sends_no_empty_headers() -> None:
    assert headers("burl", "s2s") == {"User-Agent": "CGRID/1.0", "X-CGRID-ServerUpstream": "1"}
    assert headers("burl", "s2s", user_agent=None, forwarded_for=None) == {
        "User-Agent": "CGRID/1.0", "X-CGRID-ServerUpstream": "1"}


@pytest.mark.parametrize("kind", ["nurl", "burl"])
def test_u2s_sends_ua_and_chain_but_no_server_upstream(kind: str) -> None:
    assert headers(kind, "u2s", user_agent=UA, forwarded_for="77.16.215.3, 18.196.6.164") == {
        "User-Agent": "CGRID/1.0",
        "X-User-Agent": UA,
        "X-Forwarded-For": "77.16.215.3, 18.196.6.164",
    }


@pytest.mark.parametrize("kind", ["nurl", "burl"])
def test_u2s_without_ua_and_ip(kind: str) -> None:
    assert headers(kind, "u2s") == {"User-Agent": "CGRID/1.0"}
    assert headers(kind, "u2s", user_agent="", forwarded_for=[]) == {"User-Agent": "CGRID/1.0"}


def test_hostile_user_agent_cannot_split_a_header() -> None:
    hostile = "Evil\r\nX-Injected: 1\r\n\r\nGET / HTTP/1.1\x00\x7f\u2028tail"
    sent = headers("burl", "u2s", user_agent=hostile)
    assert sent["X-User-Agent"] == "EvilX-Injected: 1GET / HTTP/1.1tail"
    assert all("\r" not in v and "\n" not in v for v in sent.values())
    assert "X-Injected" not in sent


def test_user_agent_is_cut_and_blank_means_absent() -> None:
    assert clean_user_agent("a" * 5000) == "a" * 1024
    assert clean_user_agent("\r\n\t ") is None
    assert headers("burl", "u2s", user_agent="\r\n") == {"User-Agent": "CGRID/1.0"}


def test_invalid_ips_are_dropped() -> None:
    chain = ["77.16.215.3", "not-an-ip", "999.1.1.1", "", "2001:db8::1", "fe80::1%eth0", "unknown"]
    assert clean_forwarded_for(chain) == "77.16.215.3, 2001:db8::1"
    assert headers("nurl", "u2s", forwarded_for="bogus, , x") == {"User-Agent": "CGRID/1.0"}


def test_ipv6_is_normalised() -> None:
    assert clean_forwarded_for(["2001:0DB8:0000::0001", " 10.0.0.1 "]) == "2001:db8::1, 10.0.0.1"


@given(st.lists(st.one_of(
    st.ip_addresses(v=4).map(str),
    st.tuples(*[st.integers(0, 300)] * 4).map(lambda t: ".".join(map(str, t))),
    st.tuples(*[st.integers(0, 255)] * 4).map(lambda t: ".".join(f"{n:03d}" for n in t)),  # leading zeros
    st.ip_addresses(v=6).map(str), st.text(max_size=20),
), max_size=6))
def test_forwarded_for_fast_path_agrees_with_ipaddress(chain: list[str]) -> None:
    reference = [str(ipaddress.ip_address(e.strip())) for e in chain if _valid(e)]
    assert clean_forwarded_for(chain) == (", ".join(reference) or None)


def _valid(entry: str) -> bool:
    entry = entry.strip()
    if "%" in entry:
        return False
    try:
        ipaddress.ip_address(entry)
    except ValueError:
        return False
    return True
