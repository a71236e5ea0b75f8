"""A worker with one task slot keeps it fed: a freed slot takes the next trigger at once.

Under the gevent pool (no longer supported) Celery's consumer left a freed slot empty for
up to two seconds, so a worker with one slot delivered about one batch a second; the
supported pools run Celery's event loop, and this guards against that coming back."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import redis

from cgrid.ledger import Ledger
from cgrid.redis_server import RedisServer
from cgrid.settings import Settings
from ops.mock_dsp import MockDspServer
from producer import Publisher
from tests.helpers import WorkerProcess, fleet_env, wait_for

pytestmark = pytest.mark.integration

BATCHES = 40


@pytest.mark.parametrize("pool", ["solo", "threads"])
def test_one_task_slot_is_refilled_at_once(pool: str, redis_url: str, dsp: MockDspServer, tmp_path: Path,
                                           redis_server: RedisServer) -> None:
    env = fleet_env(redis_url, CGRID_BATCH_SIZE=5)
    worker = WorkerProcess(env, tmp_path / "worker.log", pool=pool, concurrency=1).start()
    try:
        run = uuid.uuid4().hex[:8]
        events = [{"id": f"{run}-{i}", "kind": "nurl", "upstream": "s2s", "url": f"{dsp.url}/status/204?e={i}"}
                  for i in range(BATCHES * 5)]
        with Publisher(Settings.from_env(env)) as publisher:
            ids = publisher.publish_many(events)  # 40 triggers of 5 events
        ledger = Ledger(redis.Redis.from_url(redis_url))

        def all_delivered() -> bool:
            return all((ledger.record(i) or {}).get("state") == "delivered" for i in ids)

        # At one trigger per poll (up to 2 s) this took over a minute; refilled slots take
        # a few seconds. The bound is generous, the difference is not.
        wait_for(all_delivered, 20.0, f"{BATCHES} triggers through one task slot")
    finally:
        worker.stop()
