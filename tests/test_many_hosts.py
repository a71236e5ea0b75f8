"""Many hosts, one broker (docs/hosts.md): workers started as separate process groups with
distinct node names, some dedicated to a queue with -Q, share the work; the guarantees hold
when one group is SIGKILLed midway. Real redis-server, real `celery worker` processes, a
real HTTP buyer on loopback."""

from __future__ import annotations

import json
import signal
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import redis

from cgrid.broker import make_celery
from cgrid.ledger import TERMINAL_STATES, Ledger
from cgrid.settings import Settings
from ops.mock_dsp import MockDspServer
from producer import Publisher
from tests.helpers import WorkerProcess, fleet_env, wait_for

pytestmark = pytest.mark.integration

ROUTING = {"CGRID_BUYER_QUEUES": "cgrid.big=dsp-big"}
PLAIN_BUYERS = ["dsp-1", "dsp-2", "dsp-3", "dsp-4"]


def make_events(dsp: MockDspServer, run: str, n: int, *, fail_every: int, sleep_ms: int = 0,
                big_every: int = 5) -> list[dict[str, Any]]:
    """``n`` events: every ``big_every``-th for the grouped buyer; every ``fail_every``-th
    answered 500 on its first call and 204 on its second (none if 0)."""
    events = []
    for i in range(n):
        event_id = f"{run}-{i}"
        buyer = "dsp-big" if i % big_every == 0 else PLAIN_BUYERS[i % len(PLAIN_BUYERS)]
        path = f"/sleep/{sleep_ms}" if sleep_ms else "/ok"
        if fail_every and i % fail_every == 1:
            path = "/sequence/500,204"
        events.append({"id": event_id, "kind": "burl", "upstream": "s2s", "buyer": buyer,
                       "url": f"{dsp.url}{path}?e={event_id}"})
    return events


def publish_paced(settings: Settings, events: list[dict[str, Any]], per_s: float) -> None:
    """Publish at about ``per_s`` events per second, so triggers reach idle workers."""
    with Publisher(settings) as publisher:
        for start in range(0, len(events), 10):
            publisher.publish_many(events[start:start + 10])
            time.sleep(10 / per_s)


def calls_per_event(dsp: MockDspServer) -> Counter[str]:
    return Counter(c["target"].split("e=", 1)[1] for c in dsp.log.snapshot() if "e=" in c["target"])


def settled(ledger: Ledger, ids: list[str], timeout_s: float) -> dict[str, dict[str, Any]]:
    def all_terminal() -> dict[str, dict[str, Any]] | None:
        records = {i: ledger.record(i) for i in ids}
        if all(r is not None and r["state"] in TERMINAL_STATES for r in records.values()):
            return records  # type: ignore[return-value]
        return None

    return wait_for(all_terminal, timeout_s, "every event in a terminal state")


def failed(attempt: dict[str, Any]) -> bool:
    return attempt.get("error") is not None or attempt.get("status") is None or attempt["status"] >= 400


def check_guarantees(records: dict[str, dict[str, Any]], calls: Counter[str]) -> None:
    """Every event terminal; never more than two calls; one retry for each failed first
    attempt and none after a success; the buyer's calls agree with the ledger's attempts."""
    for event_id, record in records.items():
        attempts = record["attempts"]
        assert record["state"] in TERMINAL_STATES, record
        assert 1 <= calls[event_id] <= 2, (event_id, calls[event_id], record)
        assert len(attempts) == (2 if failed(attempts[0]) else 1), record  # the retry: exactly one
        answered = sum(1 for a in attempts if a.get("status") is not None)
        assert answered <= calls[event_id] <= len(attempts), (event_id, calls[event_id], record)
        assert record["state"] == "delivered" and not failed(attempts[-1]), record


def attempts_logged(worker: WorkerProcess) -> list[dict[str, Any]]:
    """The worker's log lines, one per attempt it made (a worker's own evidence)."""
    lines = []
    for line in worker.log_text().splitlines():
        if line.startswith("{") and '"attempt"' in line:
            entry = json.loads(line)
            if entry.get("event") == "attempt":
                lines.append(entry)
    return lines


