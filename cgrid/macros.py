"""OpenRTB 2.6 §4.4 auction macros: ``${AUCTION_PRICE}`` and friends (SPEC §7)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from decimal import Decimal
from urllib.parse import quote

MACRO_NAMES = frozenset(
    {
        "AUCTION_ID",
        "AUCTION_BID_ID",
        "AUCTION_IMP_ID",
        "AUCTION_SEAT_ID",
        "AUCTION_AD_ID",
        "AUCTION_PRICE",
        "AUCTION_CURRENCY",
        "AUCTION_MBR",
        "AUCTION_LOSS",
        "AUCTION_MIN_TO_WIN",
        "AUCTION_MULTIPLIER",
        "AUCTION_IMP_TS",
    }
)

MacroValue = str | int | float

# The macros a final record keeps whatever its state: the ids a buyer's own log of the calls
# holds, which `cgrid-s2s reconcile` matches on (not personal data; docs/scaling.md counts
# their bytes). cgrid/ledger/scripts/common.lua's slim_event keeps the same two.
RECONCILE_MACROS = ("AUCTION_ID", "AUCTION_IMP_ID")

_TOKEN = re.compile(r"\$\{([A-Za-z0-9_]+)\}")


def format_value(value: MacroValue) -> str:
    """A macro value as text; numbers in plain decimal, never with an exponent."""
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return str(value)
    text = repr(value)
    if "e" in text or "n" in text:  # an exponent (1e-07), or inf/nan (refused at parse time)
        text = format(Decimal(text), "f")
    return text


def substitute(url: str, macros: Mapping[str, MacroValue]) -> str:
    """Replace the known macros by their URL-encoded values; a known one with no value
    becomes empty, any other ``${...}`` token is left as it is."""
    if "${" not in url:
        return url

    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in MACRO_NAMES:
            return match.group(0)
        value = macros.get(name)
        if value is None:
            return ""
        text = format_value(value)
        return text if _UNRESERVED.fullmatch(text) else quote(text, safe="")

    return _TOKEN.sub(replace, url)


# What quote(text, safe="") leaves as it is (RFC 3986 unreserved): such a value needs no quoting.
_UNRESERVED = re.compile(r"[A-Za-z0-9_.~-]*")
