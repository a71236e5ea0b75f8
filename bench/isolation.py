"""Buyer isolation (issue 8): does one dead buyer slow the others down?

Phase A ("alone"): ``rate`` events/s for ``phase_s`` seconds, spread over three healthy
buyers; p50/p99 from ``publish()`` to the start of each event's first call (``a1``'s
``started_at``). Phase B ("beside a dead buyer"): the same rate, but ``dead_share`` of the
events go to a buyer whose server reads every request and never answers (each call runs
into ``CGRID_TIMEOUT_S``); the same figures for the healthy events.

The bound of the issue: the dead buyer raises the healthy buyers' p99 publish→call by at
most 250 ms, or by their p99 alone if that is larger (p99 beside it ≤ 2 × p99 alone), and
leaves none of their events uncalled. The dead buyer's own events may wait (parked while
its lane is narrowed) but none is called more than twice.

    python -m bench.isolation [--rate 300] [--dead-share 0.3] [--phase-s 15] [--processes 2] [--json]

It measures and prints; the pass/fail lives in tests/test_isolation.py (with looser bounds).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import redis

from bench.common import Buyer, fleet_env, percentile, publish_paced
from cgrid.ledger import PREFIX, SHARED_LEASES, leased_ids
from cgrid.redis_server import RedisServer, free_port
from cgrid.settings import Settings
from producer import Publisher
from tests.helpers import WorkerProcess

ROOT = Path(__file__).resolve().parent.parent
HEALTHY_BUYERS = ("healthy-0", "healthy-1", "healthy-2")
DEAD_BUYER = "dead"
TIMEOUT_S = 2.0
RAISE_BOUND_MS = 250.0


# -- the buyers --------------------------------------------------------------------------------


def start_buyer(mode: str, *extra: str) -> Buyer:
    """``python -m bench.buyers <mode>`` on a free port, once it listens."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "bench.buyers", mode, "--port", str(port), *extra], cwd=ROOT)
    give_up = time.monotonic() + 10
    while True:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return Buyer(f"asyncio ({mode})", port, process)
        if process.poll() is not None or time.monotonic() > give_up:
            process.kill()
            raise RuntimeError(f"buyer {mode} did not start listening on {port}")
        time.sleep(0.05)


def dead_calls(calls_file: Path) -> Counter[str]:
    """Calls the dead buyer received, per event id."""
    if not calls_file.exists():
        return Counter()
    return Counter(line for line in calls_file.read_text().splitlines() if line)


# -- the ledger --------------------------------------------------------------------------------


def read_ledger(client: redis.Redis, ids: list[str]) -> dict[str, dict[str, Any]]:
    """state, claim, wait, retry_at and the attempts (decoded) of each id. A first attempt a
    shared trigger's claim holds has no claim fields: its claim is found in the leases."""
    shared_held = set(leased_ids(client, PREFIX, (SHARED_LEASES,)))
    out: dict[str, dict[str, Any]] = {}
    for start in range(0, len(ids), 1000):
        chunk = ids[start:start + 1000]
        pipe = client.pipeline(transaction=False)
        for event_id in chunk:
            pipe.hmget(f"cgrid:ev:{event_id}", "state", "claim", "wait", "retry_at", "a1", "a2")
        for event_id, (state, claim, wait, retry_at, a1, a2) in zip(chunk, pipe.execute(), strict=True):
            out[event_id] = {
                "state": state.decode() if state else None,
                "claim": int(claim or 0) or int(event_id in shared_held and state == b"pending"
                                                 and not a1 and not wait),
                "wait": wait.decode() if wait else None,
                "retry_at": float(retry_at) if retry_at else None,
                "attempts": [json.loads(a) for a in (a1, a2) if a],
            }
    return out


