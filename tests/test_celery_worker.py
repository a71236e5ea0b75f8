"""How the fleet runs Celery's worker (worker/celery_app.py, worker/consumer.py), with the
command line ``make run``, docker-compose and the systemd unit use: the prefetch a solo
worker takes, gossip and mingle off, the reconnect backoff, the warm shutdown's wait."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from cgrid.broker import PREFETCH_PREFORK, make_celery
from cgrid.ledger import Ledger
from cgrid.redis_server import RedisServer
from cgrid.settings import Settings
from ops.mock_dsp import MockDspServer
from producer import Publisher
from tests.helpers import WorkerProcess, fleet_env, wait_for

pytestmark = pytest.mark.integration


def worker_stats(env: dict[str, str], worker: WorkerProcess) -> dict[str, Any]:
    """``celery inspect stats`` of one worker, asked through Redis as the command does."""
    node = f"{worker.name}@{socket.gethostname()}"
    inspect = make_celery(Settings.from_env(env), name="test-inspect").control.inspect(destination=[node], timeout=5)
    stats = wait_for(lambda: (inspect.stats() or {}).get(node), 20, f"inspect stats of {node}")
    return dict(stats)


@pytest.mark.parametrize(("concurrency", "multiplier", "expected"), [
    (None, None, 1),  # as deployed: no -c (Celery's default: the CPU count)
    (4, None, 1),
    (4, 3, 3),  # CGRID_PREFETCH_MULTIPLIER: per task slot, and solo has one
])
def test_a_solo_worker_holds_one_trigger_per_slot_whatever_its_c(
    redis_url: str, tmp_path: Path, concurrency: int | None, multiplier: int | None, expected: int
) -> None:
    """Before: Celery sized a solo worker's prefetch by -c, which defaults to the CPU count
    even for solo (2 here, 16 on a 16-core host) against docs/guarantees.md."""
    env = fleet_env(redis_url, **({"CGRID_PREFETCH_MULTIPLIER": multiplier} if multiplier else {}))
    worker = WorkerProcess(env, tmp_path / "worker.log", pool="solo", concurrency=concurrency,
                           name=f"prefetch-{concurrency}-{multiplier}", as_deployed=True).start()
    try:
        stats = worker_stats(env, worker)
    finally:
        worker.stop()
    assert stats["prefetch_count"] == expected, stats
    assert stats["pool"]["max-concurrency"] == 1


def test_a_prefork_worker_keeps_its_prefetch_per_child(redis_url: str, tmp_path: Path) -> None:
    env = fleet_env(redis_url)
    worker = WorkerProcess(env, tmp_path / "worker.log", pool="prefork", concurrency=2, name="prefetch-prefork",
                           as_deployed=True).start()
    try:
        stats = worker_stats(env, worker)
    finally:
        worker.stop()
    assert stats["prefetch_count"] == 2 * PREFETCH_PREFORK, stats


def test_gossip_and_mingle_are_off_and_heartbeats_on(redis_url: str, tmp_path: Path) -> None:
    """Without the --without-gossip --without-mingle the tests used to pass: a worker started
    as deployed subscribes to no other worker's events (gossip: one pattern subscription and
    three more Redis connections per worker, every heartbeat received by every worker) and
    asks no neighbours at start (mingle: a 1 s wait at every connect). Flower still gets the
    heartbeats."""
    env = fleet_env(redis_url)
    client = redis.Redis.from_url(redis_url)
    worker = WorkerProcess(env, tmp_path / "worker.log", pool="solo", concurrency=None, name="gossip",
                           as_deployed=True).start()
    try:
        time.sleep(1)
        # The one pattern subscription left is remote control's (Flower, celery inspect).
        assert client.pubsub_numpat() == 1
        listener = client.pubsub()
        listener.psubscribe("*celeryev*")
        heartbeat = wait_for(lambda: (m := listener.get_message(timeout=0.5)) and m["type"] == "pmessage"
                             and b"worker.heartbeat" in m["channel"] and m, 20, "a worker heartbeat")
        assert heartbeat
        listener.close()
    finally:
        worker.stop()
    log = worker.log_text()
    assert "mingle" not in log, log


def test_the_consumer_is_back_within_seconds_of_redis(tmp_path: Path, dsp: MockDspServer) -> None:
    """kombu's default backoff between reconnects grows 2 s, 4 s ... to 30 s: after Redis was
    away 21 s the worker tried again only 9 s after it was back. Every reconnect also logged
    "Error on restarting Gossip" and waited a second for mingle."""
    server = RedisServer(tmp_path / "redis").start()
    env = fleet_env(server.url)
    settings = Settings.from_env(env)
    worker = WorkerProcess(env, tmp_path / "worker.log", pool="solo", concurrency=None, name="backoff",
                           as_deployed=True).start()
    try:
        server.stop()
        time.sleep(21)
        server.start()
        back_at = time.monotonic()
        with Publisher(settings, linger_ms=0) as publisher:
            [event_id] = publisher.publish_many([{"kind": "burl", "upstream": "s2s", "url": f"{dsp.url}/?e=back"}])
        ledger = Ledger(redis.Redis.from_url(server.url))
        wait_for(lambda: (ledger.record(event_id) or {}).get("state") == "delivered", 30, "the event delivered")
        took_s = time.monotonic() - back_at
        assert worker.process is not None and worker.process.poll() is None
    finally:
        worker.stop()
        server.stop()
    print(f"delivered {took_s:.1f} s after Redis was back")
    assert took_s < 6, f"the worker took {took_s:.1f} s to come back"
    log = worker.log_text()
    assert "Connection to broker lost" in log
    assert "Error on restarting Gossip" not in log and "mingle" not in log


def test_a_warm_shutdown_waits_for_a_slow_buyers_own_longer_deadline(
    redis_url: str, dsp: MockDspServer, tmp_path: Path
) -> None:
    """The drain at a warm shutdown waits the engine's lease, which covers a buyer's own
    ``timeout_s``; before, it waited the lease of CGRID_TIMEOUT_S (about 3 s here) and cut a
    slow buyer's 8 s call, which then counted as lost and was made again later."""
    buyers = tmp_path / "buyers.toml"
    buyers.write_text("[buyers.slow]\ntimeout_s = 20\n")
    env = fleet_env(redis_url, CGRID_BUYERS_FILE=buyers)
    settings = Settings.from_env(env)
    assert settings.attempt_lease_s < 8 < settings.lease_for(20)
    worker = WorkerProcess(env, tmp_path / "worker.log", pool="solo", name="drain").start()
    try:
        with Publisher(settings, linger_ms=0) as publisher:
            [event_id] = publisher.publish_many([{"kind": "burl", "upstream": "s2s", "buyer": "slow",
                                                  "url": f"{dsp.url}/sleep/8000/204?e=slow"}])
        wait_for(lambda: any("e=slow" in c["target"] for c in dsp.log.snapshot()), 20, "the slow call to start")
        stop_at = time.monotonic()
        worker.stop(timeout_s=60)
        stopped_s = time.monotonic() - stop_at
    finally:
        worker.stop()
    record = Ledger(redis.Redis.from_url(redis_url)).record(event_id)
    assert record is not None and record["state"] == "delivered", record
    assert sum("e=slow" in c["target"] for c in dsp.log.snapshot()) == 1
    assert stopped_s < 40, stopped_s
