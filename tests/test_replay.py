"""Replay after an outage: failed events go out again as new events <id>:replay<n>, each
with its own call and retry; the original keeps its record; nothing is replayed twice by
accident."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import redis

from cgrid.ledger import Ledger, day_of
from cgrid.settings import Settings
from ops.mock_dsp import MockDspServer
from producer import Publisher
from tests.helpers import ROOT, WorkerProcess, fleet_env, wait_for

pytestmark = pytest.mark.integration


def test_failed_events_are_replayed_once_as_new_events(redis_url: str, dsp: MockDspServer, tmp_path: Path) -> None:
    env = fleet_env(redis_url, CGRID_RETRY_DELAY_S="0.2")
    worker = WorkerProcess(env, tmp_path / "worker.log", pool="solo", concurrency=1).start()
    cli = [sys.executable, "-m", "ops.cli", "replay"]
    run = uuid.uuid4().hex[:6]
    buyer = f"rb-{run}"
    ids = [f"{run}-{i}" for i in range(3)]
    try:
        with Publisher(Settings.from_env(env)) as publisher:
            # The buyer is down for the event's two calls, back for the third (the replay).
            publisher.publish_many([{"id": i, "kind": "burl", "upstream": "s2s", "buyer": buyer,
                                     "url": f"{dsp.url}/sequence/500,500,204?e={i}"} for i in ids])
        ledger = Ledger(redis.Redis.from_url(redis_url))
        wait_for(lambda: all((ledger.record(i) or {}).get("state") == "failed" for i in ids), 20, "failed")
        day = day_of(time.time())
        first = subprocess.run([*cli, "--buyer", buyer, "--day", day], capture_output=True, text=True, env=env,
                               cwd=ROOT, timeout=60)
        assert first.returncode == 0, first.stderr
        assert first.stdout.split() == [f"{i}:replay1" for i in sorted(ids)]
        wait_for(lambda: all((ledger.record(f"{i}:replay1") or {}).get("state") == "delivered" for i in ids), 20,
                 "the replays delivered")
        original = ledger.record(ids[0])
        assert original is not None and original["state"] == "failed" and len(original["attempts"]) == 2
        assert original["replayed_as"] == [f"{ids[0]}:replay1"]
        # The same replay again: nothing is sent twice by accident.
        second = subprocess.run([*cli, "--buyer", buyer, "--day", day], capture_output=True, text=True, env=env,
                                cwd=ROOT, timeout=60)
        assert second.returncode == 0 and second.stdout == "" and "already replayed as" in second.stderr
        not_failed = subprocess.run([*cli, f"{ids[0]}:replay1"], capture_output=True, text=True, env=env, cwd=ROOT)
        assert not_failed.returncode == 1 and "not failed or expired: delivered" in not_failed.stderr
        again = subprocess.run([*cli, ids[0], "--again"], capture_output=True, text=True, env=env, cwd=ROOT)
        assert again.stdout.split() == [f"{ids[0]}:replay2"]
        wait_for(lambda: (ledger.record(f"{ids[0]}:replay2") or {}).get("state") in ("delivered", "failed"), 20,
                 "the second replay decided")
        calls = [c["target"] for c in dsp.log.snapshot() if f"e={run}" in c["target"]]
        assert sorted(calls.count(f"/sequence/500,500,204?e={i}") for i in ids) == [3, 3, 4]
        # Replay ids are not upstream's: an upstream notice under such an id is refused at
        # publish, never taken for a duplicate of the replay (printed, exit 0, not called).
        upstream = subprocess.run([sys.executable, "-m", "ops.cli", "publish"], capture_output=True, text=True,
                                  env=env, cwd=ROOT, timeout=60, input=json.dumps(
                                      {"id": f"{ids[1]}:replay1", "kind": "burl", "upstream": "s2s",
                                       "url": f"{dsp.url}/?e=upstream"}))
        assert upstream.returncode == 1 and upstream.stdout == ""
        assert "line 1: id: must not end in ':replay<n>'" in upstream.stderr
    finally:
        worker.stop()


def test_expired_events_are_replayed_too(redis_url: str, dsp: MockDspServer, tmp_path: Path) -> None:
    """An event that expired uncalled (its buyer down or paused past its maximum age) keeps
    its URL and macros, and replay sends it once its buyer is back."""
    env = fleet_env(redis_url, CGRID_EVENT_MAX_AGE_S="60")
    worker = WorkerProcess(env, tmp_path / "worker.log", pool="solo", concurrency=1).start()
    run = uuid.uuid4().hex[:6]
    buyer = f"xb-{run}"
    ids = [f"{run}-x{i}" for i in range(2)]
    created_at = time.time() - 120  # past the maximum age when its call would start
    try:
        with Publisher(Settings.from_env(env)) as publisher:
            publisher.publish_many([{"id": i, "kind": "burl", "upstream": "s2s", "buyer": buyer,
                                     "created_at": created_at, "macros": {"AUCTION_PRICE": "1.5"},
                                     "url": f"{dsp.url}/status/204?e={i}&p=${{AUCTION_PRICE}}"} for i in ids])
        ledger = Ledger(redis.Redis.from_url(redis_url))
        wait_for(lambda: all((ledger.record(i) or {}).get("state") == "expired" for i in ids), 20, "expired")
        record = ledger.record(ids[0])
        assert record is not None and record["attempts"] == []
        assert record["event"]["url"].startswith(dsp.url) and record["event"]["macros"] == {"AUCTION_PRICE": "1.5"}
        assert "user_agent" not in record["event"]
        assert not [c for c in dsp.log.snapshot() if f"e={run}" in c["target"]]  # never called
        replayed = subprocess.run([sys.executable, "-m", "ops.cli", "replay", "--buyer", buyer,
                                   "--day", day_of(created_at)], capture_output=True, text=True, env=env, cwd=ROOT,
                                  timeout=60)
        assert replayed.returncode == 0, replayed.stderr
        assert replayed.stdout.split() == [f"{i}:replay1" for i in sorted(ids)]
        wait_for(lambda: all((ledger.record(f"{i}:replay1") or {}).get("state") == "delivered" for i in ids), 20,
                 "the replays delivered")
        calls = sorted(c["target"] for c in dsp.log.snapshot() if f"e={run}" in c["target"])
        assert calls == [f"/status/204?e={i}&p=1.5" for i in sorted(ids)]
    finally:
        worker.stop()
