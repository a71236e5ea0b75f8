"""A worker's memory against the number of distinct buyer ids it serves, measured.

    .venv/bin/python -m bench.lane_memory [--buyers 40000] [--label NAME]

Starts a private redis-server, a local buyer (nginx when installed, else bench/buyers.py) and
one solo worker with metrics on (``CGRID_METRICS_PORT``: per-buyer series), then publishes
two bursts of events, each to ``--buyers`` buyer ids never seen before (one event per id),
and reads the worker's resident memory (``VmRSS``): at start, after the first burst is
delivered, after its lanes have been idle past ``LANE_IDLE_S`` (delivery/lanes.py), and after
the second burst. Lanes and label sets that are never freed grow with every burst; bounded
ones do not. Saves ``bench/results/<time>-lane-memory.json``. Measures, asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

from bench.common import Buyer, wait_until
from cgrid.redis_server import RedisServer, free_port
from cgrid.settings import Settings
from producer import Publisher

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
IDLE_WAIT_S = 75.0  # delivery/lanes.py's LANE_IDLE_S (60 s), and the engine's next look (every 10 s)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError(f"no VmRSS for {pid}")


def delivered(client: redis.Redis, buyers: int, burst: int) -> bool:
    counts = client.hgetall(f"cgrid:report:{time.strftime('%Y-%m-%d', time.gmtime())}")
    total = sum(int(v) for k, v in counts.items() if k.endswith(b"\tdelivered_first"))
    return total >= buyers * burst


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.lane_memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--buyers", type=int, default=40_000, help="distinct buyer ids per burst")
    parser.add_argument("--label", default="", help="a name for this run in the results file")
    parser.add_argument("--no-metrics", action="store_true", help="run the worker without CGRID_METRICS_PORT")
    parser.add_argument("--wait-s", type=float, default=900, help="how long a burst may take to be delivered")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cgrid-lanes-") as tmp:
        server = RedisServer(Path(tmp) / "redis").start()
        buyer = Buyer.start("fast", 0.0)
        env = {k: v for k, v in os.environ.items() if not k.startswith("CGRID_")}
        env.update(CGRID_REDIS_URL=server.url, CGRID_ALLOWED_NETWORKS="127.0.0.0/8", PYTHONUNBUFFERED="1")
        if not args.no_metrics:
            env["CGRID_METRICS_PORT"] = str(free_port())
        log = open(Path(tmp) / "worker.log", "wb")
        worker = subprocess.Popen([sys.executable, "-m", "celery", "-A", "worker", "worker", "-P", "solo",
                                   "--loglevel", "WARNING", "--without-mingle", "--without-gossip"],
                                  cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        out: dict[str, Any] = {"buyers_per_burst": args.buyers, "label": args.label, "metrics": not args.no_metrics}
        try:
            client = redis.Redis.from_url(server.url)
            time.sleep(5)  # the worker's start
            out["rss_mib_start"] = rss_mib(worker.pid)
            settings = Settings.from_env(env)
            for burst in (1, 2):
                started = time.monotonic()
                with Publisher(settings) as publisher:
                    publisher.publish_many([
                        {"id": f"lanes-{burst}-{i}", "kind": "burl", "upstream": "s2s", "buyer": f"b{burst}-{i:06d}",
                         "url": f"http://127.0.0.1:{buyer.port}/win?e={burst}-{i}"} for i in range(args.buyers)])
                done = wait_until(lambda b=burst: delivered(client, args.buyers, b), args.wait_s, 0.5)
                out[f"burst_{burst}_s"] = round(time.monotonic() - started, 1) if done else None  # None: not in time
                out[f"rss_mib_after_burst_{burst}"] = rss_mib(worker.pid)
                if not done:
                    break
                if burst == 1:
                    time.sleep(IDLE_WAIT_S)
                    out["rss_mib_after_idle"] = rss_mib(worker.pid)
        finally:
            worker.terminate()
            worker.wait(60)
            buyer.stop()
            server.stop()
    print(json.dumps(out, indent=2))
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{time.strftime('%Y%m%d-%H%M%S')}-lane-memory.json"
    path.write_text(json.dumps({"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
                                "args": sys.argv[1:], "lane_memory": out}, indent=2))
    print(f"saved {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
