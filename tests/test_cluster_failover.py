"""A Redis Cluster primary SIGKILLed while events flow: its replica takes over, the old
primary comes back as a replica. Every event the producer was told was accepted ends, none
is called more than twice, and no event whose call succeeded is called again.

The settings this needs (docs/redis.md): CGRID_REDIS_WAIT_REPLICAS=1 (the default in
cluster mode), so an accept counts only once a replica holds it, and AOF on every node."""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cgrid.errors import RedisUnavailable
from cgrid.ledger.partitions import PartitionedLedger
from cgrid.redis_conn import long_lived_client
from cgrid.redis_server import RedisServer
from cgrid.settings import Settings
from ops.mock_dsp import MockDspServer
from producer import Publisher
from tests.cluster import Cluster
from tests.helpers import WorkerProcess, fleet_env, wait_final, wait_for

pytestmark = pytest.mark.integration
TERMINAL = {"delivered", "failed", "rejected", "expired"}
RUN = uuid.uuid4().hex[:6]


@pytest.fixture()
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path / "cluster", start_port=32000).start()
    yield c
    c.stop()


def test_a_primary_lost_while_events_flow_loses_nothing_and_retries_no_success(
    cluster: Cluster, dsp: MockDspServer, tmp_path: Path
) -> None:
    broker = RedisServer(tmp_path / "broker").start()
    env = fleet_env(cluster.url, CGRID_REDIS_CLUSTER="1", CGRID_BROKER_URL=broker.url,
                    CGRID_REDIS_WAIT_TIMEOUT_MS="500", CGRID_TIMEOUT_S="1", CGRID_RETRY_DELAY_S="1")
    settings = Settings.from_env(env)
    assert settings.redis_wait_replicas == 1  # cluster mode's default
    worker = WorkerProcess(env, tmp_path / "worker.log", pool="solo", name="cluster")
    try:
        worker.start()
        accepted, refused, victim, records = fail_over_while_publishing(cluster, settings, dsp)
    finally:
        worker.stop()
        broker.stop()
    run = RUN
    calls = Counter(call["target"].split("e=", 1)[1] for call in dsp.log.snapshot() if f"e={run}-" in call["target"])
    over_called = {k: v for k, v in calls.items() if v > 2}
    success_retried = {k: v for k, v in calls.items() if int(k.rsplit("-", 1)[1]) % 4 != 0 and v > 1}
    lost = [i for i, r in records.items() if r is None]
    print(f"accepted {len(accepted)}, refused during the failover {refused}, "
          f"states {dict(Counter(r['state'] for r in records.values()))}, most calls for one event "
          f"{max(calls.values())}, success retried {len(success_retried)}")
    assert not lost
    assert not over_called, f"called more than twice: {over_called}"
    assert not success_retried, f"a success called again: {success_retried}"
    assert cluster.node_client(victim).info("replication")["role"] == "slave"


def fail_over_while_publishing(cluster: Cluster, settings: Settings, dsp: MockDspServer
                               ) -> tuple[list[str], int, int, dict[str, dict[str, Any]]]:
    """Publish while a primary is SIGKILLed and comes back; wait until every accepted event
    ended. Returns the accepted ids, how many were refused, the port killed, the records."""
    run = RUN
    accepted: list[str] = []
    refused = 0
    stop = threading.Event()

    def publish_until_stopped() -> None:
        nonlocal refused
        with Publisher(settings, linger_ms=0) as publisher:
            n = 0
            while not stop.is_set():
                # A quarter fail once (e % 4 == 0), so retries run across the failover as well.
                batch = [{"id": f"{run}-{n + i}", "kind": "burl", "upstream": "s2s", "buyer": f"b-{run}",
                          "url": f"{dsp.url}/sequence/{'500,' if (n + i) % 4 == 0 else ''}204?e={run}-{n + i}"}
                         for i in range(12)]
                n += 12
                try:
                    accepted.extend(publisher.publish_many(batch))
                except RedisUnavailable:
                    refused += 12
                    publisher.discard()
                    time.sleep(0.05)
                time.sleep(0.02)

    thread = threading.Thread(target=publish_until_stopped)
    thread.start()
    try:
        wait_for(lambda: len(accepted) >= 300, 60, "events to flow before the failover")
        victim = cluster.primaries()[0]
        cluster.kill(victim)
        wait_for(lambda: victim not in cluster.primaries() and len(cluster.primaries()) == 3, 60,
                 "a replica to take the lost primary's place")
        at_failover = len(accepted)
        cluster.restart(victim)  # it comes back as a replica of its successor
        wait_for(lambda: len(accepted) >= at_failover + 300, 90, "events to be accepted again after the failover")
    finally:
        stop.set()
        thread.join(timeout=60)
    ledger = PartitionedLedger(long_lived_client(settings))
    return accepted, refused, victim, wait_final(ledger, accepted, 120, "every accepted event to end")
