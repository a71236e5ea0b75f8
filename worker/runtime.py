"""Per-process resources: settings, the ledger's Redis client, the HTTP pool and the
delivery engine. Built lazily in each process, after fork."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import redis
import urllib3

from cgrid.ledger import Ledger
from cgrid.settings import Settings
from worker.http_client import make_pool

if TYPE_CHECKING:
    from worker.engine import DeliveryEngine


def redis_client(settings: Settings) -> redis.Redis:
    return redis.Redis.from_url(
        settings.redis_url,
        socket_timeout=5.0,
        socket_connect_timeout=settings.publish_timeout_s,
        health_check_interval=30,
    )


@dataclass
class Runtime:
    settings: Settings
    ledger: Ledger
    pool: urllib3.PoolManager
    pid: int
    _engine: DeliveryEngine | None = field(default=None, repr=False)

    @property
    def engine(self) -> DeliveryEngine:
        from worker.engine import DeliveryEngine

        if self._engine is None:
            with _lock:
                if self._engine is None:
                    self._engine = DeliveryEngine(self)
        return self._engine


_runtime: Runtime | None = None
_lock = threading.Lock()


def get_runtime(settings: Settings) -> Runtime:
    global _runtime
    if _runtime is None or _runtime.pid != os.getpid():
        with _lock:
            if _runtime is None or _runtime.pid != os.getpid():
                _runtime = Runtime(
                    settings=settings,
                    ledger=Ledger(redis_client(settings)),
                    pool=make_pool(settings.allowed_networks, settings.call_concurrency),
                    pid=os.getpid(),
                )
    return _runtime


def current_runtime() -> Runtime | None:
    """This process's runtime, if it has made one (for shutdown)."""
    return _runtime if _runtime is not None and _runtime.pid == os.getpid() else None
