"""The reconciliation report is exact under concurrency: parallel workers, thousands of
events of every outcome, and the report compared with the ledger, record by record."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections import Counter as Tally
from pathlib import Path
from typing import Any

import pytest
import redis

from cgrid.ledger import Ledger, bucket_percentile, day_of, latency_bucket
from cgrid.settings import Settings
from ops.mock_dsp import MockDspServer
from producer import Publisher
from tests.helpers import ROOT, WorkerProcess, fleet_env, wait_for

pytestmark = pytest.mark.integration

N = 2400
TERMINAL = {"delivered", "failed", "rejected", "expired"}


def expected_rows(records: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    buckets: dict[tuple[str, str], Tally[str]] = {}
    for r in records:
        event = r["event"]
        key = (day_of(event["created_at"]), event.get("buyer", "-"))
        row = rows.setdefault(key, Tally())
        row["events"] += 1
        state, attempts = r["state"], r["attempts"]
        if state == "delivered":
            row["delivered_retry" if len(attempts) == 2 else "delivered_first"] += 1
        else:
            row[state] += 1
        row["unexpected"] += sum(1 for a in attempts if a.get("unexpected_status"))
        for a in attempts:
            if a.get("ms") is not None:
                buckets.setdefault(key, Tally())[latency_bucket(a["ms"])] += 1
    out = {}
    for key, row in rows.items():
        counts = dict(buckets.get(key, {}))
        out[key] = {c: row[c] for c in ("events", "delivered_first", "delivered_retry", "failed", "rejected",
                                        "expired", "unexpected")}
        out[key].update(calls_timed=sum(counts.values()), p50_ms=bucket_percentile(counts, 0.5),
                        p99_ms=bucket_percentile(counts, 0.99))
    return out


def test_the_report_matches_the_ledger_under_parallel_workers(
    redis_url: str, dsp: MockDspServer, tmp_path: Path
) -> None:
    buyers_file = tmp_path / "buyers.toml"
    buyers_file.write_text("[buyers.stale]\nmax_age_s = 1\n")
    env = fleet_env(redis_url, CGRID_RETRY_DELAY_S="0.3", CGRID_ALLOWED_NETWORKS="127.0.0.1/32",
                    CGRID_BUYERS_FILE=str(buyers_file))
    workers = [WorkerProcess(env, tmp_path / f"w{i}.log", pool=pool, concurrency=2, name=f"r{i}").start()
               for i, pool in enumerate(["solo", "solo", "prefork"])]
    run = uuid.uuid4().hex[:6]
    paths = ["/status/204"] * 6 + ["/status/201", "/status/500", "/sequence/500,204", "/sleep/5"]
    events = []
    for i in range(N):
        event_id = f"{run}-{i}"
        buyer = f"dsp-{i % 5}"
        url = f"{dsp.url}{paths[i % len(paths)]}?e={event_id}"
        event: dict[str, Any] = {"id": event_id, "kind": "burl", "upstream": "s2s", "buyer": buyer, "url": url}
        if i % 37 == 0:
            event["url"] = f"http://127.0.0.2:{dsp.server_address[1]}/?e={event_id}"  # rejected by the guard
        if i % 41 == 0:
            event.update(buyer="stale", created_at=time.time() - 30)  # expired, uncalled
        if i % 53 == 0:
            event.pop("buyer")  # no buyer: reported as "-"
        events.append(event)
    try:
        with Publisher(Settings.from_env(env)) as publisher:
            for start in range(0, N, 200):
                publisher.publish_many(events[start:start + 200])
        ledger = Ledger(redis.Redis.from_url(redis_url))
        ids = [e["id"] for e in events]

        def all_terminal() -> list[dict[str, Any]] | None:
            records = [ledger.record(i) for i in ids]
            return records if all(r and r["state"] in TERMINAL for r in records) else None  # type: ignore[return-value]

        records = wait_for(all_terminal, 120, "every event terminal")
    finally:
        for worker in workers:
            worker.stop()
    states = Tally(r["state"] for r in records)
    assert states["delivered"] and states["failed"] and states["rejected"] and states["expired"], states
    expected = expected_rows(records)
    report = subprocess.run([sys.executable, "-m", "ops.cli", "report", "--json"], capture_output=True,
                            text=True, env=env, cwd=ROOT, timeout=60)
    got = {(row["day"], row["buyer"]): {k: v for k, v in row.items() if k not in ("day", "buyer")}
           for row in json.loads(report.stdout)}
    assert got == expected
    assert sum(row["unexpected"] for row in got.values()) == N // len(paths) - sum(
        1 for i in range(6, N, len(paths)) if i % 37 == 0 or i % 41 == 0)
    csv_out = subprocess.run([sys.executable, "-m", "ops.cli", "report", "--csv", "--buyer", "dsp-1"],
                             capture_output=True, text=True, env=env, cwd=ROOT, timeout=60).stdout.splitlines()
    assert csv_out[0].startswith("day,buyer,events,") and len(csv_out) == 2 and ",dsp-1," in csv_out[1]
