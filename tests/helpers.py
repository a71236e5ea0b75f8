"""Test helpers: wait on a condition, run real worker and Flower processes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent


def parent_pids() -> dict[int, int]:
    """Every live process's parent, read from /proc."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    return parents


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    parents = parent_pids()
    tree, frontier = [pid], [pid]
    while frontier:
        frontier = [child for child, parent in parents.items() if parent in frontier]
        tree += frontier
    return tree


def wait_for(condition: Callable[[], T], timeout_s: float = 20.0, what: str = "condition") -> T:
    """Poll until ``condition()`` is truthy; fail with ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.05)


TERMINAL_STATES = frozenset({"delivered", "failed", "rejected", "expired"})


def wait_final(ledger: Any, ids: list[str], timeout_s: float = 30.0,
               what: str = "every event to reach a terminal state") -> dict[str, dict[str, Any]]:
    """Poll the ledger until every id's record is final; returns the records."""
    def done() -> dict[str, dict[str, Any]] | None:
        records = {i: ledger.record(i) for i in ids}
        if all(r is not None and r["state"] in TERMINAL_STATES for r in records.values()):
            return records  # type: ignore[return-value]
        return None

    return wait_for(done, timeout_s, what)


def get_json(url: str) -> Any:
    """GET a JSON document from a loopback URL (Flower's API); None while it does not answer."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:  # loopback only
            return json.loads(response.read())
    except OSError:
        return None


def scrape(port: int) -> dict[str, float]:
    """A worker's metrics (CGRID_METRICS_PORT on loopback): each sample's name and labels, as
    written, to its value."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def fleet_env(redis_url: str, **overrides: Any) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CGRID_")}
    env.update(
        {
            "CGRID_REDIS_URL": redis_url,
            "CGRID_ALLOWED_NETWORKS": "127.0.0.0/8",
            "CGRID_TIMEOUT_S": "0.5",
            "CGRID_RETRY_DELAY_S": "1",
            "CGRID_SWEEP_INTERVAL_S": "0.1",
            "CGRID_ATTEMPT_GRACE_S": "2",
            "CGRID_REDELIVER_AFTER_S": "3",
            "CGRID_LINGER_MS": "2",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update({k: str(v) for k, v in overrides.items()})
    return env


class WorkerProcess:
    """A real ``celery -A worker worker`` subprocess; its output goes to a log file."""

    def __init__(self, env: dict[str, str], log_path: Path, *, pool: str = "prefork",
                 concurrency: int | None = 2, name: str = "w1", queues: str | None = None,
                 app: str = "worker", as_deployed: bool = False) -> None:
        """``as_deployed``: the command line of make run, docker-compose and the systemd unit
        (no ``--without-mingle --without-gossip``); ``concurrency`` None: no ``-c``."""
        self.log_path = log_path
        self.name = name
        self.args = [
            sys.executable, "-m", "celery", "-A", app, "worker",
            "-P", pool, *(["-c", str(concurrency)] if concurrency is not None else []),
            "-n", name if "@" in name else f"{name}@%h", "--loglevel", "INFO",
            *([] if as_deployed else ["--without-mingle", "--without-gossip"]),
            *(["-Q", queues] if queues else []),
        ]
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 30.0) -> WorkerProcess:
        return self.launch().wait_ready(timeout_s)

    def launch(self) -> WorkerProcess:
        """Start the process (its own process group) without waiting for it to be ready."""
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            self.args, cwd=ROOT, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    def wait_ready(self, timeout_s: float = 30.0) -> WorkerProcess:
        wait_for(lambda: b" ready." in self.log_path.read_bytes() or self._died(), timeout_s,
                 f"worker ready ({self.log_path})")
        if self._died():
            raise AssertionError(f"worker exited at start:\n{self.log_path.read_text()[-3000:]}")
        return self

    def _died(self) -> bool:
        return self.process is not None and self.process.poll() is not None

    def signal(self, sig: int) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, sig)

    def terminate(self) -> None:
        """SIGTERM to the main process only: Celery's warm shutdown. (SIGTERM to the whole
        group would also kill the pool children mid-task.)"""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def stop(self, timeout_s: float = 20.0) -> None:
        if self.process is None:
            return
        self.terminate()
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)  # leftovers, if any
        self.process.wait()
        self._log.close()
        self.process = None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")
