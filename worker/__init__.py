"""The cgrid-s2s worker fleet: ``celery -A worker worker``.

Layout: ``celery_app`` (the app and its one task), ``batch`` (what the task does),
``delivery`` (one event's call), ``headers``, ``classify``, ``guard`` and ``http_client``
(the rules), ``sweeper`` (retries and recovery), ``runtime`` (per-process resources),
``logs``, and ``fleet`` (``make run``).
"""

from worker.celery_app import app

__all__ = ["app"]
