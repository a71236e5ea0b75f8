"""The ceiling: the worker's own HTTP call (``worker.delivery.deliver``) in a bare loop, no
queue, no ledger. One process of the benchmark's ceiling; ``bench.run`` starts one per core.

    python -m bench.ceiling --mode threads|gevent --concurrency N --events FILE

``threads`` runs N OS threads (N=1 is a plain loop); ``gevent`` runs N greenlets under the
monkey patch, as ``celery worker -P gevent`` does. Prints one JSON line: calls answered,
loop seconds and CPU seconds.
"""

from __future__ import annotations

import sys

if "gevent" in sys.argv:  # the patch must come before anything imports socket or threading
    from gevent import monkey

    monkey.patch_all()

import argparse
import json
import threading
import time
from pathlib import Path

from cgrid.event import Event
from cgrid.settings import parse_networks
from worker.delivery import deliver
from worker.http_client import make_pool


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ceiling")
    parser.add_argument("--mode", choices=["threads", "gevent"], required=True)
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--events", type=Path, required=True, help="file of event JSON lines")
    parser.add_argument("--timeout-s", type=float, default=2.0)
    args = parser.parse_args()
    events = [Event.from_json(line) for line in args.events.read_text().splitlines() if line]
    pool = make_pool(parse_networks("127.0.0.0/8"), maxsize=max(args.concurrency, 1))
    answered = 0
    lock = threading.Lock()

    def loop(share: list[Event]) -> None:
        nonlocal answered
        for event in share:
            if deliver(event, pool, attempt_n=1, timeout_s=args.timeout_s).status is not None:
                with lock:
                    answered += 1

    started, cpu0 = time.perf_counter(), time.process_time()
    workers = [threading.Thread(target=loop, args=(events[i::args.concurrency],)) for i in range(args.concurrency)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    print(json.dumps({"calls": len(events), "answered": answered, "seconds": time.perf_counter() - started,
                      "cpu_s": time.process_time() - cpu0}))


if __name__ == "__main__":
    main()
