"""The event (SPEC §2): one frozen dataclass, validated in one place, JSON in and out."""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any
from urllib.parse import SplitResult, urlsplit

import orjson

from cgrid.errors import InvalidEvent
from cgrid.macros import MACRO_NAMES, RECONCILE_MACROS, MacroValue, substitute

ID_MAX_CHARS = 128
URL_MAX_BYTES = 8 * 1024
USER_AGENT_MAX_CHARS = 16 * 1024
FORWARDED_FOR_MAX_ENTRIES = 64
FORWARDED_FOR_MAX_CHARS = 4 * 1024
MACRO_VALUE_MAX_CHARS = 1024
BUYER_MAX_CHARS = 128


def _seed_ids() -> None:
    global _id_prefix, _id_counter
    _id_prefix = os.urandom(12).hex()
    _id_counter = itertools.count()


_id_prefix = ""
_id_counter = itertools.count()
_seed_ids()
os.register_at_fork(after_in_child=_seed_ids)


def new_event_id() -> str:
    """A unique id without a system call per id: 96 random bits drawn once per process
    (again in a forked child), then a counter, in 32+ hex characters. ``uuid4()`` calls
    ``os.urandom`` every time, which releases the GIL and halved ``publish()``'s rate.
    Two processes share a prefix with probability n²/2⁹⁷ (about 10⁻¹⁷ for a million)."""
    return f"{_id_prefix}{next(_id_counter):08x}"


class Kind(StrEnum):
    NURL = "nurl"
    BURL = "burl"


class Upstream(StrEnum):
    S2S = "s2s"
    U2S = "u2s"


_KINDS = {kind.value: kind for kind in Kind}
_UPSTREAMS = {upstream.value: upstream for upstream in Upstream}
# Made once: json.dumps with options builds an encoder per call.
_encode_json = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
_decode_json = json.JSONDecoder().decode
_encode_json_string: Callable[[str], str] = json.encoder.encode_basestring  # ensure_ascii=False's (C)
# orjson reads a record at a quarter of json's CPU, to the same values but for an integer
# past 64 bits (a float: a macro may be an integer up to 10**30): json reads such a record,
# and what orjson refuses (NaN, a lone surrogate). (Floats: both round correctly, and the
# ledger holds them as repr() wrote them.)
_ORJSON_INT_MAX = 2.0**63


def _decode_ledger_json(text: str) -> Any:
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError:
        return _decode_json(text)
    macros = data.get("macros") if type(data) is dict else None
    if type(macros) is dict:
        for value in macros.values():
            if type(value) is float and abs(value) >= _ORJSON_INT_MAX:
                return _decode_json(text)
    return data


def _json_value(value: object) -> str:
    """One value as ``_encode_json`` writes it: strings and finite numbers by hand."""
    if type(value) is str:
        return _encode_json_string(value)
    if type(value) is int or (type(value) is float and math.isfinite(value)):
        return repr(value)
    return _encode_json(value)

FIELDS = frozenset(
    {"id", "kind", "url", "upstream", "user_agent", "forwarded_for", "macros", "buyer", "created_at"}
)


