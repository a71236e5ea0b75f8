"""``make bench BENCH_ARGS=--cluster``: Redis CPU per event with the ledger on a Redis Cluster
(three primaries with a replica each, the broker on a Redis of its own) against one Redis
(broker and ledger), alone and with a replica it waits for, in the same session, alternating.
Each run: a fresh Redis (or cluster), an archiver and two solo workers as ``make run`` starts
them; the events are published while the workers run; Redis CPU (``INFO cpu``, system + user)
is read before publishing and once every event is final and archived. Measures and prints;
asserts nothing."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

from bench.common import ROOT, Buyer, fleet_env, wait_until
from cgrid.ledger.partitions import ledger_for
from cgrid.redis_conn import long_lived_client
from cgrid.redis_server import RedisServer
from cgrid.settings import Settings
from producer import Publisher
from tests.cluster import Cluster

WORKERS = 2


def cpu_s(ports: list[int]) -> float:
    total = 0.0
    for port in ports:
        info = redis.Redis(port=port).info("cpu")
        total += float(info["used_cpu_sys"]) + float(info["used_cpu_user"])
    return total


def events(n: int, port: int, run: str) -> list[dict[str, Any]]:
    return [{"id": f"{run}-{i}", "kind": "burl", "upstream": "u2s", "buyer": f"dsp{i % 4}",
             "url": f"http://127.0.0.1:{port}/win?e={run}-{i}&p=${{AUCTION_PRICE}}",
             "macros": {"AUCTION_PRICE": 1.25 + i % 7}} for i in range(n)]


MODES = ("single", "replica", "cluster")


def one_run(mode: str, n: int, buyer: Buyer, workdir: Path, extra: dict[str, str]) -> dict[str, Any]:
    """One fleet over a fresh single Redis (``single``), one Redis with a replica the accepts
    and claims wait for (``replica``: a Sentinel deployment's primary, as the cluster's
    primaries are), or a cluster; Redis CPU per 1,000 events, of the primaries only."""
    broker = RedisServer(workdir / f"{mode}-broker").start()
    replica = (RedisServer(workdir / f"{mode}-replica", extra_args=["--replicaof", "127.0.0.1", str(broker.port)])
               .start() if mode == "replica" else None)
    cluster = Cluster(workdir / f"{mode}-cluster", start_port=38000).start() if mode == "cluster" else None
    waits = {"CGRID_REDIS_WAIT_REPLICAS": "1", "CGRID_REDIS_WAIT_TIMEOUT_MS": "200"} if replica else {}
    env = fleet_env(cluster.url if cluster else broker.url,
                    {**({"CGRID_REDIS_CLUSTER": "1", "CGRID_BROKER_URL": broker.url,
                         "CGRID_REDIS_WAIT_TIMEOUT_MS": "200"} if cluster else waits), **extra})
    settings = Settings.from_env(env)
    ledger = ledger_for(settings, long_lived_client(settings))
    primaries = cluster.primaries() if cluster else [broker.port]
    logs = [open(workdir / f"{mode}-{name}.log", "wb") for name in ("archiver", *map(str, range(WORKERS)))]
    processes = [subprocess.Popen([sys.executable, "-m", "ops.cli", "archive", "--dir", str(workdir / f"{mode}-a"),
                                   "--name", "bench"], cwd=ROOT, env=env, stdout=logs[0], stderr=subprocess.STDOUT)]
    processes += [subprocess.Popen([sys.executable, "-m", "celery", "-A", "worker", "worker", "-P", "solo",
                                    "--without-mingle", "--without-gossip", "-n", f"bench{i}@%h"],
                                   cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
                  for i, log in enumerate(logs[1:])]
    try:
        wait_until(lambda: ledger.archive_backlog() is not None, 60)
        wait_until(lambda: all(b" ready." in Path(log.name).read_bytes() for log in logs[1:]), 60)
        run = f"{mode}{time.time():.0f}"
        batch = events(n, buyer.port, run)
        cpu0, broker0 = cpu_s(primaries), cpu_s([broker.port]) if cluster else 0.0
        started = time.monotonic()
        with Publisher(settings) as publisher:
            for start in range(0, n, 1000):
                publisher.publish_many(batch[start:start + 1000])

        def done() -> bool:
            rows = ledger.report()
            final = sum(r["delivered_first"] + r["delivered_retry"] + r["failed"] + r["rejected"] + r["expired"]
                        for r in rows)
            backlog = ledger.archive_backlog()
            return final >= n and backlog is not None and backlog[0] == 0

        complete = wait_until(done, 900, 0.5)
        seconds = time.monotonic() - started
        cpu, broker_cpu = cpu_s(primaries) - cpu0, (cpu_s([broker.port]) - broker0) if cluster else 0.0
        return {"mode": mode, "events": n, "complete": complete, "seconds": round(seconds, 1),
                "rate": round(n / seconds), "primaries": len(primaries),
                "redis_cpu_s_per_1000": round(cpu / n * 1000, 4),
                "broker_cpu_s_per_1000": round(broker_cpu / n * 1000, 4) if cluster else None}
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
        for log in logs:
            log.close()
        if cluster:
            cluster.stop()
        if replica:
            replica.stop()
        broker.stop()


def run_cluster_bench(n: int, rounds: int, extra: dict[str, str]) -> dict[str, Any]:
    buyer = Buyer.start("fast", 0.0)
    runs: list[dict[str, Any]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="cgrid-bench-cluster-") as tmp:
            for index in range(rounds):
                for mode in MODES:
                    result = one_run(mode, n, buyer, Path(tmp) / f"r{index}", extra)
                    print(f"  {mode:8} {result}", flush=True)
                    runs.append(result)
    finally:
        buyer.stop()
    rounds_ = [runs[i:i + len(MODES)] for i in range(0, len(runs), len(MODES))]
    return {"buyer": buyer.kind, "runs": runs,
            "cluster_to_single": [round(c["redis_cpu_s_per_1000"] / s["redis_cpu_s_per_1000"], 2)
                                  for s, _, c in rounds_],
            "cluster_to_replicated": [round(c["redis_cpu_s_per_1000"] / r["redis_cpu_s_per_1000"], 2)
                                      for _, r, c in rounds_]}


def print_cluster(result: dict[str, Any]) -> None:
    print(f"\nRedis CPU s per 1,000 events (publish, deliver, archive), buyer {result['buyer']}:")
    for run in result["runs"]:
        extra = f", + broker {run['broker_cpu_s_per_1000']}" if run["broker_cpu_s_per_1000"] is not None else ""
        print(f"  {run['mode']:8} {run['redis_cpu_s_per_1000']} over {run['primaries']} primar"
              f"{'y' if run['primaries'] == 1 else 'ies'}{extra}; {run['rate']}/s")
    print(f"  cluster (primaries' sum) / one Redis, per round: {result['cluster_to_single']}")
    print(f"  cluster (primaries' sum) / one Redis with a replica it waits for: {result['cluster_to_replicated']}")
