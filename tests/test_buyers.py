"""Per-buyer settings at work in the engine (real Redis, real HTTP on loopback): pause and
resume in creation order, price encryption with a fresh IV per call, per-buyer deadline,
retry delay and maximum age, the buyers file re-read on change; decrypt on the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import redis

from cgrid.event import parse_event
from cgrid.ledger import Ledger
from cgrid.price_crypto import PriceKeys, decrypt
from cgrid.settings import Settings
from delivery.engine import DeliveryEngine
from ops.mock_dsp import MockDspServer
from tests.helpers import ROOT, fleet_env, wait_for

pytestmark = pytest.mark.integration

E_KEY, I_KEY = "skU7Ax_NL5pPAFyKdkfZjZz2-VhIN8bjj1rVFOaJ_5o=", "arO23ykdNqUQ5LEoQ0FVmPkBd7xB5CO89PDZlSjpFxo="
KEYS = PriceKeys.from_web_safe(E_KEY, I_KEY)


def make_engine(redis_url: str, buyers_file: Path, **env: Any) -> DeliveryEngine:
    settings = Settings.from_env(fleet_env(redis_url, CGRID_BUYERS_FILE=str(buyers_file), **env))
    return DeliveryEngine(settings, Ledger(redis.Redis.from_url(redis_url)))


def deliver(engine: DeliveryEngine, events: list[dict[str, Any]], attempt_n: int = 1) -> list[str]:
    ledger, settings = engine.ledger, engine.settings
    parsed = [parse_event(e) for e in events]
    if attempt_n == 1:
        ledger.accept(parsed, ledger_ttl_s=3600, report_ttl_s=3600, redeliver_after_s=60)
    ids = [e.id for e in parsed]
    engine.reserve(len(ids))
    parked_buyers: list[str] = []
    claimed = ledger.claim(ids, attempt_n, lease_s=settings.attempt_lease_s, sent_at_s=0, parked_buyers=parked_buyers)
    engine.submit(claimed, attempt_n, reserved=len(ids), parked_buyers=parked_buyers)
    return ids


def states(engine: DeliveryEngine, ids: list[str]) -> list[str]:
    return [engine.ledger.record(i)["state"] for i in ids]  # type: ignore[index]


def rewrite(path: Path, text: str) -> None:
    path.write_text(text)
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 1))


def test_a_paused_buyer_waits_in_redis_and_is_called_in_creation_order_once_resumed(
    redis_url: str, dsp: MockDspServer, tmp_path: Path
) -> None:
    buyers = tmp_path / "buyers.toml"
    buyers.write_text("[buyers.dsp-p]\npaused = true\n")
    engine = make_engine(redis_url, buyers)
    events = [{"id": f"p-{i}", "kind": "burl", "upstream": "s2s", "buyer": "dsp-p", "created_at": 1_800_000_000 - i,
               "url": f"{dsp.url}/?e=p-{i}"} for i in range(5)]  # claimed newest first
    other = {"id": "free-1", "kind": "burl", "upstream": "s2s", "buyer": "dsp-free", "url": f"{dsp.url}/?e=free-1"}
    ids = deliver(engine, [*events, other])
    ledger = engine.ledger
    wait_for(lambda: states(engine, ["free-1"]) == ["delivered"], 10, "the other buyer's event")
    wait_for(lambda: all((ledger.record(i) or {}).get("waiting", {}).get("reason") == "paused" for i in ids[:5]),
             10, "the paused buyer's events parked as paused")
    time.sleep(1.5)
    assert [c["target"] for c in dsp.log.snapshot()] == ["/?e=free-1"]  # not called, not an attempt
    assert all(ledger.record(i)["attempts"] == [] for i in ids[:5])  # type: ignore[index]
    rewrite(buyers, "[buyers.dsp-p]\npaused = false\n")  # resumed: picked up within a second
    wait_for(lambda: states(engine, ids[:5]) == ["delivered"] * 5, 15, "delivered after resume")
    assert len(dsp.log.snapshot()) == 6
    started = sorted(ids[:5], key=lambda i: ledger.record(i)["attempts"][0]["started_at"])  # type: ignore[index]
    assert started == [f"p-{i}" for i in (4, 3, 2, 1, 0)]  # calls started oldest created first


def test_a_buyer_with_keys_gets_the_price_encrypted_with_a_fresh_iv_each_call(
    redis_url: str, dsp: MockDspServer, tmp_path: Path
) -> None:
    buyers = tmp_path / "buyers.toml"
    buyers.write_text(f'[buyers.enc]\nretry_delay_s = 0\nprice_encryption_key = "{E_KEY}"\n'
                      f'price_integrity_key = "{I_KEY}"\n')
    engine = make_engine(redis_url, buyers, CGRID_RETRY_DELAY_S=30)
    clear = {"id": "clear-1", "kind": "burl", "upstream": "s2s", "buyer": "plain", "macros": {"AUCTION_PRICE": 1.25},
             "url": f"{dsp.url}/?e=clear-1&p=${{AUCTION_PRICE}}"}
    enc = {"id": "enc-1", "kind": "burl", "upstream": "s2s", "buyer": "enc", "macros": {"AUCTION_PRICE": "2.5"},
           "url": f"{dsp.url}/status/500?e=enc-1&p=${{AUCTION_PRICE}}"}
    deliver(engine, [clear, enc])
    wait_for(lambda: states(engine, ["enc-1"]) == ["retry_scheduled"], 10, "the first attempt failed")
    # The buyer's own retry delay (0 s) applies, not CGRID_RETRY_DELAY_S (30 s).
    record = engine.ledger.record("enc-1")
    assert record is not None and record["retry_at"] - time.time() < 5
    time.sleep(0.1)
    deliver(engine, [enc], attempt_n=2)
    wait_for(lambda: states(engine, ["enc-1", "clear-1"]) == ["failed", "delivered"], 10, "both decided")
    prices = {c["target"].split("e=")[1].split("&")[0]: [] for c in dsp.log.snapshot()}
    for c in dsp.log.snapshot():
        query = parse_qs(urlsplit(c["target"]).query)
        prices[query["e"][0]].append(query["p"][0])
    assert prices["clear-1"] == ["1.25"]
    first, retry = prices["enc-1"]
    assert len(first) == len(retry) == 38 and first != retry  # a fresh IV for the retry too
    assert decrypt(first, KEYS).micros == decrypt(retry, KEYS).micros == 2_500_000


def test_per_buyer_deadline_and_maximum_age(redis_url: str, dsp: MockDspServer, tmp_path: Path) -> None:
    buyers = tmp_path / "buyers.toml"
    buyers.write_text("[buyers.quick]\ntimeout_s = 0.2\n\n[buyers.fresh]\nmax_age_s = 60\n")
    engine = make_engine(redis_url, buyers, CGRID_TIMEOUT_S=2)
    slow = {"id": "slow-1", "kind": "burl", "upstream": "s2s", "buyer": "quick", "url": f"{dsp.url}/sleep/1000?e=s"}
    old = {"id": "old-1", "kind": "burl", "upstream": "s2s", "buyer": "fresh", "created_at": time.time() - 120,
           "url": f"{dsp.url}/?e=old-1"}
    deliver(engine, [slow, old])
    wait_for(lambda: states(engine, ["slow-1", "old-1"]) == ["retry_scheduled", "expired"], 10, "both decided")
    [attempt] = engine.ledger.record("slow-1")["attempts"]  # type: ignore[index]
    assert attempt["error"] == "timeout" and attempt["ms"] < 1000
    assert "maximum age of 60s" in engine.ledger.record("old-1")["reason"]  # type: ignore[index]
    assert "old-1" not in str(dsp.log.snapshot())


def test_decrypt_on_the_command_line(tmp_path: Path) -> None:
    buyers = tmp_path / "buyers.toml"
    buyers.write_text(f'[buyers.dsp-42]\nprice_encryption_key = "{E_KEY}"\nprice_integrity_key = "{I_KEY}"\n')
    env = fleet_env("redis://127.0.0.1:1/0", CGRID_BUYERS_FILE=str(buyers))
    cli = [sys.executable, "-m", "ops.cli", "decrypt"]
    ok = subprocess.run([*cli, "YWJjMTIzZGVmNDU2Z2hpN7fhCuPemCAWJRxOgA", "--buyer", "dsp-42"], capture_output=True,
                        text=True, env=env, cwd=ROOT)
    assert ok.returncode == 0 and json.loads(ok.stdout)["micros"] == 1900
    bad = subprocess.run([*cli, "YWJjMTIzZGVmNDU2Z2hpN7fhCuPemCAWJRxOlA", "--buyer", "dsp-42"], capture_output=True,
                         text=True, env=env, cwd=ROOT)
    assert bad.returncode == 1 and "signature does not match" in bad.stderr and "Traceback" not in bad.stderr
    none = subprocess.run([*cli, "x", "--buyer", "nobody"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert none.returncode == 1 and "no price keys" in none.stderr


def test_a_real_worker_pauses_resumes_and_reloads_on_sighup(
    redis_url: str, dsp: MockDspServer, tmp_path: Path
) -> None:
    import signal

    from producer import Publisher
    from tests.helpers import WorkerProcess

    buyers = tmp_path / "buyers.toml"
    buyers.write_text("[buyers.dsp-x]\npaused = true\n")
    env = fleet_env(redis_url, CGRID_BUYERS_FILE=str(buyers))
    worker = WorkerProcess(env, tmp_path / "worker.log", pool="solo", concurrency=1).start()
    try:
        with Publisher(Settings.from_env(env)) as publisher:
            publisher.publish({"id": "x-1", "kind": "burl", "upstream": "s2s", "buyer": "dsp-x",
                               "url": f"{dsp.url}/?e=x"})
        ledger = Ledger(redis.Redis.from_url(redis_url))
        wait_for(lambda: (ledger.record("x-1") or {}).get("waiting", {}).get("reason") == "paused", 15, "paused")
        status = subprocess.run([sys.executable, "-m", "ops.cli", "status", "x-1"], capture_output=True,
                                text=True, env=env, cwd=ROOT)
        assert json.loads(status.stdout)["waiting"]["reason"] == "paused"
        loaded = worker.log_text().count("buyers_file_loaded")
        assert worker.process is not None
        worker.process.send_signal(signal.SIGHUP)  # reload now, not Celery's restart
        wait_for(lambda: worker.log_text().count("buyers_file_loaded") > loaded, 10, "a reload on SIGHUP")
        assert worker.process.poll() is None and "Restarting" not in worker.log_text()
        rewrite(buyers, "[buyers.dsp-x]\npaused = false\n")
        wait_for(lambda: (ledger.record("x-1") or {}).get("state") == "delivered", 20, "delivered once resumed")
    finally:
        worker.stop()


def test_a_broken_buyers_file_stops_the_worker_at_start_naming_line_and_key(tmp_path: Path) -> None:
    buyers = tmp_path / "buyers.toml"
    buyers.write_text("[buyers.dsp-1]\n\nmax_concurrency = 0\n")
    env = fleet_env("redis://127.0.0.1:1/0", CGRID_BUYERS_FILE=str(buyers))
    result = subprocess.run([sys.executable, "-m", "celery", "-A", "worker", "worker"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "line 3: buyers.dsp-1.max_concurrency: must be a whole number" in result.stderr


def test_the_lease_covers_the_longest_deadline_of_any_buyer(redis_url: str, tmp_path: Path) -> None:
    buyers = tmp_path / "buyers.toml"
    buyers.write_text("[buyers.slow]\ntimeout_s = 30\n")
    engine = make_engine(redis_url, buyers, CGRID_TIMEOUT_S=2)
    # A buyer's own 30 s deadline must not outlast the lease, or a slow success would be
    # counted lost and retried: two calls for one delivery.
    assert engine.lease_s >= 30 * 2 + engine.settings.attempt_grace_s
    assert engine.settings.attempt_lease_s < 30