def first_call_started(client: redis.Redis, ids: list[str]) -> dict[str, tuple[float, float]]:
    """(``accepted_at``, ``a1.started_at``) of each id whose first attempt is recorded: when
    the ledger accepted the event (Redis's clock) and when its first call started."""
    started: dict[str, tuple[float, float]] = {}
    for start in range(0, len(ids), 1000):
        chunk = ids[start:start + 1000]
        pipe = client.pipeline(transaction=False)
        for event_id in chunk:
            pipe.hmget(f"cgrid:ev:{event_id}", "accepted_at", "a1")
        for event_id, (accepted_at, a1) in zip(chunk, pipe.execute(), strict=True):
            if a1:
                started[event_id] = (float(accepted_at or 0), float(json.loads(a1)["started_at"]))
    return started


def redis_now(client: redis.Redis) -> float:
    """The ledger's clock (its scripts read Redis's TIME)."""
    seconds, micros = client.time()
    return seconds + micros / 1e6


def wait_for_first_calls(client: redis.Redis, ids: list[str], timeout_s: float) -> dict[str, tuple[float, float]]:
    """Poll until every id has its first attempt recorded, or ``timeout_s`` passed."""
    started: dict[str, tuple[float, float]] = {}
    missing = list(ids)
    give_up = time.monotonic() + timeout_s
    while missing:
        started.update(first_call_started(client, missing))
        missing = [i for i in missing if i not in started]
        if not missing or time.monotonic() > give_up:
            break
        time.sleep(0.2)
    return started


def where(record: dict[str, Any], now_s: float) -> str:
    """Where a dead-buyer event stands: its state, and for a live one why it waits (as
    ``cgrid-s2s status`` would say: in_flight, parked lane_full, retry_delay, queued)."""
    state = record["state"] or "missing"
    if state not in ("pending", "retry_scheduled"):
        return state
    if record["claim"]:
        return f"{state}/in_flight"
    if record["wait"]:
        return f"{state}/parked_{record['wait']}"
    if state == "retry_scheduled" and now_s < (record["retry_at"] or 0):
        return f"{state}/retry_delay"
    return f"{state}/queued"


def dead_breakdown(records: dict[str, dict[str, Any]], now_s: float) -> dict[str, Any]:
    attempts = Counter(len(r["attempts"]) for r in records.values())
    errors = Counter(str(r["attempts"][0].get("error") or r["attempts"][0].get("status"))
                     for r in records.values() if r["attempts"])
    return {
        "events": len(records),
        "by_state": dict(sorted(Counter(where(r, now_s) for r in records.values()).items())),
        "attempts_recorded": {"none": attempts[0], "one": attempts[1], "two": attempts[2]},
        "first_attempt_outcomes": dict(errors),
    }


def worker_log_trouble(log_path: Path) -> tuple[dict[str, int], list[str]]:
    """Warnings and errors in the worker's log: counts per (level, event), and the first
    line of each kind. The engine logs JSON lines; Celery its own ``LEVEL/Process`` lines."""
    counts: Counter[str] = Counter()
    samples: dict[str, str] = {}
    for line in log_path.read_text(errors="replace").splitlines():
        kind = None
        if line.startswith("{"):
            try:
                entry = json.loads(line)
            except ValueError:
                entry = {}
            # An attempt's own log line (a failed call is a warning) is the dead buyer's normal.
            if entry.get("level") in ("warning", "error", "critical") and entry.get("event") != "attempt":
                kind = f"{entry['level']} {entry.get('event')}"
        else:
            for level in ("WARNING", "ERROR", "CRITICAL"):
                if f": {level}/" in line:
                    kind = f"celery {level}"
            if line.startswith("Traceback"):
                kind = "traceback"
        if kind:
            counts[kind] += 1
            samples.setdefault(kind, line[:400])
    return dict(counts), list(samples.values())


def tasks_per_child(log_path: Path) -> dict[str, int]:
    """Delivery tasks each prefork pool child ran (Celery's "succeeded" lines)."""
    found = re.findall(r"INFO/(ForkPoolWorker-\d+)\] Task cgrid\.deliver\[[^]]*\] succeeded",
                       log_path.read_text(errors="replace"))
    return dict(sorted(Counter(found).items()))


# -- one phase ---------------------------------------------------------------------------------


