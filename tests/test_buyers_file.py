"""The buyers file (CGRID_BUYERS_FILE): validation naming line and key, defaults, reload
keeping the last good version."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cgrid.buyers import BuyersFile, parse_buyers
from cgrid.errors import ConfigError

KEYS = ('price_encryption_key = "skU7Ax_NL5pPAFyKdkfZjZz2-VhIN8bjj1rVFOaJ_5o="\n'
        'price_integrity_key = "arO23ykdNqUQ5LEoQ0FVmPkBd7xB5CO89PDZlSjpFxo="\n')
GOOD = f"""
[buyers.dsp-42]
paused = false
timeout_s = 1.5
retry_delay_s = 30
max_concurrency = 50
max_age_s = 3600
{KEYS}
[buyers."dsp 7"]
paused = true
"""


def test_a_full_file_is_read_and_other_buyers_take_the_defaults() -> None:
    config = parse_buyers(GOOD)
    dsp = config.get("dsp-42")
    assert (dsp.paused, dsp.timeout_s, dsp.retry_delay_s, dsp.max_concurrency, dsp.max_age_s) == (
        False, 1.5, 30.0, 50, 3600.0)
    assert dsp.price_keys is not None and len(dsp.price_keys.encryption_key) == 32
    assert config.get("dsp 7").paused
    other = config.get("unknown")
    assert (other.paused, other.timeout_s, other.price_keys) == (False, None, None)
    assert "price_keys" not in repr(dsp) or "skU7" not in repr(dsp)  # keys never printed


@pytest.mark.parametrize(("text", "expected"), [
    ("[buyers.a]\ntimeout_s = 0\n", "line 2: buyers.a.timeout_s: must be a number"),
    ("[buyers.a]\npaused = 1\n", "line 2: buyers.a.paused: must be true or false"),
    ("[buyers.a]\n\nmax_concurrency = 2.5\n", "line 3: buyers.a.max_concurrency: must be a whole number"),
    ("[buyers.a]\nmax_age_s = -1\n", "line 2: buyers.a.max_age_s"),
    ("[buyers.a]\nretry_delay_s = \"soon\"\n", "line 2: buyers.a.retry_delay_s"),
    ("[buyers.a]\ntimout_s = 1\n", "line 2: buyers.a.timout_s: unknown key"),
    ("[buyers.a]\nprice_encryption_key = \"skU7Ax_NL5pPAFyKdkfZjZz2-VhIN8bjj1rVFOaJ_5o=\"\n",
     "buyers.a.price_integrity_key: is missing"),
    ("[buyers.a]\nprice_encryption_key = \"a+b/\"\n"
     "price_integrity_key = \"arO23ykdNqUQ5LEoQ0FVmPkBd7xB5CO89PDZlSjpFxo\"\n",
     "line 2: buyers.a.price_encryption_key: is standard base64"),
    ("[buyers.a]\ntimeout_s = \n", "not valid TOML"),
    ("[sellers.a]\n", "unknown top-level key 'sellers'"),
])
def test_a_broken_file_is_refused_naming_line_and_key(text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_buyers(text, "buyers.toml")
    assert expected in str(info.value)
    assert str(info.value).startswith("buyers.toml: ")


def test_a_broken_new_version_keeps_the_last_good_one(tmp_path: Path) -> None:
    path = tmp_path / "buyers.toml"
    path.write_text("[buyers.a]\nmax_concurrency = 5\n")
    watched = BuyersFile(str(path))
    assert watched.config.get("a").max_concurrency == 5
    assert not watched.maybe_reload()  # unchanged
    path.write_text("[buyers.a]\nmax_concurrency = 0\n")
    os.utime(path, ns=(1, 1))  # a new stamp even within the same clock tick
    assert not watched.maybe_reload()
    assert watched.config.get("a").max_concurrency == 5 and "max_concurrency" in (watched.last_error or "")
    path.write_text("[buyers.a]\nmax_concurrency = 7\npaused = true\n")
    assert watched.maybe_reload()
    assert watched.config.get("a").max_concurrency == 7 and watched.config.get("a").paused
    assert watched.last_error is None


def test_an_unreadable_file_at_start_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="CGRID_BUYERS_FILE: cannot read"):
        BuyersFile(str(tmp_path / "missing.toml"))


def test_a_new_version_that_is_not_utf8_is_refused_and_the_last_good_one_stays(tmp_path: Path) -> None:
    path = tmp_path / "buyers.toml"
    path.write_text("[buyers.a]\nmax_concurrency = 5\n")
    watched = BuyersFile(str(path))
    path.write_bytes(b"[buyers.a]\n# caf\xe9\nmax_concurrency = 7\n")
    os.utime(path, ns=(2, 2))
    assert not watched.maybe_reload()
    assert watched.config.get("a").max_concurrency == 5 and "line 2: not UTF-8" in (watched.last_error or "")


def test_a_maximum_age_must_stay_within_the_ledger_window() -> None:
    with pytest.raises(ConfigError, match="max_age_s: must be a number of seconds, 1 or more, below 3600"):
        parse_buyers("[buyers.a]\nmax_age_s = 7200\n", max_age_limit_s=3600)
