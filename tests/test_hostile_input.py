"""Property-based: arbitrary JSON and strings thrown at the event parser, the macro
substitution and the header assembly. Every input either yields a valid call or an
InvalidEvent naming a field; nothing else is raised, no header can be split, and no URL
grows past its limit."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from requests.utils import check_header_validity

from cgrid.errors import InvalidEvent
from cgrid.event import FIELDS, URL_MAX_BYTES, Event, Kind, Upstream, parse_event
from cgrid.macros import MACRO_NAMES, substitute
from delivery.headers import build_headers

PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=50),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)
field_names = st.sampled_from(sorted(FIELDS)) | st.text(max_size=12)
macro_names = st.sampled_from(sorted(MACRO_NAMES))
hostile_text = st.text(alphabet=st.characters(codec="utf-8"), max_size=300) | st.sampled_from(
    ["\r\nX-Evil: 1", "\x00", "a\rb\nc", "\u2028", "${AUCTION_PRICE}", "%0d%0a", " ", "",
     "\ud800", "1.2.3.4\udc80", "a\udfffb"]  # lone surrogates: valid Python text, not UTF-8
)
ip_like = st.ip_addresses().map(str) | hostile_text
macro_values = hostile_text | st.integers() | st.floats() | st.booleans() | st.none()

VALID = {"kind": "burl", "url": "https://dsp.example/b?p=${AUCTION_PRICE}&a=${AUCTION_ID}", "upstream": "u2s"}


def assert_valid_call(event: Event) -> None:
    # What Redis, the archive and the logs get is UTF-8: an accepted event must encode.
    event.to_json().encode("utf-8")
    event.to_final_json(keep_call=True).encode("utf-8")
    url = event.target_url()
    assert len(url.encode("utf-8", "surrogatepass")) <= URL_MAX_BYTES
    assert not any(ch <= " " or ch == "\x7f" for ch in url)
    for name, value in build_headers(event).items():
        check_header_validity((name, value))  # raises on CR, LF, NUL, leading space
        value.encode("latin-1")  # http.client sends headers as latin-1
        assert "\r" not in value and "\n" not in value and "\x00" not in value


def parse_or_field_error(data: Any) -> None:
    try:
        event = parse_event(data)
    except InvalidEvent as e:
        assert e.field and str(e).startswith(e.field + ": ")
        return
    assert_valid_call(event)


@PROPERTY
@given(json_values)
def test_any_json_value(data: Any) -> None:
    parse_or_field_error(data)


@PROPERTY
@given(st.dictionaries(field_names, json_values, max_size=9))
def test_any_object_of_fields(data: dict[str, Any]) -> None:
    parse_or_field_error(data)


@PROPERTY
@given(st.sampled_from(sorted(FIELDS)), json_values)
def test_one_field_of_a_valid_event_replaced_by_anything(field: str, value: Any) -> None:
    parse_or_field_error({**VALID, field: value})


@PROPERTY
@given(st.text(max_size=200))
def test_any_text_as_json(text: str) -> None:
    try:
        event = Event.from_json(text)
    except InvalidEvent as e:
        assert e.field
        return
    assert_valid_call(event)


@PROPERTY
@given(hostile_text, st.lists(ip_like, max_size=6) | hostile_text, st.sampled_from(["nurl", "burl"]),
       st.sampled_from(["s2s", "u2s"]))
def test_hostile_user_agent_and_chain_never_split_a_header(ua: str, chain: Any, kind: str, upstream: str) -> None:
    parse_or_field_error({**VALID, "kind": kind, "upstream": upstream, "user_agent": ua, "forwarded_for": chain})


@PROPERTY
@given(st.dictionaries(macro_names, macro_values, max_size=12), st.text(max_size=200))
def test_hostile_macro_values(macros: dict[str, Any], path: str) -> None:
    url = "https://dsp.example/" + "".join(f"${{{n}}}" for n in sorted(MACRO_NAMES)) + path
    parse_or_field_error({**VALID, "url": url, "macros": macros})


@PROPERTY
@given(st.text(max_size=300), st.dictionaries(st.text(max_size=20), hostile_text | st.integers(), max_size=5))
def test_substitute_never_raises_and_encodes_values(url: str, macros: dict[str, Any]) -> None:
    out = substitute(url, macros)
    for name in MACRO_NAMES & macros.keys():
        assert "${" + name + "}" not in out or "${" + name + "}" in json.dumps(macros)


@PROPERTY
@given(st.dictionaries(field_names, json_values, max_size=9) | json_values)
def test_ledger_decode_of_a_corrupt_record_is_a_clear_error(data: Any) -> None:
    try:
        event = Event.from_ledger_json(json.dumps(data))
    except InvalidEvent as e:
        assert e.field == "event"
        return
    assert isinstance(event.url, str) and isinstance(event.macros, dict)


def test_ledger_decode_round_trips_a_valid_event() -> None:
    event = parse_event({**VALID, "user_agent": "ua", "forwarded_for": ["1.2.3.4"], "macros": {"AUCTION_ID": 5},
                         "buyer": "b"})
    assert Event.from_ledger_json(event.to_json()) == event


def _ledger_decode_as_json_does(text: str) -> Any:
    """Event.from_ledger_json as it read a record with json alone: the event, or the error."""
    try:
        data = json.loads(text)
        return Event(id=data["id"], kind=Kind(data["kind"]), url=data["url"], upstream=Upstream(data["upstream"]),
                     user_agent=data.get("user_agent"),
                     forwarded_for=None if data.get("forwarded_for") is None else tuple(data["forwarded_for"]),
                     macros=data.get("macros") or {}, buyer=data.get("buyer"), created_at_s=float(data["created_at"]))
    except Exception as e:
        return type(e)


@PROPERTY
@given(st.dictionaries(st.sampled_from(["AUCTION_PRICE", "AUCTION_ID"]),
                       st.integers(min_value=-10**30, max_value=10**30) | st.floats(allow_nan=True) | hostile_text
                       | st.just("\ud800 lone"),
                       max_size=2),
       st.floats(allow_nan=False, allow_infinity=False) | st.integers(min_value=-10**30, max_value=10**30))
def test_ledger_decode_reads_what_json_reads(macros: dict[str, Any], created_at: Any) -> None:
    """orjson reads records on the call path: to the same event json would read (an integer
    past 64 bits, NaN and lone surrogates included: those go to json)."""
    text = json.dumps({"id": "e", "kind": "nurl", "url": "http://a.example/${AUCTION_PRICE}", "upstream": "s2s",
                       "created_at": created_at, "macros": macros})
    expected = _ledger_decode_as_json_does(text)
    got = Event.from_ledger_json(text)
    assert got == expected or (got.macros != got.macros and repr(got) == repr(expected))  # (NaN != NaN)
    assert {k: type(v) for k, v in got.macros.items()} == {k: type(v) for k, v in expected.macros.items()}
    if not any(isinstance(v, float) and v != v for v in macros.values()):
        assert _url_or_error(got) == _url_or_error(expected)


def _url_or_error(event: Event) -> Any:
    try:
        return event.target_url()
    except Exception as e:
        return type(e)
