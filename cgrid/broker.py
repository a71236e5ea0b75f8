"""The Celery configuration both sides share: the worker's app and the publisher's sender.

Choices (README "Guarantees" explains them): late acks, prefetch of one, no results, task
events on for Flower, and an explicit visibility timeout. Retries are *not* Celery ETA
messages: the ledger schedules them (cgrid.ledger), so no message waits in a worker.
"""

from __future__ import annotations

from celery import Celery

from cgrid.settings import Settings

DELIVER_TASK = "cgrid.deliver"


def make_celery(settings: Settings, name: str = "cgrid") -> Celery:
    app = Celery(name)
    app.conf.update(
        broker_url=settings.redis_url,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout_s,
            "socket_timeout": max(settings.publish_timeout_s, 5.0),
            "socket_connect_timeout": settings.publish_timeout_s,
        },
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        broker_heartbeat=0,
        task_default_queue=settings.queue,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        result_backend=None,
        task_acks_late=True,
        # A child that dies mid-task has its message acked: the ledger's sweeper, not a
        # redelivery, decides what happens to the attempt (it counts as a failed one).
        task_reject_on_worker_lost=False,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        worker_send_task_events=True,
        task_send_sent_event=True,
        task_publish_retry=True,
        task_publish_retry_policy={
            "max_retries": 3,
            "interval_start": 0.1,
            "interval_step": 0.2,
            "interval_max": 0.5,
        },
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        broker_connection_timeout=settings.publish_timeout_s,
        enable_utc=True,
    )
    return app