def start_all(workers: list[WorkerProcess]) -> None:
    for worker in workers:
        worker.launch()
    for worker in workers:
        worker.wait_ready(60)


def stop_all(workers: list[WorkerProcess]) -> None:
    for worker in workers:
        worker.stop()


def test_workers_dedicated_by_queue_share_the_work_and_keep_the_guarantees(
    redis_url: str, dsp: MockDspServer, tmp_path: Path
) -> None:
    """Two hosts' workers for first attempts (-Q cgrid.deliver), one for retries
    (-Q cgrid.retry), one for a group of buyers and its retries (-Q cgrid.big,cgrid.big.retry)."""
    # A deadline no loaded test machine reaches (only the 500s fail), and lanes that never
    # park (a pull may take a parked event's next attempt, whichever it is: docs/hosts.md).
    env = fleet_env(redis_url, CGRID_TIMEOUT_S="5", CGRID_BATCH_SIZE="5",
                    CGRID_BUYER_MAX_CONCURRENCY="1000", **ROUTING)
    settings = Settings.from_env(env)
    ledger = Ledger(redis.Redis.from_url(redis_url))
    first_a = WorkerProcess(env, tmp_path / "first-a.log", pool="solo", name="first-a@host-a", queues="cgrid.deliver")
    first_b = WorkerProcess(env, tmp_path / "first-b.log", pool="solo", name="first-b@host-b", queues="cgrid.deliver")
    retry = WorkerProcess(env, tmp_path / "retry.log", pool="solo", name="retry@host-c", queues="cgrid.retry")
    big = WorkerProcess(env, tmp_path / "big.log", pool="solo", name="big@host-d", queues="cgrid.big,cgrid.big.retry")
    workers = [first_a, first_b, retry, big]
    run = uuid.uuid4().hex[:8]
    events = make_events(dsp, run, 400, fail_every=8)
    ids = [e["id"] for e in events]
    try:
        start_all(workers)
        for worker, queues in ((first_a, ["cgrid.deliver"]), (retry, ["cgrid.retry"]),
                               (big, ["cgrid.big", "cgrid.big.retry"])):
            ready = next(json.loads(line) for line in worker.log_text().splitlines() if '"worker_ready"' in line)
            assert ready["queues"] == queues and ready["node"] == worker.name, ready
        publish_paced(settings, events, per_s=400)
        records = settled(ledger, ids, 90)
        check_guarantees(records, calls_per_event(dsp))
        retried = {i for i, r in records.items() if len(r["attempts"]) == 2}
        grouped = {e["id"] for e in events if e["buyer"] == "dsp-big"}
        assert len(retried) == 50 and len(retried & grouped) == 10  # every 8th event, each retried once

        logged = {w.name: attempts_logged(w) for w in workers}
        by_node: dict[str, Counter[tuple[bool, int]]] = {
            name: Counter((entry["event_id"] in grouped, entry["attempt"]) for entry in lines)
            for name, lines in logged.items()
        }
        # Every attempt was made, and logged, by exactly one worker.
        made = Counter(entry["event_id"] for lines in logged.values() for entry in lines)
        assert made == Counter({i: len(r["attempts"]) for i, r in records.items()})
        # First attempts of the plain buyers: both first-attempt hosts, nobody else.
        plain_firsts = {name: counts[(False, 1)] for name, counts in by_node.items()}
        assert plain_firsts["retry@host-c"] == 0 and plain_firsts["big@host-d"] == 0, by_node
        assert plain_firsts["first-a@host-a"] + plain_firsts["first-b@host-b"] == 320
        assert min(plain_firsts["first-a@host-a"], plain_firsts["first-b@host-b"]) >= 16, by_node  # spread
        # Their retries: only the retry host.
        assert {name: counts[(False, 2)] for name, counts in by_node.items()} == {
            "first-a@host-a": 0, "first-b@host-b": 0, "retry@host-c": 40, "big@host-d": 0}
        # The group's first attempts and retries: only its host.
        assert by_node["big@host-d"] == Counter({(True, 1): 80, (True, 2): 10}), by_node
        client = redis.Redis.from_url(redis_url)
        assert {q: client.llen(q) for q in settings.routing.queues} == dict.fromkeys(settings.routing.queues, 0)
    finally:
        stop_all(workers)