@dataclass(frozen=True, slots=True)
class Event:
    kind: Kind
    url: str
    upstream: Upstream
    id: str = field(default_factory=new_event_id)
    user_agent: str | None = None
    forwarded_for: tuple[str, ...] | None = None
    macros: Mapping[str, MacroValue] = field(default_factory=dict)
    buyer: str | None = None
    created_at_s: float = field(default_factory=time.time)

    @classmethod
    def from_dict(cls, data: object, *, now_s: float | None = None) -> Event:
        """Validate a decoded JSON object; raises :class:`InvalidEvent` naming the field."""
        return parse_event(data, now_s=now_s)

    @classmethod
    def from_json(cls, text: str | bytes) -> Event:
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as e:
            raise InvalidEvent("event", f"not valid JSON ({e.__class__.__name__})") from None
        return parse_event(data)

    @classmethod
    def from_ledger_json(cls, text: str | bytes) -> Event:
        """Decode an event the ledger holds. It was validated when it was published, so
        this checks only what could make the delivery code fail (types), not the rules:
        a corrupt record still raises :class:`InvalidEvent`, never anything else. (On every
        call's path: enum members by dict, checks inline.)"""
        typed = True
        try:
            data = _decode_ledger_json(text if isinstance(text, str) else text.decode())
            forwarded_for = data.get("forwarded_for")
            if forwarded_for is not None:
                forwarded_for = tuple(forwarded_for)
                for ip in forwarded_for:
                    typed = typed and isinstance(ip, str)
            event = cls(
                id=data["id"], kind=_KINDS[data["kind"]], url=data["url"], upstream=_UPSTREAMS[data["upstream"]],
                user_agent=data.get("user_agent"), forwarded_for=forwarded_for,
                macros=data.get("macros") or {}, buyer=data.get("buyer"),
                created_at_s=float(data["created_at"]),
            )
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
            raise InvalidEvent("event", f"unreadable ledger record ({e.__class__.__name__})") from None
        if not (typed and isinstance(event.id, str) and isinstance(event.url, str) and isinstance(event.macros, dict)
                and isinstance(event.user_agent, str | None) and isinstance(event.buyer, str | None)):
            raise InvalidEvent("event", "unreadable ledger record (wrong types)")
        return event

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "kind": self.kind.value,
            "url": self.url,
            "upstream": self.upstream.value,
            "created_at": self.created_at_s,
        }
        if self.user_agent is not None:
            out["user_agent"] = self.user_agent
        if self.forwarded_for is not None:
            out["forwarded_for"] = list(self.forwarded_for)
        if self.macros:
            out["macros"] = dict(self.macros)
        if self.buyer is not None:
            out["buyer"] = self.buyer
        return out

    def to_json(self) -> str:
        return _encode_json(self.to_dict())

    def to_final_json(self, *, keep_call: bool) -> str:
        """The event as its final ledger record keeps it: without the user's data (user
        agent, IP chain); without the URL and macros (the URL's host stays) unless
        ``keep_call`` (a failed or expired event, which may be replayed). The auction and
        impression ids (:data:`RECONCILE_MACROS`) stay in any case, for reconciliation.
        Written member by member, byte for byte what ``_encode_json`` writes for the same
        object (tests/test_event.py), at a third of its CPU: it runs once per event."""
        parts = ['{"id":', _json_value(self.id), ',"kind":"', self.kind.value, '","upstream":"',
                 self.upstream.value, '","created_at":', _json_value(self.created_at_s)]
        if self.buyer is not None:
            parts += [',"buyer":', _json_value(self.buyer)]
        if keep_call:
            parts += [',"url":', _json_value(self.url)]
            if self.macros:
                parts += [',"macros":', _encode_json(dict(self.macros))]
        else:
            # The authority of an absolute http(s) URL (credentials are refused at publish).
            host = self.url.split("://", 1)[-1].split("/", 1)[0].split("?", 1)[0].split("#", 1)[0]
            parts += [',"host":', _json_value(host)]
            macros = self.macros
            ids = [f"{_json_value(name)}:{_json_value(macros[name])}" for name in RECONCILE_MACROS if name in macros]
            if ids:
                parts += [',"macros":{', ",".join(ids), "}"]
        parts.append("}")
        return "".join(parts)

    def target_url(self) -> str:
        """The URL to call: macros substituted."""
        return substitute(self.url, self.macros)


def _label(name: object) -> str:
    """A field name fit for an error message: as it is when plain, else JSON-quoted."""
    text = str(name)
    if text and len(text) <= 40 and all(ch.isascii() and (ch.isalnum() or ch in "_-") for ch in text):
        return text
    return json.dumps(text[:40])


_PRINTABLE_ASCII = re.compile(r"[ -~]*")
_WHITESPACE_OR_CONTROL = re.compile(r"[\x00-\x20\x7f]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")
# The ids replays get (ops/replay.py), kept apart from upstream ids: upstream may not use them.
_REPLAY_ID = re.compile(r":replay[0-9]+$")


def _printable_ascii(value: str) -> bool:
    return _PRINTABLE_ASCII.fullmatch(value) is not None


def _surrogate_problem(value: str) -> str | None:
    """A lone UTF-16 surrogate (JSON's ``"\\ud800"``) is a Python string but not Unicode
    text: it cannot be written as UTF-8 to Redis, a log or a file, so it is refused at
    publish rather than failing the sender of a whole batch. ``isascii()`` is O(1)."""
    if not value.isascii() and _SURROGATE.search(value):
        return "contains a lone UTF-16 surrogate (not valid Unicode text)"
    return None


