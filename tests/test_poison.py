"""Poisoned messages on the queue are logged, recorded and dropped: the worker survives
and the events behind them are delivered."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis

from cgrid.broker import DELIVER_TASK, make_celery
from cgrid.ledger import POISON_COUNT_KEY, POISON_LIST_KEY, Ledger
from cgrid.redis_server import RedisServer, free_port
from cgrid.settings import Settings
from ops.mock_dsp import MockDspServer
from producer import Publisher
from tests.helpers import WorkerProcess, fleet_env, scrape, wait_for

pytestmark = pytest.mark.integration

RAW_POISONS = [
    b"not json at all",
    b'{"a": 1}',
    b"[1, 2]",
    json.dumps({"body": "!!!notbase64", "content-type": "application/json", "headers": {},
                "properties": {"delivery_tag": "x1", "body_encoding": "base64",
                               "delivery_info": {"exchange": "", "routing_key": "cgrid.deliver"}}}).encode(),
    b"x" * (8 * 1024 * 1024),  # giant
]


@pytest.mark.parametrize("pool", ["prefork", "solo"])
def test_poisoned_messages_do_not_wedge_the_worker(
    pool: str, redis_server: RedisServer, dsp: MockDspServer, tmp_path: Path
) -> None:
    metrics_port = free_port()
    env = fleet_env(redis_server.url, CGRID_METRICS_PORT=metrics_port)
    client = redis.Redis.from_url(redis_server.url)
    client.delete(POISON_COUNT_KEY, POISON_LIST_KEY)
    worker = WorkerProcess(env, tmp_path / "worker.log", pool=pool, name=f"poison-{pool}").start()
    try:
        settings = Settings.from_env(env)
        sender = make_celery(settings, name="test-sender")
        # A corrupt ledger record: the event JSON itself is garbage.
        ledger = Ledger(client)
        with Publisher(settings, linger_ms=0) as publisher:
            publisher.publish({"id": f"corrupt-{pool}", "kind": "burl", "upstream": "s2s",
                               "url": f"{dsp.url}/?e=corrupt"})
        client.hset(f"cgrid:ev:corrupt-{pool}", "event", "{broken")
        client.lpush("cgrid.deliver", f"stray-{pool}")  # a bare string pushed by mistake
        for item in RAW_POISONS:
            client.lpush("cgrid.deliver", item)
        sender.send_task(DELIVER_TASK, args=["not-a-list", 7, "x"])
        sender.send_task(DELIVER_TASK, args=[[f"corrupt-{pool}"], 1, 0.0])
        sender.send_task("cgrid.no_such_task", args=[])
        good = [f"good-{pool}-{i}" for i in range(5)]
        with Publisher(settings) as publisher:
            publisher.publish_many([{"id": i, "kind": "burl", "upstream": "s2s", "url": f"{dsp.url}/?e={i}"}
                                    for i in good])
        wait_for(lambda: all((ledger.record(i) or {}).get("state") == "delivered" for i in good), 30,
                 "the events behind the poison to be delivered")
        assert worker.process is not None and worker.process.poll() is None, "the worker died"
        corrupt = wait_for(lambda: (r := ledger.record(f"corrupt-{pool}")) and r["state"] == "rejected" and r,
                           30, "the corrupt record to be rejected")
        assert "event" in corrupt["reason"]
        # 5 raw poisons + the stray "poke" string + bad task arguments, each recorded.
        wait_for(lambda: ledger.poisoned() >= 7, 10, "poison to be recorded")
        reasons = [json.loads(e)["reason"] for e in client.lrange(POISON_LIST_KEY, 0, -1)]
        assert any(r.startswith("task arguments: ids") for r in reasons)
        assert "Unrecoverable error" not in worker.log_text()
        # The metric counts each one, from whichever process dropped it (prefork: the task's child too).
        wait_for(lambda: scrape(metrics_port)["cgrid_poisoned_messages_total"] == ledger.poisoned() >= 7, 10,
                 "cgrid_poisoned_messages_total to match the poison recorded in Redis")
    finally:
        worker.stop()
