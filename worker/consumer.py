"""The worker's consumer: Celery's, reconnecting to the broker every 2 s at most.

When the broker connection is lost, Celery's consumer reconnects through kombu's
``ensure_connection`` with kombu's default backoff — 2 s, 4 s, 6 s ... up to 30 s between
tries — and Celery has no setting for it: a worker whose Redis was away 20 s stayed idle up
to 10 s after Redis was back (docs/deploy.md). Here the tries come 0.5 s, 1 s, 1.5 s, then
every 2 s apart: a connection attempt is one TCP connect and a PING, cheap for Redis even
from hundreds of workers.
"""

from __future__ import annotations

import functools
from typing import Any

from celery.worker.consumer import Consumer as CeleryConsumer

RECONNECT_BACKOFF = {"interval_start": 0.5, "interval_step": 0.5, "interval_max": 2.0}


class Consumer(CeleryConsumer):  # type: ignore[misc]
    def ensure_connected(self, conn: Any) -> Any:
        conn.ensure_connection = functools.partial(conn.ensure_connection, **RECONNECT_BACKOFF)
        return super().ensure_connected(conn)
