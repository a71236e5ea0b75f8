"""The fleet's worker with the transport's check before delivery switched off: the tests
start it (``celery -A tests.worker_unchecked worker``) to reach the second line of defence,
what rejects a message Celery fails on after delivery (worker/transport.py)."""

from __future__ import annotations

from typing import Any

import worker.transport
from worker import app

__all__ = ["app"]


def _no_checks(message: Any, queue: str) -> str | None:
    return None


worker.transport.message_problem = _no_checks  # type: ignore[attr-defined]
print("delivery checks: off (tests/worker_unchecked.py)", flush=True)
