"""Poisoned messages: logged, recorded in Redis (a capped list and a counter), dropped."""

from __future__ import annotations

import json
import time

import redis

from cgrid import metrics
from cgrid.ledger import POISON_COUNT_KEY, POISON_LIST_KEY
from cgrid.logs import get_logger
from cgrid.redis_conn import long_lived_client
from cgrid.settings import Settings

POISON_LIST_MAX = 1000

_settings: Settings | None = None  # handed in by the worker at start (configure)
_client: redis.Redis | None = None


def configure(settings: Settings) -> None:
    """Where poisoned messages are recorded: the ledger's Redis of these settings."""
    global _settings, _client
    _settings, _client = settings, None


def record_poison(reason: str, sample: str) -> None:
    """Never raises: a poisoned message must not take anything else down with it."""
    global _client
    get_logger().error("poisoned_message", reason=reason, sample=sample[:300])
    if metrics.ENABLED:
        metrics.M.poisoned.inc()
    try:
        if _client is None:
            if _settings is None:
                raise RuntimeError("worker.poison.configure() was not called")
            _client = long_lived_client(_settings)
        entry = json.dumps({"at": time.time(), "reason": reason, "sample": sample[:300]})
        pipe = _client.pipeline()
        pipe.lpush(POISON_LIST_KEY, entry)
        pipe.ltrim(POISON_LIST_KEY, 0, POISON_LIST_MAX - 1)
        pipe.incr(POISON_COUNT_KEY)
        pipe.execute()
    except Exception as e:  # Redis down: the log line is the record
        get_logger().warning("poison_not_recorded", error=repr(e)[:200])
