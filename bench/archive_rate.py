"""How fast one archiver writes, and how big its lines are, measured.

    .venv/bin/python -m bench.archive_rate [--events 100000] [--runs 3]

Per run: a private redis-server with the project's tuning, the archive stream's group made,
``--events`` delivered events recorded through the real ledger scripts (accept, claim,
finish with the final record the worker builds: ``bench/ledger_memory.py``'s events), so
the stream holds that many final records; then one ``cgrid-s2s archive`` process is started
and timed from its first line on disk until the stream is empty (every line written,
fsynced, acknowledged). Reports lines per second, bytes per line and gzip's ratio on the
file. Saves ``bench/results/<time>-archive-rate.json``. Measures, asserts nothing.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

from archive.files import ensure_group, stream_key
from bench.ledger_memory import accept, finish, make_events
from cgrid.ledger import Ledger
from cgrid.redis_server import RedisServer

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def one_run(n: int, run: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="cgrid-archive-rate-") as tmp:
        server = RedisServer(Path(tmp) / "redis").start()
        archiver = None
        try:
            client = redis.Redis.from_url(server.url)
            ensure_group(client)
            ledger = Ledger(client)
            events = make_events(f"r{run}", n)
            accept(ledger, events)
            finish(ledger, events, failed=False)
            backlog = ledger.archive_backlog()
            assert backlog is not None and backlog[0] == n
            root = Path(tmp) / "archive"
            env = {k: v for k, v in os.environ.items() if not k.startswith("CGRID_")}
            env["CGRID_REDIS_URL"] = server.url
            archiver = subprocess.Popen([sys.executable, "-m", "ops.cli", "archive", "--dir", str(root),
                                         "--name", "bench"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
            give_up = time.monotonic() + 600
            while not any(root.glob("*/bench.jsonl")):
                if time.monotonic() > give_up or archiver.poll() is not None:
                    raise RuntimeError("the archiver wrote nothing")
                time.sleep(0.005)
            started = time.monotonic()
            while client.xlen(stream_key()):
                if time.monotonic() > give_up:
                    raise RuntimeError("the archiver did not catch up in 600 s")
                time.sleep(0.005)
            seconds = time.monotonic() - started
            files = list(root.glob("*/bench.jsonl"))
            data = b"".join(path.read_bytes() for path in files)
            lines = data.count(b"\n")
            return {"events": n, "lines": lines, "seconds": round(seconds, 3),
                    "load_average_1m": round(os.getloadavg()[0], 2),  # the machine is shared
                    "lines_per_s": round(lines / seconds), "bytes_per_line": round(len(data) / lines, 1),
                    "gzip_ratio": round(len(data) / len(gzip.compress(data)), 1)}
        finally:
            if archiver is not None:
                archiver.send_signal(signal.SIGTERM)
                archiver.wait(60)
            server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.archive_rate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    runs = []
    for run in range(args.runs):
        runs.append(one_run(args.events, run))
        print(json.dumps(runs[-1]))
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{time.strftime('%Y%m%d-%H%M%S')}-archive-rate.json"
    path.write_text(json.dumps({"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
                                "args": sys.argv[1:], "archive_rate": runs}, indent=2))
    print(f"saved {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