def make_phase_events(prefix: str, n: int, dead_share: float, healthy_port: int,
                      dead_port: int | None) -> list[dict[str, Any]]:
    """``n`` events; every event whose index crosses a multiple of ``1/dead_share`` goes to
    the dead buyer (an even spread, exactly ``dead_share`` of them), the rest to the healthy
    buyers in turn."""
    events = []
    healthy = 0
    for i in range(n):
        event_id = f"{prefix}-{i}"
        if dead_port is not None and int((i + 1) * dead_share) > int(i * dead_share):
            buyer, port = DEAD_BUYER, dead_port
        else:
            buyer, port = HEALTHY_BUYERS[healthy % len(HEALTHY_BUYERS)], healthy_port
            healthy += 1
        events.append({"id": event_id, "kind": "burl", "upstream": "s2s", "buyer": buyer,
                       "url": f"http://127.0.0.1:{port}/win?e={event_id}"})
    return events


def latency_figures(published_at: dict[str, float], started: dict[str, tuple[float, float]]) -> dict[str, Any]:
    """p50/p99/max of publish() → first call started; and, to tell the publisher's share from
    the fleet's, the p99 of publish() → accepted in the ledger and of accepted → call."""
    called = [i for i in published_at if i in started]
    figures: dict[str, Any] = {"events": len(published_at), "called": len(called),
                               "uncalled": len(published_at) - len(called)}
    lat_ms = sorted((started[i][1] - published_at[i]) * 1000 for i in called)
    to_ledger_ms = sorted((started[i][0] - published_at[i]) * 1000 for i in called)
    to_call_ms = sorted((started[i][1] - started[i][0]) * 1000 for i in called)
    if lat_ms:
        figures.update(p50_ms=round(statistics.median(lat_ms), 1), p99_ms=round(percentile(lat_ms, 0.99), 1),
                       max_ms=round(lat_ms[-1], 1),
                       p99_publish_to_accepted_ms=round(percentile(to_ledger_ms, 0.99), 1),
                       p99_accepted_to_call_ms=round(percentile(to_call_ms, 0.99), 1))
    else:
        figures.update(p50_ms=None, p99_ms=None, max_ms=None, p99_publish_to_accepted_ms=None,
                       p99_accepted_to_call_ms=None)
    # Where in the phase the tail sits: the slowest publish → call of each second.
    if called:
        first = min(published_at.values())
        per_second: dict[int, float] = {}
        for i in called:
            second = int(published_at[i] - first)
            per_second[second] = max(per_second.get(second, 0.0), (started[i][1] - published_at[i]) * 1000)
        figures["max_ms_per_second"] = [round(per_second.get(t, 0.0)) for t in range(max(per_second) + 1)]
    return figures


# -- the whole measurement ---------------------------------------------------------------------


