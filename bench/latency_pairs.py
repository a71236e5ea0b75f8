"""p99 publish -> first attempt done at one fixed rate, for several fleets in turn (one sitting).

``make bench`` measures this at half of each fleet's own rate, so a faster commit is measured
at a higher rate; this tool holds the rate equal:

    python -m bench.latency_pairs --rate 2500 CHECKOUT[,BATCH_SIZE] [CHECKOUT[,BATCH_SIZE] ...]

Each fleet (two ``-P solo`` workers and an archiver, run from CHECKOUT as ``--code`` runs
them; ``CGRID_BATCH_SIZE`` = BATCH_SIZE when given) gets the fast buyer (nginx) and
``--seconds`` of events at ``--rate`` from this process's Publisher. Prints a line per fleet
and saves JSON under bench/results/.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

from bench.common import ROOT, Buyer, fleet_env, publishes_like
from bench.run import RESULTS, Archiver, Fleet, code_commit, measure_latency
from cgrid.redis_server import RedisServer
from cgrid.settings import Settings


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.latency_pairs")
    parser.add_argument("--rate", type=int, required=True, help="events per second")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("fleets", nargs="+", metavar="CHECKOUT[,BATCH_SIZE]")
    args = parser.parse_args()
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="cgrid-latency-") as tmp:
        work = Path(tmp)
        server = RedisServer(work / "redis").start()
        buyer = Buyer.start("fast", 3.0)
        client = redis.Redis.from_url(server.url)
        try:
            for spec in args.fleets:
                code_text, _, batch = spec.partition(",")
                code = Path(code_text).resolve()
                client.flushall()
                env = fleet_env(server.url, {"CGRID_TIMEOUT_S": "2", **publishes_like(code),
                                             **({"CGRID_BATCH_SIZE": batch} if batch else {})})
                archive = Archiver(env, work / f"archive-{time.time():.0f}", client, code)
                fleet = Fleet(env, "solo", 2, work, code=code)
                try:
                    time.sleep(1.0)
                    latency = measure_latency(Settings.from_env(env), client, f"http://127.0.0.1:{buyer.port}",
                                              args.rate, args.seconds)
                finally:
                    fleet.stop()
                    archive.stop()
                run = {"code": str(code), "commit": code_commit(code), "batch_size": batch or "default", **latency}
                runs.append(run)
                print(f"{run['commit']} batch {run['batch_size']}: {args.rate}/s, p50 {run['p50_ms']} ms, "
                      f"p99 {run['p99_ms']} ms", flush=True)
        finally:
            buyer.stop()
            server.stop()
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{time.strftime('%Y%m%d-%H%M%S')}-latency.json"
    out.write_text(json.dumps({"rate": args.rate, "seconds": args.seconds, "runs": runs}, indent=2))
    print(f"saved {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
