"""Prometheus metrics (CGRID_METRICS_PORT) from a real worker, every pool process summed;
a taken port stops the worker with a clear message."""

from __future__ import annotations

import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import redis

from archive.files import ensure_group
from cgrid.ledger import Ledger
from cgrid.redis_server import free_port
from cgrid.settings import Settings
from ops.mock_dsp import MockDspServer
from producer import Publisher
from tests.helpers import ROOT, WorkerProcess, fleet_env, scrape, wait_for

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("pool", ["solo", "prefork"])
def test_a_worker_serves_delivery_metrics(pool: str, redis_url: str, dsp: MockDspServer, tmp_path: Path) -> None:
    port = free_port()
    env = fleet_env(redis_url, CGRID_METRICS_PORT=port, CGRID_RETRY_DELAY_S="0.2")
    ensure_group(redis.Redis.from_url(redis_url))  # the archive on, no archiver running: its backlog grows
    worker = WorkerProcess(env, tmp_path / "worker.log", pool=pool, concurrency=2).start()
    run = uuid.uuid4().hex[:6]
    try:
        events = [{"id": f"{run}-ok-{i}", "kind": "burl", "upstream": "s2s", "buyer": "m-ok",
                   "url": f"{dsp.url}/status/204?e={i}"} for i in range(20)]
        events += [{"id": f"{run}-bad", "kind": "nurl", "upstream": "s2s", "buyer": "m-bad",
                    "url": f"{dsp.url}/status/500?e=bad"}]
        with Publisher(Settings.from_env(env)) as publisher:
            ids = publisher.publish_many(events)
        ledger = Ledger(redis.Redis.from_url(redis_url))
        wait_for(lambda: all((ledger.record(i) or {}).get("state") in ("delivered", "failed") for i in ids), 20,
                 "all decided")

        def counted() -> dict[str, float] | None:
            values = scrape(port)
            done = values.get('cgrid_events_finished_total{buyer="m-ok",kind="burl",state="delivered"}', 0)
            return values if done == 20 else None

        wait_for(counted, 10, "the metrics to count every delivery")
        def with_gauges() -> dict[str, float] | None:
            values = scrape(port)
            return values if 'cgrid_lane_cap{buyer="m-ok"}' in values else None

        values = wait_for(with_gauges, 10, "the lane gauges")
        assert values['cgrid_attempts_total{buyer="m-bad",kind="nurl",outcome="fail"}'] == 2
        assert values['cgrid_retries_scheduled_total{buyer="m-bad",kind="nurl"}'] == 1
        assert values['cgrid_events_finished_total{buyer="m-bad",kind="nurl",state="failed"}'] == 1
        assert values['cgrid_attempt_duration_seconds_count{buyer="m-ok"}'] == 20
        assert values['cgrid_attempt_duration_seconds_count{buyer="m-bad"}'] == 2
        # publish -> first call: one per event, its retry not counted
        assert values['cgrid_first_attempt_delay_seconds_count{kind="burl"}'] == 20
        assert values['cgrid_first_attempt_delay_seconds_count{kind="nurl"}'] == 1
        assert 0 < values['cgrid_first_attempt_delay_seconds_sum{kind="burl"}'] < 20 * 20
        assert values["cgrid_poisoned_messages_total"] == 0  # exported before the first one
        assert 'cgrid_lane_cap{buyer="m-ok"}' in values  # the lanes' gauges, once a second
        assert 'cgrid_queue_depth{queue="cgrid.deliver"}' in values  # every queue of the routing
        assert 'cgrid_queue_depth{queue="cgrid.retry"}' in values
        assert values['cgrid_queue_stalled_seconds{queue="cgrid.deliver"}'] == 0  # consumed
        wait_for(lambda: scrape(port).get("cgrid_due_events") == 0 and scrape(port).get(
            'cgrid_open_events{kind="burl"}') == 0, 15, "the backlog gauges at 0: nothing waits")
        wait_for(lambda: scrape(port).get("cgrid_archive_backlog") == 21, 15, "21 final records not yet archived")
        assert scrape(port)["cgrid_archive_oldest_seconds"] > 0
        memory = scrape(port)
        assert memory["cgrid_redis_memory_used_bytes"] > 0 and "cgrid_redis_memory_max_bytes" in memory
    finally:
        worker.stop()


def test_a_taken_metrics_port_stops_the_worker_with_a_clear_message(redis_url: str) -> None:
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        env = fleet_env(redis_url, CGRID_METRICS_PORT=taken.getsockname()[1])
        result = subprocess.run([sys.executable, "-m", "celery", "-A", "worker", "worker", "-P", "solo"], cwd=ROOT,
                                env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "CGRID_METRICS_PORT: cannot serve metrics on port" in result.stderr and "Traceback" not in result.stderr


def test_buyer_labels_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Per-buyer series cost memory in every process for good: past the limit, buyers not
    named in the buyers file share one label."""
    from cgrid import metrics

    monkeypatch.setattr(metrics, "_buyer_labels", set())
    monkeypatch.setattr(metrics, "BUYER_LABELS_MAX", 3)
    assert [metrics.buyer_label(f"b{i}") for i in range(5)] == ["b0", "b1", "b2", "-other", "-other"]
    assert metrics.buyer_label("b1") == "b1"  # a buyer keeps its label
    assert metrics.buyer_label("named", named=True) == "named"  # named in the buyers file: always its own
    assert metrics.buyer_label("b9") == "-other"


def test_the_parked_gauge_of_a_buyer_whose_parked_set_drained_reads_0(
        redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from prometheus_client import CollectorRegistry, Gauge

    from cgrid import metrics
    from cgrid.event import parse_event
    from cgrid.ledger import Park
    from worker.sweeper import backlog_gauges

    registry = CollectorRegistry()
    gauges = {name: Gauge(name, name, labels, registry=registry) for name, labels in
              [("due", []), ("parked", ["buyer"]), ("open", ["kind"]), ("backlog", []), ("oldest", []),
               ("used", []), ("max", [])]}
    monkeypatch.setattr(metrics, "M", SimpleNamespace(
        due=gauges["due"], parked_events=gauges["parked"], open_events=gauges["open"],
        archive_backlog=gauges["backlog"], archive_oldest=gauges["oldest"],
        redis_memory_used=gauges["used"], redis_memory_max=gauges["max"]))
    ledger = Ledger(redis.Redis.from_url(redis_url))
    event = parse_event({"id": "p1", "kind": "burl", "upstream": "s2s", "url": "https://d.example/", "buyer": "gone"})
    ledger.accept([event], ledger_ttl_s=60, report_ttl_s=60, redeliver_after_s=60)
    ledger.claim(["p1"], 1, lease_s=10, sent_at_s=0)
    ledger.park([Park("p1", 1, event.created_at_s, "gone")])
    shown = backlog_gauges(ledger)
    assert shown == {"gone"} and registry.get_sample_value("parked", {"buyer": "gone"}) == 1
    ledger.pull("gone", 10, lease_s=10)  # its parked set drains
    assert backlog_gauges(ledger, shown) == set()
    assert registry.get_sample_value("parked", {"buyer": "gone"}) == 0
