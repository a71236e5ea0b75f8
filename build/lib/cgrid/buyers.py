"""Per-buyer settings: the TOML file named by ``CGRID_BUYERS_FILE`` (SPEC §9).

    [buyers.dsp-42]
    paused = false
    timeout_s = 1.5
    retry_delay_s = 30
    max_concurrency = 50
    max_age_s = 1200
    price_encryption_key = "…web-safe base64…"
    price_integrity_key = "…web-safe base64…"

Every key is optional; a buyer not in the file, or a key not given, takes the fleet's
default (``CGRID_TIMEOUT_S``, ``CGRID_RETRY_DELAY_S``, ``CGRID_BUYER_MAX_CONCURRENCY``,
``CGRID_EVENT_MAX_AGE_S``; no encryption). A file that cannot be used is refused with a
message naming the line and the key; :class:`BuyersFile` then keeps the last good one.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

from cgrid.errors import ConfigError
from cgrid.price_crypto import PriceCryptoError, PriceKeys

if TYPE_CHECKING:
    from cgrid.settings import Settings

KEYS = ("paused", "timeout_s", "retry_delay_s", "max_concurrency", "max_age_s",
        "price_encryption_key", "price_integrity_key")
TIMEOUT_MAX_S = 60.0


@dataclass(frozen=True)
class BuyerSettings:
    """One buyer's overrides; None means "the fleet's default"."""

    paused: bool = False
    timeout_s: float | None = None
    retry_delay_s: float | None = None
    max_concurrency: int | None = None
    max_age_s: float | None = None
    price_keys: PriceKeys | None = field(default=None, repr=False)  # never printed


DEFAULT_BUYER = BuyerSettings()


@dataclass(frozen=True)
class BuyersConfig:
    buyers: Mapping[str, BuyerSettings] = field(default_factory=dict)

    def get(self, buyer: str | None) -> BuyerSettings:
        return self.buyers.get(buyer or "", DEFAULT_BUYER)

    @cached_property
    def longest_timeout_s(self) -> float:
        """The longest deadline any buyer sets (0 when none does): the attempt lease covers it."""
        return max((b.timeout_s or 0.0 for b in self.buyers.values()), default=0.0)


def _line_of(text: str, buyer: str, key: str | None) -> int | None:
    """The line of ``key`` in ``[buyers.<buyer>]`` (or of the table itself)."""
    header = re.compile(r"^\s*\[\s*buyers\s*\.\s*(\"?)" + re.escape(buyer) + r"\1\s*\]")
    in_table = False
    for number, line in enumerate(text.splitlines(), start=1):
        if header.match(line):
            if key is None:
                return number
            in_table = True
        elif in_table and line.lstrip().startswith("["):
            in_table = False
        elif in_table and key is not None and re.match(r"\s*\"?" + re.escape(key) + r"\"?\s*=", line):
            return number
    return None


def _number(value: Any, *, integer: bool = False) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if integer and not isinstance(value, int):
        return None
    return float(value) if math.isfinite(value) else None


