"""Per-process resources: settings, the ledger's Redis client, the HTTP session, and
the concurrency used to deliver a batch. Built lazily in each process, after fork."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import redis
import requests

from cgrid.ledger import Ledger
from cgrid.settings import Settings
from worker.http_client import make_session

T = TypeVar("T")
R = TypeVar("R")


def redis_client(settings: Settings) -> redis.Redis:
    return redis.Redis.from_url(
        settings.redis_url,
        socket_timeout=5.0,
        socket_connect_timeout=settings.publish_timeout_s,
        health_check_interval=30,
    )


def _gevent_active() -> bool:
    try:
        from gevent import monkey
    except ImportError:
        return False
    return bool(monkey.is_module_patched("socket"))


@dataclass
class Runtime:
    settings: Settings
    ledger: Ledger
    session: requests.Session
    pid: int
    _executor: ThreadPoolExecutor | None = None

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
        """``fn`` over ``items`` with up to ``call_concurrency`` calls in flight."""
        items = list(items)
        if len(items) <= 1:
            return [fn(item) for item in items]
        if _gevent_active():
            from gevent.pool import Pool

            return list(Pool(self.settings.call_concurrency).imap(fn, items))
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self.settings.call_concurrency, "cgrid-call")
        return list(self._executor.map(fn, items))


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
                    session=make_session(settings.allowed_networks, settings.call_concurrency),
                    pid=os.getpid(),
                )
    return _runtime
