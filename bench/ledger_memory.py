"""Bytes of Redis memory per ledger record and per archive stream entry, measured.

    .venv/bin/python -m bench.ledger_memory [--events 100000]

Starts a private redis-server with the project's tuning (cgrid.redis_server.RedisServer:
LEDGER_REDIS_TUNING, noeviction), records events through the real ledger scripts (accept,
claim, finish as the worker calls them, with the final record the worker builds), and reads
``INFO memory`` ``used_memory`` before and after each step. Events like the benchmark's: a
90-character URL with two macros, an 80-character user agent, two addresses, and an id of
the ``auction:imp:kind`` shape (37 characters). Prints bytes per event for: pending, the
final record of a delivered and of a failed event, and the archive stream's entry; and the
arithmetic for 500 million events a day. Saves ``bench/results/<time>-ledger-memory.json``.
Measures, asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

from archive.files import ensure_group, stream_key
from cgrid.event import Event, parse_event
from cgrid.ledger import Finish, Ledger, Outcome
from cgrid.redis_server import RedisServer

CHUNK = 500
RESULTS = Path(__file__).resolve().parent / "results"
TTL = dict(ledger_ttl_s=7200, report_ttl_s=7200)


def make_events(run: str, n: int) -> list[Event]:
    return [parse_event({
        "id": f"auction-{run}-{i:09d}:imp-1:burl", "kind": "burl", "upstream": "u2s", "buyer": f"dsp{i % 40}",
        "url": f"https://bid.dsp{i % 40}.example/win?e={i:09d}&p=${{AUCTION_PRICE}}&a=${{AUCTION_ID}}&x=abcdefghij",
        "macros": {"AUCTION_PRICE": 1.25 + i % 7, "AUCTION_ID": f"auction-{i}"},
        "user_agent": "Mozilla/5.0 (iPhone; CPU iPhone OS 17_2 like Mac OS X) AppleWebKit/605.1.15",
        "forwarded_for": ["77.16.215.3", "18.196.6.164"]}) for i in range(n)]


def used(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def attempt_json(n: int, status: int | None, error: str | None) -> str:
    return json.dumps({"n": n, "started_at": time.time(), "ms": 41.234, "status": status, "error": error},
                      separators=(",", ":"))


def accept(ledger: Ledger, events: list[Event]) -> None:
    for start in range(0, len(events), CHUNK):
        ledger.accept(events[start:start + CHUNK], redeliver_after_s=30, **TTL)


def finish(ledger: Ledger, events: list[Event], *, failed: bool) -> None:
    for start in range(0, len(events), CHUNK):
        chunk = events[start:start + CHUNK]
        ids = [e.id for e in chunk]
        ledger.claim(ids, 1, lease_s=60, sent_at_s=0)
        if not failed:
            ledger.finish([Finish(e.id, Outcome.OK, attempt_json(1, 204, None), duration_ms=41.2,
                                  final_event=e.to_final_json(keep_call=False)) for e in chunk], 1,
                          retry_delay_s=10, **TTL)
            continue
        ledger.finish([Finish(e.id, Outcome.FAIL, attempt_json(1, 500, None), duration_ms=41.2) for e in chunk], 1,
                      retry_delay_s=0, **TTL)
        ledger.claim(ids, 2, lease_s=60, sent_at_s=0)
        ledger.finish([Finish(e.id, Outcome.FAIL, attempt_json(2, None, "timeout"), duration_ms=2000.0,
                              final_event=e.to_final_json(keep_call=True)) for e in chunk], 2,
                      retry_delay_s=10, **TTL)


def measure(n: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="cgrid-mem-") as tmp:
        server = RedisServer(Path(tmp)).start()
        try:
            client = redis.Redis.from_url(server.url)
            client.config_set("appendonly", "no")  # the AOF's buffers are not the data set
            ledger = Ledger(client)
            out: dict[str, Any] = {"events": n, "redis": client.info("server")["redis_version"]}
            # Pending, then the final record of a delivered event, with the archive off.
            events = make_events("d", n)
            base = used(client)
            accept(ledger, events)
            pending = used(client)
            out["pending_b"] = (pending - base) / n
            finish(ledger, events, failed=False)
            out["delivered_b"] = (used(client) - base) / n
            # A failed event's final record keeps its URL and macros (for replay).
            events = make_events("f", n)
            base = used(client)
            accept(ledger, events)
            finish(ledger, events, failed=True)
            out["failed_b"] = (used(client) - base) / n
            # The archive on: what each final record adds to the stream until archived.
            ensure_group(client)
            events = make_events("a", n)
            accept(ledger, events)
            finish(ledger, events, failed=False)
            before_del = used(client)
            client.xtrim(stream_key(), maxlen=0, approximate=False)
            out["stream_entry_b"] = (before_del - used(client)) / n
            memory = client.info("memory")
            out["mem_fragmentation_ratio"] = memory["mem_fragmentation_ratio"]
            out["used_memory_total"] = memory["used_memory"]
            return out
        finally:
            server.stop()


def arithmetic(figures: dict[str, Any], per_day: float = 500e6, peak_factor: float = 2.0) -> str:
    avg = per_day / 86_400
    lines = [f"average {avg:,.0f}/s, peak ({peak_factor:g}x) {avg * peak_factor:,.0f}/s"]
    finished = figures["delivered_b"]
    for ttl_s in (1800, 3600, 7200):
        for label, rate in (("average", avg), ("peak", avg * peak_factor)):
            gb = rate * ttl_s * finished / 1e9
            lines.append(f"TTL {ttl_s:>5}s at {label:>7}: {rate * ttl_s / 1e6:6.1f} M finished records x "
                         f"{finished:.0f} B = {gb:5.1f} GB")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=100_000)
    args = parser.parse_args()
    figures = measure(args.events)
    print(json.dumps(figures, indent=2))
    print(arithmetic(figures))
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{time.strftime('%Y%m%d-%H%M%S')}-ledger-memory.json"
    path.write_text(json.dumps({"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
                                "args": sys.argv[1:], "ledger_memory": figures}, indent=2))
    print(f"saved {path}")


if __name__ == "__main__":
    main()
