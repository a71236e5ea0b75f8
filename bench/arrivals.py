"""Events arriving while the workers run: one publisher process (an auction server's
``Publisher``) publishing a file of events at a steady rate. ``bench.run`` starts it from
the checkout under test (``--code``), so the old and the new commit each publish with their
own ledger scripts.

    python -m bench.arrivals --events FILE --rate N [--chunk K]

``--chunk 1`` publishes one event at a time, as an auction server does (``publish``).

Prints one JSON line: events published, seconds, the rate reached, CPU seconds.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from cgrid.settings import Settings
from producer import Publisher

CHUNK = 100  # events handed to publish_many at once, spaced to keep the rate (--chunk)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.arrivals")
    parser.add_argument("--events", type=Path, required=True, help="file of event JSON lines")
    parser.add_argument("--rate", type=float, required=True, help="events per second")
    parser.add_argument("--chunk", type=int, default=CHUNK, help="events handed to publish_many at once")
    args = parser.parse_args()
    events = [json.loads(line) for line in args.events.read_text().splitlines() if line]
    cpu0 = time.process_time()
    with Publisher(Settings.from_env()) as publisher:
        started = time.perf_counter()
        for start in range(0, len(events), args.chunk):
            pause = started + start / args.rate - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
            publisher.publish_many(events[start:start + args.chunk])
        publisher.flush()
        seconds = time.perf_counter() - started
    print(json.dumps({"events": len(events), "seconds": round(seconds, 3), "rate": round(len(events) / seconds),
                      "cpu_s": round(time.process_time() - cpu0, 3)}))


if __name__ == "__main__":
    main()