def run_isolation(redis_url: str, workdir: Path, *, rate: int = 300, dead_share: float = 0.3,
                  phase_s: float = 15.0, processes: int = 2, warmup_s: float = 1.0,
                  called_within_s: float = 30.0, extra_env: dict[str, str] | None = None,
                  progress: bool = False) -> dict[str, Any]:
    """Phase A then phase B on one prefork fleet (``-c processes``), after ``warmup_s`` of
    unmeasured healthy traffic; see the module docstring.
    ``called_within_s``: how long after the end of a phase every healthy event must have had
    its first call (a generous wait: it counts events left uncalled, not latency).
    ``extra_env``: more CGRID_* settings for the fleet (tests shorten CGRID_RETRY_DELAY_S so
    that the dead buyer's retries fall inside a short phase)."""

    def say(text: str) -> None:
        if progress:
            print(f"[isolation] {text}", flush=True)

    workdir.mkdir(parents=True, exist_ok=True)
    run = f"iso{time.time_ns() // 1_000_000 % 10**10}"
    env = fleet_env(redis_url, {"CGRID_TIMEOUT_S": str(TIMEOUT_S), "PYTHONUNBUFFERED": "1", **(extra_env or {})})
    settings = Settings.from_env(env)
    client = redis.Redis.from_url(redis_url)
    calls_file = workdir / f"{run}-dead-calls.txt"
    n = int(rate * phase_s)
    healthy_buyer = dead_buyer = None
    fleet = WorkerProcess(env, workdir / f"{run}-worker.log", concurrency=processes, name=run)
    try:
        healthy_buyer = start_buyer("fast")
        dead_buyer = start_buyer("dead", "--calls-file", str(calls_file))
        fleet.start(timeout_s=60)
        with Publisher(settings) as publisher:
            # Warm-up, not measured: the pool children's engines, connections, scripts.
            warm = make_phase_events(f"{run}-w", max(1, int(rate * warmup_s)), 0.0, healthy_buyer.port, None)
            warm_called = wait_for_first_calls(client, list(publish_paced(publisher, warm, rate)), called_within_s)
            if len(warm_called) < len(warm):
                trouble, samples = worker_log_trouble(fleet.log_path)
                raise RuntimeError(f"the fleet called {len(warm_called)} of {len(warm)} warm-up events within "
                                   f"{called_within_s} s; worker log {fleet.log_path}: {trouble} {samples[:3]}")
            say(f"phase A: {n} events at {rate}/s to {len(HEALTHY_BUYERS)} healthy buyers")
            events_a = make_phase_events(f"{run}-a", n, 0.0, healthy_buyer.port, None)
            published_a = publish_paced(publisher, events_a, rate)
            started_a = wait_for_first_calls(client, list(published_a), called_within_s)
            alone = latency_figures(published_a, started_a)
            say(f"phase A: p50 {alone['p50_ms']} ms, p99 {alone['p99_ms']} ms; "
                f"phase B: {dead_share:.0%} of the events to a dead buyer")

            events_b = make_phase_events(f"{run}-b", n, dead_share, healthy_buyer.port, dead_buyer.port)
            published_b = publish_paced(publisher, events_b, rate)
        healthy_b = [e["id"] for e in events_b if e["buyer"] != DEAD_BUYER]
        dead_b = [e["id"] for e in events_b if e["buyer"] == DEAD_BUYER]
        started_b = wait_for_first_calls(client, healthy_b, called_within_s)
        beside = latency_figures({i: published_b[i] for i in healthy_b}, started_b)
        dead_live = dead_breakdown(read_ledger(client, dead_b), redis_now(client))
        say(f"phase B: p50 {beside['p50_ms']} ms, p99 {beside['p99_ms']} ms; stopping the fleet")
    finally:
        stopping = time.monotonic()
        fleet.stop(timeout_s=60)  # SIGTERM to the main process: warm shutdown
        stop_s = time.monotonic() - stopping
        for buyer in (healthy_buyer, dead_buyer):
            if buyer is not None:
                buyer.stop()
    # After the fleet stopped (warm shutdown: calls in flight ended and were recorded): the
    # final count of the dead buyer's calls, against the ledger's attempts.
    dead_records = read_ledger(client, dead_b)
    calls = dead_calls(calls_file)
    recorded = {i: len(r["attempts"]) for i, r in dead_records.items()}
    log_events, log_samples = worker_log_trouble(fleet.log_path)
    p99_a, p99_b = alone["p99_ms"], beside["p99_ms"]
    raise_ms = round(p99_b - p99_a, 1) if p99_a is not None and p99_b is not None else None
    bound_ms = round(max(RAISE_BOUND_MS, p99_a or 0.0), 1)
    return {
        "run": run, "rate": rate, "dead_share": dead_share, "phase_s": phase_s, "processes": processes,
        "timeout_s": settings.timeout_s, "retry_delay_s": settings.retry_delay_s,
        "buyer_max_concurrency": settings.buyer_max_concurrency,
        "alone": alone,
        "beside_dead": beside,
        "raise_ms": raise_ms,
        "bound_ms": bound_ms,
        "bound_holds": raise_ms is not None and raise_ms <= bound_ms and beside["uncalled"] == 0,
        "uncalled_healthy": beside["uncalled"],
        "dead": {
            "at_end_of_phase": dead_live,
            "after_stop": dead_breakdown(dead_records, redis_now(client)),
            "calls_received": sum(calls[i] for i in dead_b),
            "events_called": sum(1 for i in dead_b if calls[i]),
            "max_calls_per_event": max((calls[i] for i in dead_b), default=0),
            # The buyer saw a call the ledger has no attempt for, or the other way round
            # (an attempt that never reached it: refused, not connected).
            "calls_beyond_ledger": sum(1 for i in dead_b if calls[i] > recorded[i]),
            "ledger_beyond_calls": sum(1 for i in dead_b if recorded[i] > calls[i]),
            "unknown_calls": sum(c for i, c in calls.items() if i not in recorded),
        },
        "tasks_per_pool_child": tasks_per_child(fleet.log_path),
        "fleet_stop_s": round(stop_s, 1),
        "worker_log": str(fleet.log_path),
        "worker_log_trouble": log_events,
        "worker_log_samples": log_samples,
    }


