"""The fault-injection suite: ``make chaos`` (and, short, ``tests/test_chaos.py`` in CI).

A private Redis with AOF (appendfsync always), several real ``celery worker`` processes, and a local buyer that
answers 200/204/302, returns 500s, hangs past the deadline and resets connections, and
records every call by event id. While thousands of events flow, it SIGKILLs workers (whole
process groups, and single pool children) at random instants and starts new ones, SIGTERMs
one (warm shutdown), crashes and restarts Redis once (SIGKILL), makes the buyer unreachable for a few seconds,
and fills Redis: its ``maxmemory`` is set below what it uses for a few seconds, then lifted.
Then it checks every event against the ledger and the buyer's record of calls, and that no
worker it did not stop has exited.

    python -m tests.chaos [--events 5000] [--seconds 40] [--workers 3] [--seed N] [--cluster]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
from collections import Counter as Tally
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from cgrid.errors import RedisUnavailable
from cgrid.ledger.partitions import ledger_for
from cgrid.redis_conn import long_lived_client
from cgrid.redis_server import RedisServer, free_port
from cgrid.settings import Settings
from ops.mock_dsp import CallLog, MockDspServer
from producer import Publisher
from tests.cluster import Cluster
from tests.helpers import WorkerProcess, fleet_env, parent_pids

TERMINAL = {"delivered", "failed", "rejected", "expired"}
# Path of the buyer's answer, by weight.
BEHAVIOURS = [
    ("/status/204", 50), ("/status/200", 10), ("/status/302", 10), ("/status/500", 10),
    ("/sequence/500,204", 8), ("/sleep/900", 6), ("/reset", 6),
]


@dataclass
class Faults:
    group_kills: int = 0
    child_kills: int = 0
    warm_shutdowns: int = 0
    redis_restarts: int = 0
    buyer_outages: int = 0
    redis_full_phases: int = 0
    log: list[str] = field(default_factory=list)

    def note(self, started: float, text: str) -> None:
        self.log.append(f"{time.monotonic() - started:6.1f}s {text}")


class Buyer:
    """The mock DSP on a fixed port; can go away and come back, keeping its call log."""

    def __init__(self) -> None:
        self.calls = CallLog()
        self.port = free_port()
        self.server: MockDspServer | None = None
        self.start()

    def start(self) -> None:
        server = MockDspServer("127.0.0.1", self.port)
        server.log = self.calls
        self.server = server.start_in_thread()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


class Chaos:
    def __init__(self, events: int, seconds: float, workers: int, seed: int, workdir: Path,
                 cluster: bool = False) -> None:
        self.n_events = events
        self.seconds = seconds
        self.n_workers = workers
        self.rng = random.Random(seed)
        self.seed = seed
        self.workdir = workdir
        # The ledger on one Redis, or (cluster mode) on a Redis Cluster of three primaries with
        # a replica each, the broker then on a Redis of its own (self.redis).
        self.cluster = Cluster(workdir / "cluster", start_port=36000).start() if cluster else None
        self.redis = RedisServer(workdir / "redis").start()
        self.buyer = Buyer()
        cluster_env = ({"CGRID_REDIS_CLUSTER": "1", "CGRID_BROKER_URL": self.redis.url,
                        "CGRID_REDIS_WAIT_TIMEOUT_MS": "200"} if self.cluster else {})
        self.env = fleet_env(
            self.cluster.url if self.cluster else self.redis.url, **cluster_env,
            CGRID_TIMEOUT_S="0.5", CGRID_RETRY_DELAY_S="1", CGRID_SWEEP_INTERVAL_S="0.2",
            CGRID_ATTEMPT_GRACE_S="2", CGRID_REDELIVER_AFTER_S="3", CGRID_BATCH_SIZE="20",
            CGRID_CALL_CONCURRENCY="20", CGRID_PUBLISH_TIMEOUT_S="0.5", CGRID_LOG_LEVEL="WARNING",
        )
        self.settings = Settings.from_env(self.env)
        self.workers: list[WorkerProcess] = []
        self.worker_seq = 0
        self.faults = Faults()
        self.accepted: list[str] = []
        self.started = time.monotonic()
        self.retired: list[WorkerProcess] = []  # stopped or killed on purpose
        self.redis_lock = threading.Lock()  # one Redis fault at a time
        self.publish_refused: dict[str, int] = {}

    # -- parts ---------------------------------------------------------------------------

    def start_worker(self) -> None:
        self.worker_seq += 1
        pool = "prefork" if self.worker_seq % 3 else "threads"
        worker = WorkerProcess(self.env, self.workdir / f"worker-{self.worker_seq}.log", pool=pool,
                               concurrency=2, name=f"chaos{self.worker_seq}")
        self.workers.append(worker.start(timeout_s=60))

    def publish_all(self) -> None:
        publish_seconds = self.seconds * 0.6
        chunk = 25
        pause_s = publish_seconds / max(1, self.n_events / chunk)
        publisher = Publisher(self.settings, linger_ms=5)
        paths = [p for p, _ in BEHAVIOURS]
        weights = [w for _, w in BEHAVIOURS]
        full = threading.Thread(target=self.redis_full, name="redis-full")
        for start in range(0, self.n_events, chunk):
            if start >= self.n_events * 0.35 and full.ident is None:
                full.start()  # while events flow, whatever the other faults are doing
            batch = []
            for i in range(start, min(start + chunk, self.n_events)):
                event_id = f"c{self.seed}-{i}"
                path = self.rng.choices(paths, weights)[0]
                batch.append({"id": event_id, "kind": "burl", "upstream": "s2s", "buyer": f"dsp{i % 3}",
                              "url": f"http://127.0.0.1:{self.buyer.port}{path}?e={event_id}"})
            while True:
                try:
                    publisher.publish_many(batch)
                    break
                except RedisUnavailable:
                    time.sleep(0.2)
            self.accepted += [e["id"] for e in batch]
            time.sleep(pause_s)
        if full.ident is not None:
            full.join()
        give_up = time.monotonic() + 60
        try:
            while True:
                try:
                    publisher.close()
                    return
                except RedisUnavailable:
                    if time.monotonic() > give_up:
                        raise
                    time.sleep(0.2)
        finally:
            self.publish_refused = dict(publisher.refused)

    # -- faults --------------------------------------------------------------------------

    def kill_group(self) -> None:
        worker = self.rng.choice(self.workers)
        worker.signal(signal.SIGKILL)
        assert worker.process is not None
        worker.process.wait()
        self.workers.remove(worker)
        self.retired.append(worker)
        self.faults.group_kills += 1
        self.faults.note(self.started, f"SIGKILL worker group {worker.log_path.stem}")
        self.start_worker()

    def kill_child(self) -> None:
        worker = self.rng.choice(self.workers)
        assert worker.process is not None
        children = [child for child, parent in parent_pids().items() if parent == worker.process.pid]
        if not children:
            return self.kill_group()
        os.kill(self.rng.choice(children), signal.SIGKILL)
        self.faults.child_kills += 1
        self.faults.note(self.started, f"SIGKILL a pool child of {worker.log_path.stem}")
        return None

    def warm_shutdown(self) -> None:
        worker = self.rng.choice(self.workers)
        self.workers.remove(worker)
        self.retired.append(worker)
        worker.stop(timeout_s=30)
        self.faults.warm_shutdowns += 1
        self.faults.note(self.started, f"SIGTERM (warm shutdown) {worker.log_path.stem}")
        self.start_worker()

    def restart_redis(self) -> None:
        if self.cluster is not None:
            with self.redis_lock:
                return self.fail_over()
        with self.redis_lock:
            self.redis.stop(kill=True)  # a crash, not a clean shutdown: only the AOF is left
            time.sleep(1.0)
            self.redis.start()
        self.faults.redis_restarts += 1
        self.faults.note(self.started, "Redis SIGKILLed and restarted from its AOF")
        return None

    def fail_over(self) -> None:
        """Cluster mode: a primary SIGKILLed; its replica takes over; it comes back as a replica."""
        assert self.cluster is not None
        victim = self.rng.choice(self.cluster.primaries())
        self.cluster.kill(victim)
        self.faults.note(self.started, f"cluster primary {victim} SIGKILLed")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(redis.RedisError):
                if len(self.cluster.primaries()) == 3:
                    break
            time.sleep(0.2)
        self.faults.note(self.started, "its replica took over")
        self.cluster.restart(victim)
        self.faults.redis_restarts += 1
        self.faults.note(self.started, f"{victim} back, as a replica")

    def buyer_outage(self) -> None:
        self.buyer.stop()
        self.faults.note(self.started, "buyer unreachable")
        time.sleep(3.0)
        self.buyer.start()
        self.faults.buyer_outages += 1
        self.faults.note(self.started, "buyer back")

    def redis_full(self) -> None:
        """Redis past its maxmemory while events flow (noeviction: it refuses writes that add
        data): new events are refused, the accepted ones must still end. Then lifted. In
        cluster mode every primary of the ledger's cluster is full at once."""
        ledger = ledger_for(self.settings, long_lived_client(self.settings))
        with self.redis_lock:
            nodes = ([self.cluster.node_client(port) for port in self.cluster.primaries()] if self.cluster
                     else [redis.Redis.from_url(self.redis.url)])
            used = [int(node.info("memory")["used_memory"]) for node in nodes]
            for node, node_used in zip(nodes, used, strict=True):
                node.config_set("maxmemory", str(max(node_used - 256 * 1024, node_used // 2)))
            open_before = sum(ledger.open_events().values())
            self.faults.note(self.started, f"Redis full: maxmemory below its {sum(used)} bytes used, "
                                           f"{open_before} events open")
            time.sleep(max(3.0, self.seconds * 0.1))
            open_after = sum(ledger.open_events().values())
            used_after = sum(int(node.info("memory")["used_memory"]) for node in nodes)
            for node in nodes:
                node.config_set("maxmemory", "0")
        self.faults.redis_full_phases += 1
        self.faults.note(self.started, f"maxmemory lifted: {open_after} events open, {used_after} bytes used")

    def inject(self, stop: threading.Event) -> None:
        """Random kills all along; the one-off faults at fixed points while events flow."""
        once = [(0.25, self.buyer_outage), (0.4, self.restart_redis), (0.5, self.warm_shutdown)]
        plan_end = self.started + self.seconds * 0.8
        while not stop.is_set() and time.monotonic() < plan_end:
            stop.wait(self.rng.uniform(0.8, 2.5))
            elapsed = (time.monotonic() - self.started) / self.seconds
            if once and elapsed >= once[0][0]:
                once.pop(0)[1]()
            elif self.rng.random() < 0.6:
                self.kill_group()
            else:
                self.kill_child()
        for _, action in once:
            action()
        while self.faults.group_kills + self.faults.child_kills < 3:  # at least a few, however short the run
            self.kill_group() if self.rng.random() < 0.6 else self.kill_child()
            time.sleep(0.5)

    # -- the run -------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        for _ in range(self.n_workers):
            self.start_worker()
        self.started = time.monotonic()
        stop = threading.Event()
        publisher = threading.Thread(target=self.publish_all, name="publisher")
        publisher.start()
        self.inject(stop)
        publisher.join()
        return self.settle_and_check(deadline_s=120)

    def settle_and_check(self, deadline_s: float) -> dict[str, Any]:
        ledger = ledger_for(self.settings, long_lived_client(self.settings))
        give_up = time.monotonic() + deadline_s
        while True:
            records = {i: ledger.record(i) for i in self.accepted}
            open_ = [i for i, r in records.items() if r is None or r["state"] not in TERMINAL]
            if not open_ or time.monotonic() > give_up:
                break
            time.sleep(0.5)
        return self.check(records)

    def check(self, records: dict[str, dict[str, Any] | None]) -> dict[str, Any]:
        calls: dict[str, int] = Tally()
        for call in self.buyer.calls.snapshot():
            if "e=" in call["target"]:
                calls[call["target"].split("e=", 1)[1]] += 1
        states: Tally[str] = Tally()
        lost, over_called, violations = [], [], []
        for event_id, record in records.items():
            n_calls = calls.get(event_id, 0)
            if record is None or record["state"] not in TERMINAL:
                lost.append(event_id)
                continue
            states[record["state"]] += 1
            attempts = record["attempts"]
            if n_calls > 2:
                over_called.append(event_id)

            def ok(a: dict[str, Any]) -> bool:
                return a.get("error") is None and a.get("status") is not None and a["status"] < 400

            if n_calls == 2 and ok(attempts[0]):
                violations.append(f"{event_id}: called twice, yet its first attempt succeeded")
            if attempts and ok(attempts[0]) and len(attempts) > 1:
                violations.append(f"{event_id}: a success was followed by a retry")
            with_status = sum(1 for a in attempts if a.get("status") is not None)
            if not with_status <= n_calls <= len(attempts):
                violations.append(f"{event_id}: ledger has {len(attempts)} attempts ({with_status} answered), "
                                  f"buyer saw {n_calls} calls")
            if record["state"] == "delivered" and not ok(attempts[-1]):
                violations.append(f"{event_id}: delivered, but its last attempt did not succeed")
        retried = sum(1 for r in records.values() if r and len(r["attempts"]) == 2)
        success_retried = [i for i, r in records.items()
                           if r and len(r["attempts"]) > 1 and r["attempts"][0].get("error") is None
                           and r["attempts"][0].get("status") is not None and r["attempts"][0]["status"] < 400]
        exited = [w.log_path.stem for w in self.workers if w.process is None or w.process.poll() is not None]
        logs = "".join(w.log_text() for w in self.workers + self.retired)
        answers: Tally[str] = Tally(
            str(a.get("status") or a.get("error")) for r in records.values() if r for a in r["attempts"])
        lost_attempts = answers["lost"]
        return {
            "seed": self.seed,
            "events": len(records),
            "worker_group_kills": self.faults.group_kills,
            "worker_child_kills": self.faults.child_kills,
            "warm_shutdowns": self.faults.warm_shutdowns,
            "redis_restarts": self.faults.redis_restarts,
            "buyer_outages": self.faults.buyer_outages,
            "redis_full_phases": self.faults.redis_full_phases,
            "publish_refused": self.publish_refused,
            "calls": sum(calls.values()),
            "retried": retried,
            "attempts_lost_to_kills": lost_attempts,
            "attempt_answers": dict(answers.most_common()),
            "states": dict(states),
            "lost": len(lost),
            "over_called": len(over_called),
            "success_retried": len(success_retried),
            "violations": len(violations),
            "workers_running": len(self.workers) - len(exited),
            "workers_exited": len(exited),
            "unrecoverable_errors": logs.count("Unrecoverable error"),
            "poisoned_messages": logs.count('"poisoned_message"'),
            "examples": (lost[:5] + over_called[:5] + violations[:5] + exited),
            "timeline": self.faults.log,
        }

    def close(self) -> None:
        for worker in self.workers:
            worker.stop(timeout_s=10)
        self.buyer.stop()
        self.redis.stop()
        if self.cluster is not None:
            self.cluster.stop()


def run_chaos(events: int, seconds: float, workers: int, seed: int, workdir: Path,
              cluster: bool = False) -> dict[str, Any]:
    chaos = Chaos(events, seconds, workers, seed, workdir, cluster=cluster)
    try:
        return chaos.run()
    finally:
        chaos.close()


def print_result(result: dict[str, Any]) -> None:
    print("\nchaos timeline:")
    for line in result["timeline"]:
        print("  " + line)
    print("\nchaos result:")
    for key in result:
        if key in ("examples", "timeline"):
            continue
        print(f"  {key:24} {result[key]}")
    if result["examples"]:
        print("  examples: " + json.dumps(result["examples"]))


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument("--seconds", type=float, default=40.0)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--seed", type=int, default=random.randrange(1_000_000))
    parser.add_argument("--cluster", action="store_true",
                        help="the ledger on a Redis Cluster (3 primaries, 3 replicas), the broker on its own Redis; "
                             "the Redis crash becomes a primary SIGKILLed and replaced by its replica")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cgrid-chaos-") as workdir:
        result = run_chaos(args.events, args.seconds, args.workers, args.seed, Path(workdir), cluster=args.cluster)
    print_result(result)
    failed = (result["lost"] or result["over_called"] or result["violations"] or result["workers_exited"]
              or result["unrecoverable_errors"] or result["poisoned_messages"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
