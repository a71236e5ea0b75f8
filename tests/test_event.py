"""The event model and its validation (SPEC §2): every refusal names its field."""

from __future__ import annotations

import json

import pytest

from cgrid.errors import InvalidEvent
from cgrid.event import Event, Kind, Upstream, parse_event

BASE = {"kind": "burl", "url": "https://dsp.example/b?p=${AUCTION_PRICE}", "upstream": "s2s"}


def refused(**changes: object) -> InvalidEvent:
    data = {**BASE, **changes}
    with pytest.raises(InvalidEvent) as info:
        parse_event(data)
    return info.value


def test_minimal_event_gets_defaults() -> None:
    event = parse_event(BASE, now_s=1700000000.0)
    assert event.kind is Kind.BURL and event.upstream is Upstream.S2S
    assert len(event.id) == 32 and event.created_at_s == 1700000000.0
    assert event.user_agent is None and event.forwarded_for is None and event.macros == {}


def test_full_event_round_trips_through_json() -> None:
    data = {
        **BASE,
        "id": "auction-1:imp-1:burl",
        "user_agent": "Mozilla/5.0",
        "forwarded_for": "77.16.215.3, 18.196.6.164",
        "macros": {"AUCTION_PRICE": 1.25, "AUCTION_ID": "a1"},
        "buyer": "dsp-7",
        "created_at": 1700000000.5,
    }
    event = parse_event(data)
    assert event.forwarded_for == ("77.16.215.3", "18.196.6.164")
    assert Event.from_json(event.to_json()) == event


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"kind": "win"}, "kind"),
        ({"kind": None}, "kind"),
        ({"upstream": "web"}, "upstream"),
        ({"url": "ftp://dsp.example/x"}, "url"),
        ({"url": "/relative"}, "url"),
        ({"url": "https://"}, "url"),
        ({"url": "https://dsp.example/" + "a" * 9000}, "url"),
        ({"url": "https://dsp.example/a b"}, "url"),
        ({"url": "https://dsp.example:99999/"}, "url"),
        ({"url": "https://user:secret@dsp.example/"}, "url"),
        ({"url": 5}, "url"),
        ({"id": ""}, "id"),
        ({"id": "x" * 129}, "id"),
        ({"id": "caf\u00e9"}, "id"),
        ({"id": 12}, "id"),
        ({"user_agent": 5}, "user_agent"),
        ({"forwarded_for": 5}, "forwarded_for"),
        ({"forwarded_for": ["1.2.3.4", 5]}, "forwarded_for[1]"),
        ({"macros": []}, "macros"),
        ({"macros": {"AUCTION_PRCE": "1"}}, "macros.AUCTION_PRCE"),
        ({"macros": {"AUCTION_PRICE": True}}, "macros.AUCTION_PRICE"),
        ({"macros": {"AUCTION_PRICE": float("nan")}}, "macros.AUCTION_PRICE"),
        ({"macros": {"AUCTION_PRICE": None}}, "macros.AUCTION_PRICE"),
        ({"buyer": ""}, "buyer"),
        ({"buyer": "-"}, "buyer"),  # the report's name for events without a buyer
        ({"buyer": "-other"}, "buyer"),
        ({"id": "auction-1:imp-1:burl:replay1"}, "id"),  # the ids of cgrid-s2s replay
        ({"buyer": 3}, "buyer"),
        ({"created_at": "yesterday"}, "created_at"),
        ({"created_at": -1}, "created_at"),
        ({"headers": {}}, "headers"),
        # A lone UTF-16 surrogate cannot be written as UTF-8 (Redis, logs, files): refused.
        ({"user_agent": "Mozilla \ud800"}, "user_agent"),
        ({"forwarded_for": ["1.2.3.4\udc80"]}, "forwarded_for[0]"),
        ({"forwarded_for": "1.2.3.4, \udc80"}, "forwarded_for"),
        ({"macros": {"AUCTION_ID": "a\udfff"}}, "macros.AUCTION_ID"),
        ({"url": "https://dsp.example/\ud83d"}, "url"),
    ],
)
def test_invalid_fields_are_named(changes: dict[str, object], field: str) -> None:
    error = refused(**changes)
    assert error.field == field
    assert str(error).startswith(field + ": ")
    assert isinstance(error, ValueError)


def test_missing_required_fields_are_named() -> None:
    for name in ("kind", "url", "upstream"):
        data = {k: v for k, v in BASE.items() if k != name}
        with pytest.raises(InvalidEvent) as info:
            parse_event(data)
        assert info.value.field == name and "required" in info.value.reason


def test_not_an_object() -> None:
    for data in ([1, 2], "x", None, 3):
        with pytest.raises(InvalidEvent) as info:
            parse_event(data)
        assert info.value.field == "event"


def test_not_json() -> None:
    with pytest.raises(InvalidEvent) as info:
        Event.from_json("{nope")
    assert info.value.field == "event"


