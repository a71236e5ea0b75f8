"""A full Redis, and a Redis that stops being a primary, stop no worker and no archiver
(issue 15). Real parts: private redis-servers, plain ``celery -A worker worker`` processes
(mingle and gossip on, as an operator starts them), the archiver, a buyer on loopback.

The first test is the issue's finding: ``maxmemory 8mb`` with ``noeviction``, two workers,
events published in chunks until Redis refuses them, 10% of the buyer's first answers
failing. Before the fix both workers exited (``Unrecoverable error:
server:OutOfMemoryError``) after logging Redis's error replies as poisoned messages, and a
tenth of the accepted events never ended."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import redis

from cgrid.errors import RedisUnavailable
from cgrid.ledger import Ledger
from cgrid.redis_server import RedisServer
from cgrid.settings import Settings
from ops.mock_dsp import MockDspServer
from producer import Publisher
from tests.helpers import ROOT, WorkerProcess, fleet_env, wait_for

pytestmark = pytest.mark.integration

TERMINAL = {"delivered", "failed", "rejected", "expired"}
FATAL_LINES = ("Unrecoverable error", "poisoned_message")


def plain_worker(env: dict[str, str], log: Path, name: str, *, pool: str = "prefork",
                 concurrency: int = 2) -> WorkerProcess:
    """``celery -A worker worker`` as an operator runs it: mingle and gossip on."""
    worker = WorkerProcess(env, log, pool=pool, concurrency=concurrency, name=name)
    worker.args = [a for a in worker.args if a not in ("--without-mingle", "--without-gossip")]
    return worker


def alive(process: WorkerProcess | subprocess.Popen[bytes]) -> bool:
    proc = process.process if isinstance(process, WorkerProcess) else process
    return proc is not None and proc.poll() is None


def event(run: str, n: int, dsp: MockDspServer) -> dict[str, Any]:
    event_id = f"{run}-{n}"
    path = "/sequence/500,204" if n % 10 == 0 else "/sleep/100/204"  # a tenth fail first, then succeed
    return {"id": event_id, "kind": "burl", "upstream": "s2s", "buyer": f"dsp{n % 3}",
            "url": f"{dsp.url}{path}?e={event_id}"}


def publish_chunk(publisher: Publisher, chunk: list[dict[str, Any]]) -> tuple[list[str], int, str]:
    """Publish one chunk; returns the ids accepted, how many were refused, and the error."""
    try:
        return publisher.publish_many(chunk), 0, ""
    except RedisUnavailable as e:
        not_accepted = publisher.discard()
        return [c["id"] for c in chunk[:len(chunk) - not_accepted]], not_accepted, str(e)


def check_outcomes(ledger: Ledger, dsp: MockDspServer, ids: list[str]) -> dict[str, Any]:
    calls: Counter[str] = Counter(c["target"].split("e=", 1)[1] for c in dsp.log.snapshot() if "e=" in c["target"])
    records = {i: ledger.record(i) for i in ids}
    states = Counter(r["state"] if r else "missing" for r in records.values())
    over_called = [i for i in ids if calls[i] > 2]
    success_retried = [i for i, r in records.items() if r and r["attempts"] and r["attempts"][0].get("status") in
                       (200, 204) and len(r["attempts"]) > 1]
    return {"states": dict(states), "over_called": over_called, "success_retried": success_retried,
            "calls": sum(calls[i] for i in ids)}


def open_ids(ledger: Ledger, ids: list[str]) -> list[str]:
    return [i for i in ids if (r := ledger.record(i)) is None or r["state"] not in TERMINAL]


def used_and_max(client: redis.Redis) -> tuple[int, int]:
    info = client.info("memory")
    return int(info["used_memory"]), int(info["maxmemory"])


def test_a_full_redis_refuses_new_events_and_the_fleet_drains_the_backlog(tmp_path: Path,
                                                                           dsp: MockDspServer) -> None:
    server = RedisServer(tmp_path / "redis", appendfsync="everysec").start()
    # A slow buyer (100 ms, 10 calls in flight per process): a backlog builds, lanes park.
    env = fleet_env(server.url, CGRID_TIMEOUT_S="2", CGRID_RETRY_DELAY_S="1", CGRID_BUYER_MAX_CONCURRENCY="10")
    settings = Settings.from_env(env)
    client = redis.Redis.from_url(server.url)
    ledger = Ledger(client)
    workers: list[WorkerProcess] = []
    archiver: subprocess.Popen[bytes] | None = None
    run = f"full-{uuid.uuid4().hex[:6]}"
    try:
        workers = [plain_worker(env, tmp_path / f"worker{i}.log", f"full{i}").start(timeout_s=60) for i in (1, 2)]
        archiver = subprocess.Popen([sys.executable, "-m", "ops.cli", "archive", "--dir", str(tmp_path / "archive"),
                                     "--name", "full"], cwd=ROOT, env=env, stdout=open(tmp_path / "archiver.log", "ab"),
                                    stderr=subprocess.STDOUT)
        wait_for(lambda: client.exists("cgrid:archive"), 30, "the archiver's stream")
        client.config_set("maxmemory", "8mb")

        # 1. Publish in chunks until Redis refuses, and go on for two seconds: refused.
        publisher = Publisher(settings, linger_ms=0)
        accepted: list[str] = []
        refused, n, errors = 0, 0, set()
        first_refusal_at: float | None = None
        give_up = time.monotonic() + 120
        while first_refusal_at is None or time.monotonic() - first_refusal_at < 2:
            assert time.monotonic() < give_up, "Redis never refused new events"
            chunk = [event(run, n + i, dsp) for i in range(200)]
            n += len(chunk)
            ids, not_accepted, error = publish_chunk(publisher, chunk)
            accepted += ids
            refused += not_accepted
            if not_accepted:
                errors.add(error.split(": ", 1)[0])
                first_refusal_at = first_refusal_at or time.monotonic()
                time.sleep(0.1)
        assert all("refused the events" in e or "Redis at" in e for e in errors), errors

        # 2. Redis over its limit (as when something else grows): still refused, still draining.
        used, _ = used_and_max(client)
        client.config_set("maxmemory", str(int(used * 0.95)))
        ids, not_accepted, error = publish_chunk(publisher, [event(run, n + i, dsp) for i in range(50)])
        assert not ids and not_accepted == 50, "a new event was accepted by a full Redis"
        assert "maxmemory" in error or "OOM" in error or "refused" in error, error

        started = time.monotonic()
        open_when_full = len(open_ids(ledger, accepted))

        def drained() -> bool:
            for process in (*workers, archiver):
                assert alive(process), f"a process exited with Redis full: {tail(tmp_path)}"
            return not open_ids(ledger, accepted)

        wait_for(drained, 150, f"every accepted event final with Redis full ({len(accepted)} accepted)")
        drain_s = time.monotonic() - started
        still_full = used_and_max(client)
        wait_for(lambda: client.xlen("cgrid:archive") == 0, 60, "the archive stream emptied")
        outcome = check_outcomes(ledger, dsp, accepted)
        print(f"\nredis full: accepted {len(accepted)}, refused {refused + 50} (publish attempts of events), "
              f"open when Redis went past maxmemory {open_when_full}, "
              f"final {sum(outcome['states'].values())} {outcome['states']}, drained in {drain_s:.1f}s, "
              f"memory used/max at the end {still_full}, workers alive {sum(alive(w) for w in workers)}/2, "
              f"archiver alive {alive(archiver)}, calls {outcome['calls']}")
        assert outcome["over_called"] == [] and outcome["success_retried"] == []
        assert all(alive(w) for w in workers) and alive(archiver)
        logs = "".join(w.log_text() for w in workers) + (tmp_path / "archiver.log").read_text()
        for line in FATAL_LINES:
            assert line not in logs, f"{line!r} in the logs: {tail(tmp_path)}"
    finally:
        for worker in workers:
            worker.stop()
        if archiver is not None:
            archiver.send_signal(signal.SIGTERM)
            archiver.wait(timeout=30)
        server.stop()


def test_a_broker_redis_demoted_to_a_replica_stops_no_worker(tmp_path: Path, dsp: MockDspServer) -> None:
    primary = RedisServer(tmp_path / "primary", appendfsync="everysec").start()
    other = RedisServer(tmp_path / "other", appendfsync="everysec").start()
    env = fleet_env(primary.url, CGRID_TIMEOUT_S="2", CGRID_RETRY_DELAY_S="1")
    settings = Settings.from_env(env)
    p = redis.Redis.from_url(primary.url)
    q = redis.Redis.from_url(other.url)
    ledger = Ledger(p)
    workers: list[WorkerProcess] = []
    run = f"ro-{uuid.uuid4().hex[:6]}"
    try:
        workers = [plain_worker(env, tmp_path / "solo.log", "solo", pool="solo").start(timeout_s=60),
                   plain_worker(env, tmp_path / "prefork.log", "prefork").start(timeout_s=60)]
        with Publisher(settings) as publisher:
            before = publisher.publish_many([event(run, i, dsp) for i in range(200)])
        wait_for(lambda: not open_ids(ledger, before), 60, "the first events final")

        # The primary becomes a replica of another server (a switchover the fleet was not told of).
        q.replicaof("127.0.0.1", primary.port)
        wait_for(lambda: q.info("replication").get("master_link_status") == "up", 20, "the copy in sync")
        q.replicaof("no", "one")
        p.replicaof("127.0.0.1", other.port)
        wait_for(lambda: p.info("replication").get("master_link_status") == "up", 20, "the demotion")
        refused = Publisher(settings, linger_ms=0)
        with pytest.raises(RedisUnavailable, match="refused the events"):
            refused.publish(event(run, 10_000, dsp))
        assert refused.discard() == 1
        refused.close()
        late = plain_worker(env, tmp_path / "late.log", "late", pool="solo").launch()  # started against a replica
        workers.append(late)
        time.sleep(10)
        for worker in workers:
            assert alive(worker), f"{worker.name} exited while its Redis was a replica: {tail(tmp_path)}"

        p.replicaof("no", "one")  # promoted again
        late.wait_ready(90)
        with Publisher(settings) as publisher:
            after = publisher.publish_many([event(run, 20_000 + i, dsp) for i in range(200)])
        wait_for(lambda: not open_ids(ledger, after), 90, "the events published after the promotion final")
        outcome = check_outcomes(ledger, dsp, before + after)
        assert outcome["over_called"] == [] and outcome["success_retried"] == []
        for worker in workers:
            assert alive(worker), f"{worker.name} exited: {tail(tmp_path)}"
        logs = "".join(w.log_text() for w in workers)
        for line in FATAL_LINES:
            assert line not in logs, f"{line!r} in the logs: {tail(tmp_path)}"
    finally:
        for worker in workers:
            worker.stop()
        primary.stop()
        other.stop()


def tail(tmp_path: Path) -> str:
    """The last lines of every log of the run, for an assertion's message."""
    out = []
    for log in sorted(tmp_path.glob("*.log")):
        lines = log.read_text(errors="replace").splitlines()
        out.append(f"\n--- {log.name}\n" + "\n".join(lines[-15:]))
    return "".join(out)
