"""Focused faults: a worker killed mid-call, a warm shutdown, and settings that would break
the guarantees."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import redis

from cgrid.broker import PREFETCH_PREFORK
from cgrid.ledger import Ledger
from cgrid.redis_server import RedisServer
from cgrid.routing import DELIVER_QUEUE
from cgrid.settings import Settings
from ops.mock_dsp import MockDspServer
from producer import Publisher
from tests.helpers import ROOT, WorkerProcess, fleet_env, wait_for

pytestmark = pytest.mark.integration


def calls_for(dsp: MockDspServer, event_id: str) -> list[float]:
    return [c["t"] for c in dsp.log.snapshot() if c["target"].endswith(f"e={event_id}")]


def test_worker_killed_mid_call_counts_as_a_failed_attempt_and_retries_once(
    redis_server: RedisServer, dsp: MockDspServer, tmp_path: Path
) -> None:
    env = fleet_env(redis_server.url, CGRID_TIMEOUT_S="3", CGRID_ATTEMPT_GRACE_S="1")
    ledger = Ledger(redis.Redis.from_url(redis_server.url))
    event_id = f"killed-{uuid.uuid4().hex[:8]}"
    first = WorkerProcess(env, tmp_path / "w1.log", name="victim").start()
    try:
        with Publisher(Settings.from_env(env)) as publisher:
            # The buyer answers after 2 s; the worker is killed while it waits.
            publisher.publish({"id": event_id, "kind": "burl", "upstream": "s2s",
                               "url": f"{dsp.url}/sleep/2000?e={event_id}"})
        wait_for(lambda: (ledger.record(event_id) or {}).get("in_flight_attempt") == 1, 20, "attempt 1 in flight")
        # Killed mid-call: once the buyer has the request (on a loaded machine the claim can
        # come well before the call).
        wait_for(lambda: calls_for(dsp, event_id), 20, "the buyer to receive the call")
        first.signal(signal.SIGKILL)
    finally:
        first.stop()
    second = WorkerProcess(env, tmp_path / "w2.log", name="rescuer").start()
    try:
        record = wait_for(lambda: (r := ledger.record(event_id)) and r["state"] == "delivered" and r, 30,
                          "delivered by the retry")
        assert [a["error"] for a in record["attempts"]] == ["lost", None]
        assert record["attempts"][1]["status"] == 204
        assert len(calls_for(dsp, event_id)) == 2  # the interrupted call, and the one retry
    finally:
        second.stop()


def test_warm_shutdown_finishes_or_hands_back_in_flight_work(
    redis_server: RedisServer, dsp: MockDspServer, tmp_path: Path
) -> None:
    env = fleet_env(redis_server.url, CGRID_TIMEOUT_S="3", CGRID_BATCH_SIZE="5", CGRID_LINGER_MS="1")
    ledger = Ledger(redis.Redis.from_url(redis_server.url))
    run = uuid.uuid4().hex[:8]
    ids = [f"warm-{run}-{i}" for i in range(40)]
    first = WorkerProcess(env, tmp_path / "w1.log", name="leaving").start()
    with Publisher(Settings.from_env(env)) as publisher:
        publisher.publish_many([{"id": i, "kind": "burl", "upstream": "s2s", "url": f"{dsp.url}/sleep/300?e={i}"}
                                for i in ids])
    wait_for(lambda: any(calls_for(dsp, i) for i in ids), 20, "the first calls")
    first.terminate()  # warm shutdown while calls are in flight
    assert first.process is not None
    # Usually seconds; once a task that finished at the instant of the SIGTERM held the
    # shutdown 31 s (Celery does not ack it and restores its message, which is harmless:
    # its ids are claimed). The bound is generous; the checks below are the point.
    first.process.wait(timeout=75)
    first.stop()
    second = WorkerProcess(env, tmp_path / "w2.log", name="arriving").start()
    try:
        wait_for(lambda: all((ledger.record(i) or {}).get("state") == "delivered" for i in ids), 60,
                 "every event delivered")
        for event_id in ids:
            record = ledger.record(event_id)
            assert record is not None and len(record["attempts"]) == 1, record
            assert len(calls_for(dsp, event_id)) == 1, event_id
    finally:
        second.stop()


def test_warm_shutdown_puts_the_triggers_it_held_back_on_their_queue(
    redis_server: RedisServer, dsp: MockDspServer, tmp_path: Path
) -> None:
    """kombu's ack emulation is off (cgrid/broker.py): a prefork worker holds the triggers it
    prefetched in memory only (Redis has no ``unacked`` copy), and a warm shutdown gives the
    ones it had not started back to their queue. Here its one child waits for room in its
    engine (one call at a time, each 1.5 s) while the parent holds the other triggers."""
    # (a trigger per event: shared triggers off)
    env = fleet_env(redis_server.url, CGRID_TIMEOUT_S="3", CGRID_BATCH_SIZE="1", CGRID_CALL_CONCURRENCY="1",
                    CGRID_SHARED_TRIGGERS="0")
    client = redis.Redis.from_url(redis_server.url)
    ledger = Ledger(client)
    run = uuid.uuid4().hex[:8]
    ids = [f"held-{run}-{i}" for i in range(12)]
    first = WorkerProcess(env, tmp_path / "w1.log", pool="prefork", concurrency=1, name="holding").start()
    with Publisher(Settings.from_env(env), linger_ms=0) as publisher:
        for event_id in ids:  # a trigger each
            publisher.publish({"id": event_id, "kind": "burl", "upstream": "s2s",
                               "url": f"{dsp.url}/sleep/1500?e={event_id}"})
    wait_for(lambda: client.llen(DELIVER_QUEUE) <= len(ids) - 1 - PREFETCH_PREFORK, 20,
             "the worker to take its prefetch")
    wait_for(lambda: any(calls_for(dsp, i) for i in ids), 20, "the first call")
    assert not client.exists("unacked", "unacked_index"), "kombu copied a message into Redis"
    first.terminate()  # warm shutdown
    assert first.process is not None
    first.process.wait(timeout=75)
    first.stop()
    pending = [i for i in ids if (ledger.record(i) or {}).get("state") == "pending"]
    assert pending, "every event was claimed before the shutdown: the test did not hold triggers"
    assert client.llen(DELIVER_QUEUE) >= len(pending), "a held trigger was not given back"
    second = WorkerProcess(env, tmp_path / "w2.log", pool="solo", name="after").start()
    try:
        wait_for(lambda: all((ledger.record(i) or {}).get("state") == "delivered" for i in ids), 60,
                 "every event delivered")
        for event_id in ids:
            assert len(calls_for(dsp, event_id)) == 1, event_id
    finally:
        second.stop()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"CGRID_RETRY_DELAY_S": "4000"}, "CGRID_RETRY_DELAY_S"),
        ({"CGRID_TIMEOUT_S": "100", "CGRID_VISIBILITY_TIMEOUT_S": "60"}, "CGRID_VISIBILITY_TIMEOUT_S"),
        ({"CGRID_TIMEOUT_S": "fast"}, "CGRID_TIMEOUT_S"),
        ({"CGRID_ALLOWED_NETWORKS": "10.0.0.0/33"}, "CGRID_ALLOWED_NETWORKS"),
    ],
)
def test_worker_refuses_to_start_with_settings_that_break_the_guarantees(
    overrides: dict[str, str], message: str
) -> None:
    env = fleet_env("redis://127.0.0.1:1/0", **overrides)
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "celery", "-A", "worker", "worker"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "cgrid-s2s: configuration error: " in result.stderr and message in result.stderr
    assert "Traceback" not in result.stderr
    assert time.monotonic() - started < 30


def test_the_gevent_pool_is_refused_with_a_clear_message() -> None:
    # The calls are made by each process's libcurl loop in a thread of its own; green
    # threads would only block that loop's hub.
    env = fleet_env("redis://127.0.0.1:1/0")
    result = subprocess.run([sys.executable, "-m", "celery", "-A", "worker", "worker", "-P", "gevent"], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "the gevent pool is not supported" in result.stderr and "-P solo" in result.stderr
    assert "Traceback" not in result.stderr
