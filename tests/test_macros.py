"""Macro substitution (SPEC §7)."""

from __future__ import annotations

from cgrid.macros import format_value, substitute


def test_known_macros_are_url_encoded() -> None:
    url = "https://d.example/w?p=${AUCTION_PRICE}&id=${AUCTION_ID}&c=${AUCTION_CURRENCY}"
    out = substitute(url, {"AUCTION_PRICE": "1.25", "AUCTION_ID": "a b&c=d/é", "AUCTION_CURRENCY": "USD"})
    assert out == "https://d.example/w?p=1.25&id=a%20b%26c%3Dd%2F%C3%A9&c=USD"


def test_known_macro_without_value_becomes_empty() -> None:
    assert substitute("https://d.example/?l=${AUCTION_LOSS}&x=1", {}) == "https://d.example/?l=&x=1"


def test_unknown_tokens_are_left_alone() -> None:
    url = "https://d.example/?a=${SOMETHING_ELSE}&b=${AUCTION_price}&c=$AUCTION_PRICE&d=${}"
    assert substitute(url, {"AUCTION_PRICE": 1}) == url


def test_numbers_never_use_an_exponent() -> None:
    assert format_value(1.25) == "1.25"
    assert format_value(1e-7) == "0.0000001"
    assert format_value(1e21) == "1000000000000000000000"
    assert format_value(12) == "12"
    assert format_value(0.1 + 0.2) == "0.30000000000000004"
    assert substitute("https://d.example/?p=${AUCTION_PRICE}", {"AUCTION_PRICE": 2.5e-6}) == (
        "https://d.example/?p=0.0000025"
    )


def test_all_twelve_openrtb_macros_are_known() -> None:
    names = [
        "AUCTION_ID", "AUCTION_BID_ID", "AUCTION_IMP_ID", "AUCTION_SEAT_ID", "AUCTION_AD_ID",
        "AUCTION_PRICE", "AUCTION_CURRENCY", "AUCTION_MBR", "AUCTION_LOSS", "AUCTION_MIN_TO_WIN",
        "AUCTION_MULTIPLIER", "AUCTION_IMP_TS",
    ]
    url = "https://d.example/?" + "&".join(f"{n}=${{{n}}}" for n in names)
    out = substitute(url, {n: i for i, n in enumerate(names)})
    assert out == "https://d.example/?" + "&".join(f"{n}={i}" for i, n in enumerate(names))
