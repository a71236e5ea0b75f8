"""Where the time from publish() to the first attempt goes, at one steady rate: the
publisher's wait and its accept script (publish -> accepted, Redis's time in the record),
the trigger's way to a worker, its claim and the lane (accepted -> the call started), and
the call; with the workers' and Redis's CPU per event over the run, and the workers' by thread
(the call loop, the ledger writer, Celery's main thread with the claims, the sweeper).

    python -m bench.latency_parts [--rate 4000] [--seconds 10] [--code CHECKOUT] [--set CGRID_NAME=VALUE ...]
                                  [--publishers N]

Two ``-P solo`` workers and an archiver run from CHECKOUT (as ``make bench --code``), the fast
buyer (nginx) answers. ``--set CGRID_LINGER_MS=10`` shows what the publisher's wait costs and
buys. ``--publishers N`` publishes from N processes instead of this one (``bench.arrivals``,
one event at a time, rate / N each, as N auction servers would): each sends its own triggers,
so the workers' CPU per trigger shows; the publish times are then not known here, and only
the parts from "accepted" on are printed. It measures and prints; it asserts nothing.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

from bench.common import ROOT, Buyer, fleet_env, publish_paced, publishes_like
from bench.run import (
    Archiver,
    Fleet,
    cpu_seconds,
    cpu_seconds_by_thread,
    make_events,
    percentile,
    start_arrivals,
    wait_until,
)
from cgrid.redis_server import RedisServer
from cgrid.settings import Settings
from producer.publisher import Publisher


def lpush_calls(client: redis.Redis) -> int:
    """LPUSHes Redis has run: a trigger is one (kombu sends a message with LPUSH)."""
    stats: dict[str, Any] = client.info("commandstats")
    return int(stats.get("cmdstat_lpush", {}).get("calls", 0))


def publish_from_processes(events: list[dict[str, Any]], rate: int, processes: int, env: dict[str, str],
                           work: Path, code: Path) -> None:
    """``processes`` publishers (bench/arrivals.py with the packages of ``code``), each
    publishing its share one event at a time at rate / processes; returns when all are done."""
    children = [start_arrivals(events[index::processes], work / f"arrivals-{index}.jsonl", rate / processes, env,
                               code, chunk=1) for index in range(processes)]
    for child in children:
        child.communicate()
        if child.returncode != 0:
            raise RuntimeError(f"a publisher exited with {child.returncode}")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.latency_parts", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=int, default=4000, help="events per second")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--code", default=str(ROOT), help="the checkout the fleet runs from")
    parser.add_argument("--set", action="append", default=[], metavar="CGRID_NAME=VALUE")
    parser.add_argument("--publishers", type=int, default=1, help="publishing processes (1: this one)")
    args = parser.parse_args()
    extra = dict(item.split("=", 1) for item in args.set)
    code = Path(args.code).resolve()
    rows: list[tuple[float, float, float, float]] = []
    with tempfile.TemporaryDirectory(prefix="cgrid-latency-parts-") as tmp:
        work = Path(tmp)
        server = RedisServer(work / "redis").start()
        buyer = Buyer.start("fast", 3.0)
        client = redis.Redis.from_url(server.url)
        env = fleet_env(server.url, {"CGRID_TIMEOUT_S": "2", **publishes_like(code), **extra})
        archive = Archiver(env, work / "archive", client, code)
        fleet = Fleet(env, "solo", 2, work, code=code)
        try:
            time.sleep(1.0)
            n = int(args.rate * args.seconds)
            events = make_events(n, buyer.port, f"parts{time.time():.0f}")
            published_at: dict[str, float] = {}
            assert server.process is not None
            workers = fleet.tree()
            gc.collect()
            gc.freeze()
            redis0, workers0 = cpu_seconds([server.process.pid]), cpu_seconds(workers)
            threads0 = cpu_seconds_by_thread(workers)
            lpush0 = lpush_calls(client)
            if args.publishers > 1:
                publish_from_processes(events, args.rate, args.publishers, env, work, code)
                published_at = {event["id"]: float("nan") for event in events}
            else:
                with Publisher(Settings.from_env(env)) as publisher:
                    published_at.update(publish_paced(publisher, events, args.rate))
            ids = list(published_at)

            def last_ones_called() -> bool:
                pipe = client.pipeline(transaction=False)
                for event_id in ids[-200:]:
                    pipe.hget(f"cgrid:ev:{event_id}", "a1")
                return all(pipe.execute())

            wait_until(last_ones_called, 60, 0.2)
            time.sleep(0.5)
            redis_cpu = cpu_seconds([server.process.pid]) - redis0
            workers_cpu = cpu_seconds(workers) - workers0
            threads = cpu_seconds_by_thread(workers)
            by_thread = {name: threads[name] - threads0.get(name, 0.0) for name in sorted(threads)}
            triggers = lpush_calls(client) - lpush0
            gc.unfreeze()
            for start in range(0, n, 1000):
                pipe = client.pipeline(transaction=False)
                for event_id in ids[start:start + 1000]:
                    pipe.hmget(f"cgrid:ev:{event_id}", "accepted_at", "a1")
                for event_id, (accepted, a1) in zip(ids[start:start + 1000], pipe.execute(), strict=True):
                    if not accepted or not a1:
                        continue
                    attempt = json.loads(a1)
                    call_started, call_s = float(attempt["started_at"]), float(attempt["ms"] or 0) / 1000
                    rows.append((float(accepted) - published_at[event_id], call_started - float(accepted), call_s,
                                 call_started + call_s - published_at[event_id]))
        finally:
            fleet.stop()
            archive.stop()
            buyer.stop()
            server.stop()
    print(f"{args.rate}/s for {args.seconds:g} s, {len(rows)} first attempts; CPU per event: workers "
          f"{workers_cpu / n * 1e3:.3f} ms, Redis {redis_cpu / n * 1e3:.3f} ms")
    print("  the workers' CPU per event by thread (main: Celery, the claims): " + ", ".join(
        f"{name} {seconds / n * 1e3:.3f} ms" for name, seconds in by_thread.items() if seconds > 0))
    if triggers:
        print(f"  triggers sent (LPUSH): {triggers}, {n / triggers:.1f} events each; workers' main thread "
              f"{by_thread.get('main', 0.0) / triggers * 1e3:.2f} CPU ms per trigger")
    for index, name in enumerate(["publish -> accepted", "accepted -> call started", "call", "publish -> call done"]):
        if args.publishers > 1 and name.startswith("publish"):
            continue  # (published in other processes: the publish times are not known here)
        values = sorted(row[index] * 1000 for row in rows)
        print(f"  {name:26} p50 {statistics.median(values):7.1f} ms  p90 {percentile(values, 0.9):7.1f} ms  "
              f"p99 {percentile(values, 0.99):7.1f} ms")


if __name__ == "__main__":
    main()