def print_report(r: dict[str, Any]) -> None:
    a, b, d = r["alone"], r["beside_dead"], r["dead"]
    print(f"\nbuyer isolation: {r['rate']} events/s for {r['phase_s']} s per phase, prefork -c {r['processes']}, "
          f"CGRID_TIMEOUT_S={r['timeout_s']}, CGRID_RETRY_DELAY_S={r['retry_delay_s']}, "
          f"lane cap {r['buyer_max_concurrency']}/process")
    print(f"  healthy alone:            p50 {a['p50_ms']} ms, p99 {a['p99_ms']} ms, max {a['max_ms']} ms "
          f"({a['called']}/{a['events']} called)")
    print(f"  healthy beside dead {r['dead_share']:.0%}: p50 {b['p50_ms']} ms, p99 {b['p99_ms']} ms, "
          f"max {b['max_ms']} ms ({b['called']}/{b['events']} called, {b['uncalled']} uncalled)")
    print(f"    p99 publish→accepted / accepted→call: alone {a['p99_publish_to_accepted_ms']} / "
          f"{a['p99_accepted_to_call_ms']} ms, beside {b['p99_publish_to_accepted_ms']} / "
          f"{b['p99_accepted_to_call_ms']} ms")
    print(f"    slowest per second, alone:  {a.get('max_ms_per_second')}")
    print(f"    slowest per second, beside: {b.get('max_ms_per_second')}")
    print(f"  p99 raised by {r['raise_ms']} ms; bound {r['bound_ms']} ms (max(250 ms, p99 alone)) and none "
          f"uncalled: {'holds' if r['bound_holds'] else 'BROKEN'}")
    print(f"  dead buyer: {d['at_end_of_phase']['events']} events; at the end of phase B "
          f"{d['at_end_of_phase']['by_state']}")
    print(f"    after stop {d['after_stop']['by_state']}; attempts {d['after_stop']['attempts_recorded']}, "
          f"first attempts {d['after_stop']['first_attempt_outcomes']}")
    print(f"    {d['calls_received']} calls received for {d['events_called']} events; max calls per event "
          f"{d['max_calls_per_event']}; calls beyond the ledger {d['calls_beyond_ledger']}, "
          f"attempts beyond the calls {d['ledger_beyond_calls']}")
    print(f"  delivery tasks per pool child: {r['tasks_per_pool_child']}; warm shutdown took {r['fleet_stop_s']} s")
    if r["worker_log_trouble"]:
        print(f"  worker log warnings/errors: {r['worker_log_trouble']}")
        for line in r["worker_log_samples"]:
            print(f"    {line[:300]}")


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.isolation", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=int, default=300)
    parser.add_argument("--dead-share", type=float, default=0.3)
    parser.add_argument("--phase-s", type=float, default=15.0)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="print the result as JSON too")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, calls)")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="cgrid-isolation-"))
    server = RedisServer(workdir / "redis").start()
    try:
        result = run_isolation(server.url, workdir, rate=args.rate, dead_share=args.dead_share,
                               phase_s=args.phase_s, processes=args.processes, progress=True)
    finally:
        server.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print_report(result)
    if args.json:
        print(json.dumps(result, indent=2))
    if args.keep:
        print(f"\nwork directory kept: {workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
