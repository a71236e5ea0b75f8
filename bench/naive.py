"""The naive baseline: one Celery task per event calling ``requests.get``, default prefork
pool — what most teams would write first. Counts completions in Redis for the benchmark."""

from __future__ import annotations

import os

import redis
import requests
from celery import Celery

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
app = Celery("naive", broker=REDIS_URL)
app.conf.task_ignore_result = True
app.conf.worker_hijack_root_logger = False
_client = redis.Redis.from_url(REDIS_URL)


@app.task(name="naive.notify")
def notify(url: str, headers: dict[str, str]) -> None:
    try:
        requests.get(url, headers=headers, timeout=2)
    except requests.RequestException:
        pass
    _client.incr("naive:done")  # one round trip, so the benchmark can see progress
