"""What the benchmark's scenarios share: the buyer server under test, the fleet's
environment, waiting, percentiles."""

from __future__ import annotations

import math
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.buyers import find_nginx, start_nginx
from cgrid.redis_server import free_port
from producer import Publisher
from tests.helpers import process_tree

ROOT = Path(__file__).resolve().parent.parent


def wait_until(condition: Any, timeout_s: float, poll_s: float = 0.05) -> bool:
    give_up = time.monotonic() + timeout_s
    while time.monotonic() < give_up:
        if condition():
            return True
        time.sleep(poll_s)
    return False


@dataclass
class Buyer:
    kind: str
    port: int
    process: subprocess.Popen[bytes]
    workdir: str | None = None  # nginx's configuration and logs

    @classmethod
    def start(cls, scenario: str, hang_s: float) -> Buyer:
        port = free_port()
        if scenario == "fast" and find_nginx():
            process, workdir = start_nginx(port)
            kind = "nginx"
        else:
            process = subprocess.Popen([sys.executable, "-m", "bench.buyers", scenario, "--port", str(port),
                                        "--hang-s", str(hang_s)], cwd=ROOT)
            kind, workdir = f"asyncio ({scenario})", None
        def listening() -> bool:
            with socket.socket() as sock:
                return sock.connect_ex(("127.0.0.1", port)) == 0

        wait_until(listening, 10)
        return cls(kind, port, process, workdir)

    def pids(self) -> list[int]:
        return process_tree(self.process.pid)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


def bench_event(run: str, i: int, buyer: str, origin: str) -> dict[str, Any]:
    """Event ``i`` of a bench run: a billing notice to ``origin`` (scheme://host:port) with the
    macros and the user's data a real one carries."""
    return {"id": f"{run}-{i}", "kind": "burl", "upstream": "u2s", "buyer": buyer,
            "url": f"{origin}/win?e={run}-{i}&p=${{AUCTION_PRICE}}&a=${{AUCTION_ID}}",
            "macros": {"AUCTION_PRICE": 1.25 + i % 7, "AUCTION_ID": f"auction-{i}"},
            "user_agent": "Mozilla/5.0 (iPhone; CPU iPhone OS 17_2 like Mac OS X) AppleWebKit/605.1.15",
            "forwarded_for": ["77.16.215.3", "18.196.6.164"]}


def publishes_like(code: Path) -> dict[str, str]:
    """The settings that make this checkout's publisher send what the workers of the
    checkout ``code`` take: an older commit's workers take no shared trigger, so a publisher
    in this process (``make bench``'s events published first, the latency part) sends them
    triggers with ids, as that commit's own publisher did."""
    broker = code / "cgrid" / "broker.py"
    if broker.exists() and "def send_shared" not in broker.read_text():
        return {"CGRID_SHARED_TRIGGERS": "0"}
    return {}


def fleet_env(redis_url: str, extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CGRID_")}
    env.update({"CGRID_REDIS_URL": redis_url, "CGRID_ALLOWED_NETWORKS": "127.0.0.0/8",
                "CGRID_LOG_LEVEL": "WARNING", **extra})
    return env


def percentile(sorted_values: list[float], q: float) -> float:
    """The nearest-rank percentile of already sorted values."""
    return sorted_values[max(0, math.ceil(len(sorted_values) * q) - 1)]


def publish_paced(publisher: Publisher, events: list[dict[str, Any]], rate: int) -> dict[str, float]:
    """Publish at ``rate`` events/s to a schedule; returns when each was handed to publish()."""
    published_at: dict[str, float] = {}
    started = time.perf_counter()
    for i, event in enumerate(events):
        pause = started + i / rate - time.perf_counter()
        if pause > 0:
            time.sleep(pause)
        published_at[event["id"]] = time.time()
        publisher.publish(event)
    publisher.flush()
    return published_at
