"""The Celery configuration both sides share: the worker's app and the publisher's sender.

Choices (docs/guarantees.md explains them): late acks, a prefetch chosen by pool, no
results, task events on for Flower, and kombu's ack emulation off: a trigger a worker took is
held in its memory, not copied into Redis's ``unacked`` hash and deleted at the ack (two
round trips per trigger, measured ~0.3-0.5 ms of a worker's CPU: docs/performance.md). The
ledger, not the broker, knows what was never claimed: the sweeper resends it. Retries are *not* Celery ETA
messages: the ledger schedules them (cgrid.ledger), so no message waits in a worker.
"""

from __future__ import annotations

from celery import Celery
from kombu.entity import Exchange, Queue

from cgrid.redis_conn import celery_connection_conf
from cgrid.settings import Settings

DELIVER_TASK = "cgrid.deliver"
ARGSREPR_IDS = 5  # ids a trigger shows in Flower
# Triggers a worker fetches ahead, per task slot. In alternating runs with the libcurl
# engine on 2 cores (fast buyer; their figures were not saved: docs/guarantees.md), a solo
# worker that held eight ran them one after the other while the other worker could idle,
# which lengthened its tail at 6,000 events/s for a few percent less top rate. A prefork
# worker's parent feeds its children from what it holds: with one per child its top rate
# fell and its tail did not move, so it keeps eight.
PREFETCH_PREFORK = 8
PREFETCH_OTHER_POOLS = 1


def prefetch_multiplier(pool_module: str) -> int:
    """The prefetch for a worker of this pool (its module, e.g. ``celery.concurrency.solo``)."""
    return PREFETCH_PREFORK if pool_module.endswith(".prefork") else PREFETCH_OTHER_POOLS


def broker_queue(name: str) -> Queue:
    """A queue as Celery would make it for the name (its own direct exchange). Triggers are
    sent to it by name (kombu's anonymous exchange: straight onto the Redis list ``name``)."""
    return Queue(name, Exchange(name, type="direct"), routing_key=name)  # type: ignore[no-untyped-call]


def make_celery(settings: Settings, name: str = "cgrid") -> Celery:
    app = Celery(name)
    app.conf.update(
        **celery_connection_conf(settings, {
            "visibility_timeout": settings.visibility_timeout_s,
            "ack_emulation": False,  # (the visibility timeout then applies to nothing)
            "socket_timeout": max(settings.publish_timeout_s, 5.0),
            "socket_connect_timeout": settings.publish_timeout_s,
        }),
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        broker_heartbeat=0,
        task_default_queue=settings.queue,
        # Every queue of the routing (docs/hosts.md): a worker without -Q consumes them all,
        # so no trigger waits on a queue nobody reads unless an operator chose -Q.
        task_queues=[broker_queue(name) for name in settings.routing.queues],
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        result_backend=None,
        task_acks_late=True,
        # A child that dies mid-task has its message acked: the ledger's sweeper, not a
        # redelivery, decides what happens to the attempt (it counts as a failed one).
        task_reject_on_worker_lost=False,
        task_acks_on_failure_or_timeout=True,
        # Triggers are cheap to hold (the ledger, not the message, is the truth); how many
        # a worker fetches ahead depends on its pool: see prefetch_multiplier().
        worker_prefetch_multiplier=PREFETCH_PREFORK,
        worker_send_task_events=True,
        # No "task-sent" events: they cost a second Redis write per trigger, and Flower
        # lists tasks from the workers' received/started/succeeded events.
        task_send_sent_event=False,
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


def send_deliver(app: Celery, ids: list[str], attempt_n: int, sent_at_s: float, queue: str) -> None:
    """Send one delivery trigger to ``queue`` (cgrid.routing). Flower shows ``argsrepr``: the
    first ids and how many more, built here because Celery's own repr of a 100-id list
    costs a third of a send."""
    shown = ", ".join(repr(event_id) for event_id in ids[:ARGSREPR_IDS])
    more = f", ... {len(ids) - ARGSREPR_IDS} more" if len(ids) > ARGSREPR_IDS else ""
    app.send_task(DELIVER_TASK, args=[ids, attempt_n, sent_at_s], queue=queue,
                  argsrepr=f"([{shown}{more}], {attempt_n}, {sent_at_s!r})")


def send_shared(app: Celery, queue: str, partition: int, sent_at_s: float) -> None:
    """Send one shared trigger to ``queue``: "claim what waits in this queue's pending list
    of ledger partition ``partition``" (worker/batch.py). It carries no ids."""
    app.send_task(DELIVER_TASK, args=[[], 1, sent_at_s], kwargs={"shared": partition}, queue=queue,
                  argsrepr=f"(shared trigger: pending list of {queue}, partition {partition}, {sent_at_s!r})")
