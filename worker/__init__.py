"""The cgrid-s2s worker fleet: ``celery -A worker worker``.

Layout: ``celery_app`` (the app and its one task), ``batch`` (what the task does),
``engine`` (the per-process libcurl loop and its ledger thread), ``lanes`` (buyer lanes),
``http_client`` (one libcurl transfer), ``delivery`` (an attempt), ``headers``,
``classify`` and ``guard`` (the rules), ``sweeper`` (retries and recovery), ``metrics``,
``runtime`` (per-process resources), ``logs``, and ``fleet`` (``make run``).
"""

from worker.celery_app import app

__all__ = ["app"]