def parse_buyers(text: str, source: str = "buyers file", *, max_retry_delay_s: float = math.inf,
                 max_age_limit_s: float = math.inf) -> BuyersConfig:
    """Validate the whole file; raises :class:`ConfigError` naming the line and the key."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: not valid TOML: {e}") from None
    unknown_top = [key for key in data if key != "buyers"]
    if unknown_top:
        raise ConfigError(f"{source}: unknown top-level key {unknown_top[0]!r} (only [buyers.<id>] tables)")
    tables = data.get("buyers", {})
    if not isinstance(tables, dict):
        raise ConfigError(f"{source}: 'buyers' must be tables, [buyers.<id>]")
    buyers: dict[str, BuyerSettings] = {}
    for buyer, table in tables.items():

        def fail(key: str | None, reason: str, buyer: str = buyer) -> ConfigError:
            line = _line_of(text, buyer, key)
            where = f"line {line}: " if line else ""
            name = f"buyers.{buyer}" + (f".{key}" if key else "")
            return ConfigError(f"{source}: {where}{name}: {reason}")

        if not isinstance(table, dict):
            raise fail(None, "must be a table of settings")
        if not buyer or len(buyer) > 128 or not all(" " <= ch <= "~" for ch in buyer):
            raise fail(None, "a buyer id is 1 to 128 printable ASCII characters")
        for key in table:
            if key not in KEYS:
                raise fail(key, f"unknown key (known: {', '.join(KEYS)})")
        paused = table.get("paused", False)
        if not isinstance(paused, bool):
            raise fail("paused", "must be true or false")
        timeout_s = table.get("timeout_s")
        if timeout_s is not None and not (_number(timeout_s) and 0 < timeout_s <= TIMEOUT_MAX_S):
            raise fail("timeout_s", f"must be a number of seconds above 0, at most {TIMEOUT_MAX_S:g}")
        retry_delay_s = table.get("retry_delay_s")
        if retry_delay_s is not None and not (_number(retry_delay_s) is not None
                                              and 0 <= retry_delay_s < max_retry_delay_s):
            raise fail("retry_delay_s", f"must be a number of seconds, 0 or more, below {max_retry_delay_s:g} "
                                        "(CGRID_VISIBILITY_TIMEOUT_S)")
        max_concurrency = table.get("max_concurrency")
        if max_concurrency is not None and not (_number(max_concurrency, integer=True) and max_concurrency >= 1):
            raise fail("max_concurrency", "must be a whole number, 1 or more")
        max_age_s = table.get("max_age_s")
        if max_age_s is not None and not (_number(max_age_s) and 1 <= max_age_s < max_age_limit_s):
            raise fail("max_age_s", f"must be a number of seconds, 1 or more, below {max_age_limit_s:g} "
                                    "(CGRID_LEDGER_TTL_S: the record must outlive the wait)")
        keys = None
        encryption, integrity = table.get("price_encryption_key"), table.get("price_integrity_key")
        if (encryption is None) != (integrity is None):
            missing = "price_integrity_key" if integrity is None else "price_encryption_key"
            raise fail(missing, "is missing: price encryption needs both keys")
        if encryption is not None and integrity is not None:
            try:
                keys = PriceKeys.from_web_safe(encryption, integrity)
            except PriceCryptoError as e:
                key = str(e).split(":", 1)[0]
                raise fail(key, str(e).split(": ", 1)[1]) from None
        buyers[buyer] = BuyerSettings(paused, None if timeout_s is None else float(timeout_s),
                                      None if retry_delay_s is None else float(retry_delay_s),
                                      max_concurrency, None if max_age_s is None else float(max_age_s), keys)
    return BuyersConfig(buyers)


def load_buyers(path: str, *, max_retry_delay_s: float = math.inf, max_age_limit_s: float = math.inf) -> BuyersConfig:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"CGRID_BUYERS_FILE: cannot read {path!r}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        line = text_line_of_byte(path, e.start)
        raise ConfigError(f"{path}: line {line}: not UTF-8 (byte {e.start})") from None
    return parse_buyers(text, path, max_retry_delay_s=max_retry_delay_s, max_age_limit_s=max_age_limit_s)


def text_line_of_byte(path: str, offset: int) -> int:
    try:
        with open(path, "rb") as f:
            return f.read(offset).count(b"\n") + 1
    except OSError:
        return 0


class BuyersFile:
    """The buyers file of one process, re-read when it changes (``maybe_reload``), or when
    asked (``reload``, on SIGHUP). A broken new version is reported and the last good one
    stays in force."""

    @classmethod
    def for_settings(cls, settings: Settings) -> BuyersFile:
        """The file ``CGRID_BUYERS_FILE`` names, checked against the settings it must fit."""
        return cls(settings.buyers_file, max_retry_delay_s=settings.visibility_timeout_s,
                   max_age_limit_s=settings.ledger_ttl_s)

    def __init__(self, path: str, *, max_retry_delay_s: float = math.inf, max_age_limit_s: float = math.inf) -> None:
        self.path = path
        self.max_retry_delay_s = max_retry_delay_s
        self.max_age_limit_s = max_age_limit_s
        self.config = BuyersConfig()
        self._stamp: tuple[int, int, int] | None = None
        self.last_error: str | None = None
        if path:
            self.config = load_buyers(path, max_retry_delay_s=max_retry_delay_s,
                                      max_age_limit_s=max_age_limit_s)  # refused at start if broken
            self._stamp = self._file_stamp()

    def _file_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def maybe_reload(self) -> bool:
        """Re-read the file if it changed; True when a new version took effect."""
        if not self.path or self._file_stamp() == self._stamp:
            return False
        return self.reload()

    def reload(self) -> bool:
        if not self.path:
            return False
        stamp = self._file_stamp()
        try:
            config = load_buyers(self.path, max_retry_delay_s=self.max_retry_delay_s,
                                 max_age_limit_s=self.max_age_limit_s)
        except Exception as e:  # whatever is wrong with a new version, the last good one stays
            self._stamp = stamp  # report a broken version once, not every second
            self.last_error = str(e) if isinstance(e, ConfigError) else f"{self.path}: {e!r}"
            return False
        self._stamp = stamp
        self.config = config
        self.last_error = None
        return True