def _check_text(value: str, name: str) -> None:
    problem = _surrogate_problem(value)
    if problem:
        raise InvalidEvent(name, problem)


def _optional_str(data: Mapping[str, Any], name: str, max_chars: int) -> str | None:
    value = data.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidEvent(name, f"must be a string or null, not {type(value).__name__}")
    if len(value) > max_chars:
        raise InvalidEvent(name, f"longer than {max_chars} characters")
    _check_text(value, name)
    return value


def _parse_id(data: Mapping[str, Any]) -> str:
    if "id" not in data or data["id"] is None:
        return new_event_id()
    value = data["id"]
    if not isinstance(value, str):
        raise InvalidEvent("id", f"must be a string, not {type(value).__name__}")
    if not 1 <= len(value) <= ID_MAX_CHARS:
        raise InvalidEvent("id", f"must be 1 to {ID_MAX_CHARS} characters long")
    if not _printable_ascii(value):
        raise InvalidEvent("id", "must be printable ASCII")
    if ":replay" in value and _REPLAY_ID.search(value):
        raise InvalidEvent("id", "must not end in ':replay<n>' (the ids of cgrid-s2s replay: a replay of a "
                                 "notice is another notice than one published under that id)")
    return value


def _parse_enum(data: Mapping[str, Any], name: str, enum: type[Kind] | type[Upstream]) -> Any:
    if name not in data:
        raise InvalidEvent(name, "is required")
    value = data[name]
    try:
        return enum(value)
    except ValueError:
        allowed = " or ".join(f'"{member.value}"' for member in enum)
        shown = f", not {value[:40]!r}" if isinstance(value, str) else ""
        raise InvalidEvent(name, f"must be {allowed}{shown}") from None


def check_url(url: str, name: str = "url") -> SplitResult:
    """An absolute http(s) URL with a host, within the length limit."""
    if len(url.encode("utf-8", "surrogatepass")) > URL_MAX_BYTES:
        raise InvalidEvent(name, f"longer than {URL_MAX_BYTES} bytes")
    if _WHITESPACE_OR_CONTROL.search(url):
        raise InvalidEvent(name, "contains whitespace or control characters")
    _check_text(url, name)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise InvalidEvent(name, f"is not a valid URL ({e})") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise InvalidEvent(name, "must be an absolute http:// or https:// URL")
    if not parts.hostname:
        raise InvalidEvent(name, "has no host")
    if "@" in parts.netloc:
        raise InvalidEvent(name, "must not carry credentials (user:password@)")
    if port == 0:
        raise InvalidEvent(name, "port 0 is not allowed")
    return parts


# The longest a number's plain decimal can get (1e-300 is 302 characters), and how long one
# character of a string value can get once URL-encoded (4 UTF-8 bytes, 3 characters each).
_NUMBER_MAX_CHARS = 400
_ENCODED_CHAR_MAX = 12


def _check_target_url(url: str, macros: Mapping[str, MacroValue]) -> None:
    """The URL after macro substitution must still be valid and within the limit."""
    parts = check_url(url)
    tokens = url.count("${")
    if not tokens:
        return
    if "${" not in parts.scheme and "${" not in parts.netloc:
        # Values land in the path, query or fragment, so only the length can change. When
        # even the longest possible expansion fits, there is nothing to check (publish()'s
        # hot path: substituting cost a third of it).
        longest = max((_ENCODED_CHAR_MAX * len(v) if isinstance(v, str) else _NUMBER_MAX_CHARS
                       for v in macros.values()), default=0)
        if len(url) * 4 + tokens * longest <= URL_MAX_BYTES:
            return
    target = substitute(url, macros)
    if "${" in parts.scheme or "${" in parts.netloc:
        check_url(target, "url (after macro substitution)")
    elif len(target.encode("utf-8", "surrogatepass")) > URL_MAX_BYTES:
        # Substituted values are percent-encoded and land in the path, query or fragment,
        # so only the length can change there.
        raise InvalidEvent("url (after macro substitution)", f"longer than {URL_MAX_BYTES} bytes")


def _parse_url(data: Mapping[str, Any]) -> str:
    if "url" not in data:
        raise InvalidEvent("url", "is required")
    value = data["url"]
    if not isinstance(value, str):
        raise InvalidEvent("url", f"must be a string, not {type(value).__name__}")
    return value