def test_a_plain_worker_consumes_every_queue(redis_url: str, dsp: MockDspServer, tmp_path: Path) -> None:
    env = fleet_env(redis_url, CGRID_TIMEOUT_S="5", CGRID_BATCH_SIZE="10", **ROUTING)
    settings = Settings.from_env(env)
    ledger = Ledger(redis.Redis.from_url(redis_url))
    worker = WorkerProcess(env, tmp_path / "plain.log", pool="solo", name="plain@host-a")
    run = uuid.uuid4().hex[:8]
    events = make_events(dsp, run, 60, fail_every=4)
    try:
        worker.start(60)
        app = make_celery(settings)
        active = wait_for(lambda: app.control.inspect(destination=[worker.name], timeout=2).active_queues(),
                          30, "the worker's answer to inspect active_queues")
        assert sorted(q["name"] for q in active[worker.name]) == sorted(settings.routing.queues)
        publish_paced(settings, events, per_s=300)
        records = settled(ledger, [e["id"] for e in events], 60)
        check_guarantees(records, calls_per_event(dsp))
        retried_buyers = {r["event"]["buyer"] for r in records.values() if len(r["attempts"]) == 2}
        assert "dsp-big" in retried_buyers and retried_buyers - {"dsp-big"}  # cgrid.big.retry and cgrid.retry
        assert Counter(e["attempt"] for e in attempts_logged(worker)) == Counter({1: 60, 2: 15})
    finally:
        worker.stop()


def test_a_host_killed_midway_leaves_its_work_to_the_others(
    redis_url: str, dsp: MockDspServer, tmp_path: Path
) -> None:
    """Three hosts, each a process group (one prefork with its pool children); one is
    SIGKILLed while its calls are in flight. Its claimed attempts count as lost after their
    lease and get their one retry from the others; its unclaimed triggers are resent."""
    env = fleet_env(redis_url, CGRID_TIMEOUT_S="4", CGRID_BATCH_SIZE="5", CGRID_BUYER_MAX_CONCURRENCY="1000",
                    **ROUTING)
    settings = Settings.from_env(env)
    ledger = Ledger(redis.Redis.from_url(redis_url))
    victim = WorkerProcess(env, tmp_path / "victim.log", pool="prefork", concurrency=2, name="victim@host-a")
    survivors = [
        WorkerProcess(env, tmp_path / "b.log", pool="solo", name="b@host-b",
                      queues="cgrid.deliver,cgrid.big,cgrid.retry,cgrid.big.retry"),
        WorkerProcess(env, tmp_path / "c.log", pool="solo", name="c@host-c"),
    ]
    run = uuid.uuid4().hex[:8]
    # No 500s here: a first attempt lost before its call would make the retry the 500.
    events = make_events(dsp, run, 300, fail_every=0, sleep_ms=200)
    ids = [e["id"] for e in events]
    try:
        start_all([victim, *survivors])
        with Publisher(settings) as publisher:
            for start in range(0, len(events), 10):
                publisher.publish_many(events[start:start + 10])
                time.sleep(0.1)  # 100 events/s for 3 s
                if start == 150:
                    publisher.flush()
                    assert victim.process is not None
                    victim.signal(signal.SIGKILL)  # the whole group: main process and pool children
                    victim.process.wait(timeout=10)
        records = settled(ledger, ids, 120)
        calls = calls_per_event(dsp)
        check_guarantees(records, calls)
        lost = [i for i, r in records.items() if r["attempts"][0].get("error") == "lost"]
        assert lost, "the kill came while the victim had calls in flight"
        assert all(records[i]["attempts"][1]["status"] == 204 for i in lost)
        # The survivors shared what was left, the lost attempts' retries included.
        logged = {w.name: attempts_logged(w) for w in survivors}
        after_kill = {name: [e for e in lines if e["event_id"] in set(ids[150:])] for name, lines in logged.items()}
        assert all(len(lines) >= 10 for lines in after_kill.values()), {n: len(v) for n, v in after_kill.items()}
        retries_of_lost = {e["event_id"] for lines in logged.values() for e in lines if e["attempt"] == 2}
        assert set(lost) <= retries_of_lost
    finally:
        stop_all([victim, *survivors])
