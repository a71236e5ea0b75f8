"""Per-process resources: settings, the ledger's Redis client and the delivery engine.
Built lazily in each process, after fork (libcurl's multi handle must never cross a fork)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

import redis

from cgrid.ledger import Ledger
from cgrid.redis_conn import redis_client as connect
from cgrid.settings import REDIS_SOCKET_TIMEOUT_S, Settings

if TYPE_CHECKING:
    from worker.engine import DeliveryEngine

T = TypeVar("T")


def ride_out_redis(call: Callable[[], T], budget_s: float) -> T:
    """``call()``, tried again with backoff (50 ms, doubling to 1 s) while Redis errors
    last no longer than ``budget_s``; after that the last error is raised."""
    give_up_at = time.monotonic() + budget_s
    delay_s = 0.05
    while True:
        try:
            return call()
        except redis.RedisError:
            if time.monotonic() + delay_s > give_up_at:
                raise
            time.sleep(delay_s)
            delay_s = min(delay_s * 2, 1.0)


def redis_client(settings: Settings) -> redis.Redis:
    return connect(settings, socket_timeout_s=REDIS_SOCKET_TIMEOUT_S,
                   socket_connect_timeout_s=settings.publish_timeout_s, health_check_interval_s=30)


@dataclass
class Runtime:
    settings: Settings
    ledger: Ledger
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

    def drain(self, timeout_s: float) -> bool:
        """Wait until the attempts this process claimed are made and recorded (a process
        that never delivered has nothing to wait for)."""
        return self._engine is None or self._engine.drain(timeout_s)


_runtime: Runtime | None = None
_lock = threading.Lock()


def get_runtime(settings: Settings) -> Runtime:
    global _runtime
    if _runtime is None or _runtime.pid != os.getpid():
        with _lock:
            if _runtime is None or _runtime.pid != os.getpid():
                _runtime = Runtime(
                    settings=settings,
                    ledger=Ledger(redis_client(settings), wait_replicas=settings.redis_wait_replicas,
                                  wait_timeout_ms=settings.redis_wait_timeout_ms),
                    pid=os.getpid(),
                )
    return _runtime


def current_runtime() -> Runtime | None:
    """This process's runtime, if it has made one (for shutdown)."""
    return _runtime if _runtime is not None and _runtime.pid == os.getpid() else None