def _parse_forwarded_for(data: Mapping[str, Any]) -> tuple[str, ...] | None:
    value = data.get("forwarded_for")
    if value is None:
        return None
    if isinstance(value, str):
        if len(value) > FORWARDED_FOR_MAX_CHARS:
            raise InvalidEvent("forwarded_for", f"longer than {FORWARDED_FOR_MAX_CHARS} characters")
        _check_text(value, "forwarded_for")
        entries = [part.strip() for part in value.split(",")]
    elif isinstance(value, list):
        entries = []
        for index, entry in enumerate(value):
            if not isinstance(entry, str):
                raise InvalidEvent(f"forwarded_for[{index}]", "must be a string")
            if len(entry) > 64:
                raise InvalidEvent(f"forwarded_for[{index}]", "longer than 64 characters")
            _check_text(entry, f"forwarded_for[{index}]")
            entries.append(entry.strip())
    else:
        raise InvalidEvent("forwarded_for", "must be a list of IP strings, a string, or null")
    if len(entries) > FORWARDED_FOR_MAX_ENTRIES:
        raise InvalidEvent("forwarded_for", f"more than {FORWARDED_FOR_MAX_ENTRIES} entries")
    return tuple(entries)


def _parse_macros(data: Mapping[str, Any]) -> dict[str, MacroValue]:
    value = data.get("macros")
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidEvent("macros", "must be an object of macro name to string or number")
    macros: dict[str, MacroValue] = {}
    for name, item in value.items():
        if name not in MACRO_NAMES:
            raise InvalidEvent(f"macros.{_label(name)}", "is not an OpenRTB auction macro (e.g. AUCTION_PRICE)")
        problem = _macro_value_problem(item)
        if problem:
            raise InvalidEvent(f"macros.{name}", problem)
        macros[name] = item
    return macros


def _macro_value_problem(item: object) -> str | None:
    if isinstance(item, str):
        if len(item) > MACRO_VALUE_MAX_CHARS:
            return f"longer than {MACRO_VALUE_MAX_CHARS} characters"
        return _surrogate_problem(item)
    if isinstance(item, bool) or not isinstance(item, int | float):
        return "must be a string or a number"
    if isinstance(item, float) and not math.isfinite(item):
        return "must be a finite number"
    if isinstance(item, int) and abs(item) >= 10**30:
        return "number out of range"
    return None


def _parse_buyer(data: Mapping[str, Any]) -> str | None:
    value = _optional_str(data, "buyer", BUYER_MAX_CHARS)
    if value is not None and (not value or not _printable_ascii(value)):
        raise InvalidEvent("buyer", "must be 1 to 128 printable ASCII characters")
    if value is not None and value.startswith("-"):
        # '-' is the report's, the lanes' and `replay --buyer -`'s name for events without a
        # buyer, and '-other' the metrics' for buyers past their label limit (cgrid/metrics.py);
        # an id starting with '-' would also read as an option on the command line.
        raise InvalidEvent("buyer", "must not begin with '-' ('-' stands for events without a buyer)")
    return value


def _parse_created_at(data: Mapping[str, Any], now_s: float) -> float:
    value = data.get("created_at")
    if value is None:
        return now_s
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidEvent("created_at", "must be a number (unix seconds)")
    if not math.isfinite(value) or not 0 < value < 10**11:
        raise InvalidEvent("created_at", "must be unix seconds (positive, finite)")
    return float(value)


def parse_event(data: object, *, now_s: float | None = None) -> Event:
    """The single place where an event is validated."""
    if not isinstance(data, dict):
        raise InvalidEvent("event", f"must be a JSON object, not {type(data).__name__}")
    if not FIELDS.issuperset(data):
        unknown = sorted(str(key) for key in data if key not in FIELDS)
        raise InvalidEvent(_label(unknown[0]), "unknown field")
    event = Event(
        id=_parse_id(data),
        kind=_parse_enum(data, "kind", Kind),
        url=_parse_url(data),
        upstream=_parse_enum(data, "upstream", Upstream),
        user_agent=_optional_str(data, "user_agent", USER_AGENT_MAX_CHARS),
        forwarded_for=_parse_forwarded_for(data),
        macros=_parse_macros(data),
        buyer=_parse_buyer(data),
        created_at_s=_parse_created_at(data, time.time() if now_s is None else now_s),
    )
    _check_target_url(event.url, event.macros)
    return event
