"""The Celery side of the fleet: ``celery -A worker worker`` and ``celery -A worker flower``.

``celery_app`` (the app and its one task), ``batch`` (what the task does: claim, hand over to
the process's delivery engine in ``delivery/``), ``transport`` and ``poison`` (broker
messages that cannot be read are dropped and recorded), ``sweeper`` (retries and recovery),
``runtime`` (per-process resources), ``screening`` (what a broker message must be before
kombu and Celery are handed it), ``consumer`` (Celery's consumer, reconnecting sooner).
"""

from worker.celery_app import app

__all__ = ["app"]