def test_url_too_long_after_macro_substitution() -> None:
    url = "https://dsp.example/?" + "&".join(["p=${AUCTION_ID}"] * 20)
    error = refused(url=url, macros={"AUCTION_ID": "\u00e9" * 500})
    assert error.field == "url (after macro substitution)"


def test_serialized_form_uses_spec_field_names() -> None:
    event = parse_event({**BASE, "buyer": "b"}, now_s=5.0)
    data = json.loads(event.to_json())
    assert data["created_at"] == 5.0 and "created_at_s" not in data


def test_generated_ids_cost_no_system_call_and_stay_unique_across_fork(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from cgrid.event import new_event_id

    calls = []
    real_urandom = os.urandom
    monkeypatch.setattr(os, "urandom", lambda n: calls.append(n) or real_urandom(n))
    ids = {parse_event({"kind": "burl", "url": "https://d.example/", "upstream": "s2s"}).id for _ in range(1000)}
    assert len(ids) == 1000 and calls == []  # uuid4() would have called os.urandom 1,000 times
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child draws its own prefix
        os.write(write_end, new_event_id().encode())
        os._exit(0)
    os.waitpid(pid, 0)
    child_id = os.read(read_end, 200).decode()
    os.close(read_end)
    os.close(write_end)
    parent_id = new_event_id()
    assert child_id[:24] != parent_id[:24] and len(child_id) == len(parent_id) == 32


def test_ids_and_buyers_near_the_reserved_forms_are_fine() -> None:
    for event_id in ("a:replay", "a:replayed", "a:replay1b", "replay1", "a:Replay1"):
        assert parse_event({**BASE, "id": event_id}).id == event_id
    for buyer in ("a-", "a-b", "_", "+1"):
        assert parse_event({**BASE, "buyer": buyer}).buyer == buyer


def _final_json_by_the_encoder(event: Event, keep_call: bool) -> str:
    """What to_final_json wrote before it was written by hand: the same object, encoded."""
    out: dict[str, object] = {"id": event.id, "kind": event.kind.value, "upstream": event.upstream.value,
                              "created_at": event.created_at_s}
    if event.buyer is not None:
        out["buyer"] = event.buyer
    if keep_call:
        out["url"] = event.url
        if event.macros:
            out["macros"] = dict(event.macros)
    else:
        out["host"] = event.url.split("://", 1)[-1].split("/", 1)[0].split("?", 1)[0].split("#", 1)[0]
        ids = {name: event.macros[name] for name in ("AUCTION_ID", "AUCTION_IMP_ID") if name in event.macros}
        if ids:
            out["macros"] = ids
    return json.dumps(out, separators=(",", ":"), ensure_ascii=False)


@pytest.mark.parametrize("keep_call", [False, True])
@pytest.mark.parametrize("changes", [
    {},
    {"buyer": None, "macros": {}},
    {"id": 'q"uo\\te', "buyer": "b\"\\x", "url": "https://h\u00e9.example:8443/p?q=\u2603&x=\"y\"#f"},
    {"macros": {"AUCTION_ID": "a\u0001b\u00e9\"", "AUCTION_IMP_ID": 7, "AUCTION_PRICE": 1e-07}},
    {"macros": {"AUCTION_ID": 1.2345678901234567, "AUCTION_IMP_ID": 10**30, "AUCTION_PRICE": 1e16}},
    {"macros": {"AUCTION_IMP_ID": -3.5}, "created_at_s": 1700000000},
    {"url": "http://h", "created_at_s": 1e16},
])
def test_a_final_record_is_byte_for_byte_what_the_json_encoder_writes(changes: dict[str, object],
                                                                       keep_call: bool) -> None:
    base: dict[str, object] = {"id": "e-1", "kind": Kind.BURL, "upstream": Upstream.S2S, "buyer": "dsp-1",
                               "url": "http://buyer.example/win?a=${AUCTION_ID}", "created_at_s": 1796076407.341318,
                               "macros": {"AUCTION_ID": "auc-1", "AUCTION_PRICE": 1.25}, "user_agent": "UA",
                               "forwarded_for": ("1.2.3.4",)}
    event = Event(**{**base, **changes})  # type: ignore[arg-type]
    assert event.to_final_json(keep_call=keep_call) == _final_json_by_the_encoder(event, keep_call)


def test_the_reports_day_is_the_utc_day_of_created_at_across_day_ends() -> None:
    """cgrid.ledger.day_of keeps the days it has made (it runs per event, at the accept and
    for each delivered line): the cached text is the day of every second of that day."""
    import time

    from cgrid.ledger import day_of

    for created_at in (0.5, 86399.999, 86400.0, 1764100000.1, 1796116572.3, 4102444799.9, 4102444800.0):
        assert day_of(created_at) == time.strftime("%Y-%m-%d", time.gmtime(created_at)), created_at
        assert day_of(created_at) == time.strftime("%Y-%m-%d", time.gmtime(created_at))  # (the kept one)
