"""The delivery engine alone: a worker's call loop and ledger thread without Celery or Redis.

    python -m bench.engine_loop [--calls 45000] [--rate 3000] [--chunk 60]

Runs ``delivery.engine.DeliveryEngine`` in this process against the fast buyer (nginx; without
it, the bench's own asyncio one), with a ledger that only counts what it is given (every
attempt is taken as delivered). Claims are
handed to the engine ``--chunk`` events at a time, at ``--rate`` events per second (0: as fast
as the engine takes them, in claims of 500), after 5,000 calls of warm-up. Prints the CPU per
call of each of the engine's threads (``cgrid-curl-loop``, ``cgrid-ledger``; ``main`` is the
feeding) from ``/proc``. It measures and prints; it asserts nothing. Compare two checkouts by
running it from each (``cd /path/to/checkout && python -m bench.engine_loop``), alternating.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from typing import Any

from bench.common import Buyer, bench_event
from bench.run import cpu_seconds_by_thread
from cgrid.event import Event
from cgrid.ledger import Park
from cgrid.logs import configure
from cgrid.settings import Settings
from delivery.engine import DeliveryEngine

WARM_UP = 5_000
FULL_SPEED_CHUNK = 500


class CountingLedger:
    """The ledger calls an engine makes, in memory: outcomes counted (every attempt taken as
    delivered); what a full lane hands back (parks) kept per buyer and pulled back from there."""

    def __init__(self, events: dict[str, str]) -> None:
        self.events = events  # id -> the event's JSON, as a claim returns it
        self.finished = 0
        self.parks = 0  # attempts handed back by a full lane (then pulled back)
        self.parked: dict[str, list[tuple[int, str]]] = {}  # buyer -> (attempt n, id), oldest first
        self._lock = threading.Lock()

    def finish(self, finishes: list[Any], attempt_n: int, **_: Any) -> list[str]:
        with self._lock:
            self.finished += len(finishes)
        return ["delivered"] * len(finishes)

    def park(self, parks: list[Park]) -> None:
        with self._lock:
            self.parks += len(parks)
            for park in parks:
                self.parked.setdefault(park.buyer, []).append((park.attempt_n, park.event_id))

    def pull(self, buyer: str, k: int, *, stamp: list[str], **_: Any) -> tuple[int, list[tuple[int, str, str]]]:
        with self._lock:
            waiting = self.parked.get(buyer, [])
            taken, self.parked[buyer] = waiting[:k], waiting[k:]
            stamp.append("pulled")
            return len(self.parked[buyer]), [(n, event_id, self.events[event_id]) for n, event_id in taken]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.engine_loop")
    parser.add_argument("--calls", type=int, default=45_000, help="calls measured after the warm-up")
    parser.add_argument("--rate", type=float, default=3_000.0, help="events per second (0: as fast as taken)")
    parser.add_argument("--chunk", type=int, default=60, help="events per claim handed to the engine")
    args = parser.parse_args()
    configure("WARNING")
    buyer = Buyer.start("fast", hang_s=3.0)  # nginx when installed
    port = buyer.port
    try:
        settings = Settings.from_env({"CGRID_REDIS_URL": "redis://127.0.0.1:1/0",  # never connected to
                                      "CGRID_ALLOWED_NETWORKS": "127.0.0.0/8"})
        total = WARM_UP + args.calls
        events = [Event.from_json(json.dumps(bench_event("e", i, f"buyer-{i % 4}", f"http://127.0.0.1:{port}")))
                  .to_json() for i in range(total)]
        ledger = CountingLedger({f"e-{i}": event for i, event in enumerate(events)})
        engine = DeliveryEngine(settings, ledger)  # type: ignore[arg-type]
        chunk = args.chunk if args.rate else FULL_SPEED_CHUNK

        def hand_over(start: int, end: int) -> None:
            claimed = [(f"e-{i}", events[i]) for i in range(start, end)]
            engine.reserve(len(claimed))
            engine.submit(claimed, 1, len(claimed))

        def wait_finished(n: int) -> None:
            while ledger.finished < n:
                time.sleep(0.01)

        for start in range(0, WARM_UP, chunk):
            hand_over(start, min(start + chunk, WARM_UP))
        wait_finished(WARM_UP)
        pid = os.getpid()
        cpu_before, started = cpu_seconds_by_thread([pid]), time.perf_counter()
        for k, start in enumerate(range(WARM_UP, total, chunk)):
            if args.rate:
                pause = started + k * chunk / args.rate - time.perf_counter()
                if pause > 0:
                    time.sleep(pause)
            hand_over(start, min(start + chunk, total))
        wait_finished(total)
        seconds = time.perf_counter() - started
        cpu_after = cpu_seconds_by_thread([pid])
        per_call_us = {name: round((cpu_after[name] - cpu_before.get(name, 0.0)) / args.calls * 1e6, 1)
                       for name in sorted(cpu_after)}
        print(json.dumps({"calls": args.calls, "rate": round(args.calls / seconds), "chunk": chunk,
                          "cpu_us_per_call_by_thread": per_call_us, "parked": ledger.parks}))
    finally:
        buyer.stop()


if __name__ == "__main__":
    main()
