"""Shared triggers (worker/batch.py ``run_shared``): publishers share one trigger per queue
through the ledger's pending list, a backlog is sent on from worker to worker, and
``CGRID_SHARED_TRIGGERS=0`` sends triggers with ids (for workers that take no shared one).
A real ``celery worker``, a private Redis and a recording buyer on loopback."""

from __future__ import annotations

import base64
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis

from cgrid.ledger import Ledger
from cgrid.routing import DELIVER_QUEUE
from cgrid.settings import Settings
from ops.mock_dsp import MockDspServer
from producer import Publisher
from tests.helpers import WorkerProcess, fleet_env, wait_for

pytestmark = pytest.mark.integration


def calls_of(dsp: MockDspServer, event_id: str) -> int:
    return sum(1 for c in dsp.log.snapshot() if c["target"].endswith(f"e={event_id}"))


def trigger_bodies(client: redis.Redis) -> list[list[Any]]:
    """The [args, kwargs, embed] of every trigger waiting on the deliver queue."""
    return [json.loads(base64.b64decode(json.loads(raw)["body"])) for raw in client.lrange(DELIVER_QUEUE, 0, -1)]


def burl(event_id: str, dsp: MockDspServer) -> dict[str, str]:
    return {"id": event_id, "kind": "burl", "upstream": "s2s", "url": f"{dsp.url}/?e={event_id}"}


def test_five_publishers_share_triggers_and_a_backlog_is_sent_on(
        redis_url: str, dsp: MockDspServer, tmp_path: Path) -> None:
    """Five publishers, ten sends each (a trigger apiece before): while no worker runs, the
    first send asks for a trigger and the others add their ids to it. A batch is 5 ids, so
    the worker's claims send the trigger on through the backlog of 50; each event is called
    once."""
    env = fleet_env(redis_url, CGRID_BATCH_SIZE="5")
    client = redis.Redis.from_url(redis_url)
    ledger = Ledger(client)
    run = uuid.uuid4().hex[:8]
    publishers = [Publisher(Settings.from_env(env), linger_ms=0) for _ in range(5)]
    ids = []
    try:
        for n in range(10):
            for p, publisher in enumerate(publishers):
                ids.append(f"shared-{run}-{p}-{n}")
                publisher.publish(burl(ids[-1], dsp))
    finally:
        for publisher in publishers:
            publisher.close()
    bodies = trigger_bodies(client)
    # One, or a few if the sends took longer than a trigger's hold (1 s) on a slow machine.
    assert 1 <= len(bodies) <= 5, bodies
    assert all(args == [[], 1, args[2]] and kwargs == {"shared": 0} for args, kwargs, _ in bodies), bodies
    worker = WorkerProcess(env, tmp_path / "worker.log", pool="solo", name=f"shared-{run}").start()
    try:
        wait_for(lambda: all((ledger.record(i) or {}).get("state") == "delivered" for i in ids), 40,
                 "every event delivered")
        for event_id in ids:
            assert calls_of(dsp, event_id) == 1, event_id
        assert "shared_trigger_not_sent" not in worker.log_text()
    finally:
        worker.stop()
    assert client.llen(f"cgrid:pending:{DELIVER_QUEUE}") == 0


def test_with_shared_triggers_off_each_send_carries_its_ids(redis_url: str, dsp: MockDspServer) -> None:
    """CGRID_SHARED_TRIGGERS=0, for a fleet that still runs workers older than shared triggers."""
    env = fleet_env(redis_url, CGRID_SHARED_TRIGGERS="0")
    client = redis.Redis.from_url(redis_url)
    run = uuid.uuid4().hex[:8]
    ids = [f"ids-{run}-{i}" for i in range(3)]
    with Publisher(Settings.from_env(env), linger_ms=0) as publisher:
        for event_id in ids:
            publisher.publish(burl(event_id, dsp))
    assert [(args[0], kwargs) for args, kwargs, _ in trigger_bodies(client)] == [([i], {}) for i in reversed(ids)]
    assert not client.exists(f"cgrid:pending:{DELIVER_QUEUE}")


def test_a_shared_trigger_lost_on_its_way_is_sent_again_by_the_sweeper_within_seconds(
        redis_url: str, dsp: MockDspServer, tmp_path: Path) -> None:
    """The trigger is gone (a worker killed with it in hand, say) and nothing else is
    published: the sweeper sends one once its hold has passed, long before the 30 s after
    which it would resend the events' triggers one by one."""
    env = fleet_env(redis_url)
    client = redis.Redis.from_url(redis_url)
    ledger = Ledger(client)
    run = uuid.uuid4().hex[:8]
    ids = [f"orphan-{run}-{i}" for i in range(3)]
    with Publisher(Settings.from_env(env), linger_ms=0) as publisher:
        for event_id in ids:
            publisher.publish(burl(event_id, dsp))
    assert client.delete(DELIVER_QUEUE) == 1
    worker = WorkerProcess(env, tmp_path / "worker.log", pool="solo", name=f"orphan-{run}").start()
    try:
        wait_for(lambda: all((ledger.record(i) or {}).get("state") == "delivered" for i in ids), 10,
                 "every event delivered")
        assert "resent_shared_triggers" in worker.log_text()
        assert "resent_lost_triggers" not in worker.log_text()
    finally:
        worker.stop()
