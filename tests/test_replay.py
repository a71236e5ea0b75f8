"""Replay after an outage: failed events go out again as new events <id>:replay<n>, each
with its own call and retry; the original keeps its record; nothing is replayed twice by
accident."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import redis

from cgrid.ledger import Ledger, day_of
from cgrid.settings import Settings
from producer import Publisher
from producer.mock_dsp import MockDspServer
from tests.helpers import ROOT, WorkerProcess, fleet_env, wait_for

pytestmark = pytest.mark.integration


def test_failed_events_are_replayed_once_as_new_events(redis_url: str, dsp: MockDspServer, tmp_path: Path) -> None:
    env = fleet_env(redis_url, CGRID_RETRY_DELAY_S="0.2")
    worker = WorkerProcess(env, tmp_path / "worker.log", pool="solo", concurrency=1).start()
    cli = [sys.executable, "-m", "producer.cli", "replay"]
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
        assert not_failed.returncode == 1 and "not failed: delivered" in not_failed.stderr
        again = subprocess.run([*cli, ids[0], "--again"], capture_output=True, text=True, env=env, cwd=ROOT)
        assert again.stdout.split() == [f"{ids[0]}:replay2"]
        wait_for(lambda: (ledger.record(f"{ids[0]}:replay2") or {}).get("state") in ("delivered", "failed"), 20,
                 "the second replay decided")
        calls = [c["target"] for c in dsp.log.snapshot() if f"e={run}" in c["target"]]
        assert sorted(calls.count(f"/sequence/500,500,204?e={i}") for i in ids) == [3, 3, 4]
    finally:
        worker.stop()
