"""The sweeper: a thread in every worker's main process that keeps the ledger moving.

Each pass runs one Lua script over the events whose due time has passed. It sends the
one retry when it is due, resends a trigger that was lost (producer crash, Redis restart,
a worker killed with messages in hand), and gives up attempts whose worker died (they
count as failed). It also sends a shared trigger for a pending list that holds ids while
none is on its way (``Ledger.orphaned_pending``): within about a second, not
``CGRID_REDELIVER_AFTER_S``, when no other publish asks for one. Every worker runs one;
the script is atomic, so they never collide.
"""

from __future__ import annotations

import threading
import time

import redis
from celery import Celery
from kombu.exceptions import OperationalError

from cgrid import metrics
from cgrid.broker import send_deliver, send_shared
from cgrid.buyers import BuyersFile
from cgrid.ledger import Ledger
from cgrid.logs import get_logger
from cgrid.redis_replies import log_redis_error
from cgrid.routing import Routing
from cgrid.settings import Settings
from cgrid.threads import daemon_thread

SWEEP_LIMIT = 2000
BACKLOG_GAUGES_S = 5.0  # how often the backlog gauges are read from Redis (metrics on)


def backlog_gauges(ledger: Ledger, shown: set[str] | None = None) -> set[str]:
    """Events accepted and not yet final: due (queued, in flight, retry waiting), parked per
    buyer, open per kind; final records not yet archived; Redis's memory against its
    maxmemory. ``shown``: the buyer labels the last call set, which read 0 once their buyer
    has nothing parked; returns this call's (buyer labels are bounded: cgrid/metrics.py)."""
    due, parked = ledger.backlog()
    metrics.M.due.set(due)
    per_label: dict[str, int] = {}
    for buyer, count in parked.items():
        label = metrics.buyer_label(buyer)
        per_label[label] = per_label.get(label, 0) + count
    for label in (shown or set()) - per_label.keys():
        per_label[label] = 0
    for label, count in per_label.items():
        metrics.M.parked_events.labels(label).set(count)
    for kind, count in ledger.open_events().items():
        metrics.M.open_events.labels(kind).set(count)
    archive = ledger.archive_backlog()
    if archive is not None:
        metrics.M.archive_backlog.set(archive[0])
        metrics.M.archive_oldest.set(archive[1])
    try:
        used, maximum = ledger.memory()
    except redis.exceptions.NoPermissionError:
        used = maximum = -1  # an ACL user without INFO: no memory gauges
    if used >= 0:
        metrics.M.redis_memory_used.set(used)
        metrics.M.redis_memory_max.set(maximum)
    return {label for label, count in per_label.items() if count}


def send_triggers(app: Celery, by_queue: dict[str, list[str]], attempt_n: int, batch_size: int,
                  sent_at_s: float, ledger: Ledger) -> int:
    """Send the triggers, in batches, each to its queue and with the ids of one partition of
    the ledger (a cluster's: one claim script per trigger); returns how many ids they carry."""
    sent = 0
    for queue, ids in by_queue.items():
        by_partition: dict[int, list[str]] = {}
        for event_id in ids:
            by_partition.setdefault(ledger.partition_of(event_id), []).append(event_id)
        for part_ids in by_partition.values():
            for start in range(0, len(part_ids), batch_size):
                send_deliver(app, part_ids[start:start + batch_size], attempt_n, sent_at_s, queue)
        sent += len(ids)
    return sent


def queue_depths(broker: redis.Redis, routing: Routing) -> dict[str, int]:
    """Triggers waiting on each queue of the routing, read on the broker's Redis."""
    pipe = broker.pipeline(transaction=False)
    for queue in routing.queues:
        pipe.llen(queue)
    return dict(zip(routing.queues, map(int, pipe.execute()), strict=True))


def watermarks(ledger: Ledger, queues: tuple[str, ...]) -> dict[str, float]:
    """Per queue, its watermark: the newest ``sent_at`` of a trigger a worker started from it
    (0 if none ever was), over every keyspace of the ledger (a cluster's partitions)."""
    prefixes = [prefix for prefix, _ in ledger.keyspaces]
    pipe = ledger.client.pipeline(transaction=False)
    for prefix in prefixes:
        for queue in queues:
            pipe.get(f"{prefix}watermark:{queue}")
    replies = pipe.execute()
    return {queue: max(float(replies[p * len(queues) + q] or 0) for p in range(len(prefixes)))
            for q, queue in enumerate(queues)}


class QueueStalls:
    """Per queue, since when triggers have waited on it while no worker took any: the clock
    restarts whenever the queue is empty, shrinks, or its watermark moves."""

    def __init__(self) -> None:
        self._seen: dict[str, tuple[int, float, float]] = {}  # queue -> depth, watermark, since

    def stalled_s(self, queue: str, depth: int, watermark: float, now_s: float) -> float:
        last = self._seen.get(queue)
        since = now_s
        if last is not None and depth and depth >= last[0] and watermark == last[1]:
            since = last[2]
        self._seen[queue] = (depth, watermark, since)
        return now_s - since


def sweep_once(app: Celery, ledger: Ledger, settings: Settings, paused: dict[str, float] | None = None,
               retry_delays: dict[str, float] | None = None, broker: redis.Redis | None = None,
               stalls: QueueStalls | None = None) -> int:
    """One pass; returns how many triggers it sent. The parked events of ``paused`` buyers
    (id -> maximum event age) are left where they are, or expire past that age; a lost first
    attempt's retry waits its buyer's ``retry_delays`` (id -> seconds), else the fleet's.
    ``broker``: a client of the broker's Redis (default: the ledger's), whose queues' lengths
    tell a lost trigger (an event waiting on an empty queue). With metrics on, the queues'
    gauges are set (``stalls`` keeps what the last pass saw)."""
    routing = settings.routing
    depths = queue_depths(ledger.client if broker is None else broker, routing)
    now_s, first, second = ledger.sweep(
        limit=SWEEP_LIMIT,
        redeliver_after_s=settings.redeliver_after_s,
        retry_delay_s=settings.retry_delay_s,
        report_ttl_s=settings.report_ttl_s,
        routing=routing,
        revive_after_s=settings.park_revive_s,
        revive_batch=settings.batch_size,
        ledger_ttl_s=settings.ledger_ttl_s,
        paused=paused,
        retry_delays=retry_delays,
        empty_queues=[queue for queue, depth in depths.items() if depth == 0],
    )
    resent = send_triggers(app, first, 1, settings.batch_size, now_s, ledger)
    retries = send_triggers(app, second, 2, settings.batch_size, now_s, ledger)
    orphans = ledger.orphaned_pending(routing.queues)
    for queue, partition in orphans:  # a shared trigger lost on its way, or stuck behind a backlog
        send_shared(app, queue, partition, now_s)
    if metrics.ENABLED:
        metrics.M.sweeper.labels("retry_triggers_sent").inc(retries)
        metrics.M.sweeper.labels("attempt1_triggers_resent").inc(resent)
        stalls = stalls or QueueStalls()
        marks = watermarks(ledger, routing.queues)
        for queue, depth in depths.items():
            metrics.M.queue_depth.labels(queue).set(depth)
            metrics.M.queue_stalled.labels(queue).set(stalls.stalled_s(queue, depth, marks[queue], now_s))
    if resent:
        get_logger().warning("resent_lost_triggers", attempt=1, events=resent, queues=sorted(first))
    if orphans:
        get_logger().info("resent_shared_triggers", queues=sorted({queue for queue, _ in orphans}),
                          triggers=len(orphans))
    return resent + retries


class Sweeper:
    def __init__(self, app: Celery, ledger: Ledger, settings: Settings, broker: redis.Redis | None = None) -> None:
        self.app = app
        self.ledger = ledger
        self.broker = broker  # the broker's Redis (CGRID_BROKER_URL); None: the ledger's
        self.settings = settings
        self.buyers = BuyersFile.for_settings(settings)
        self._stop = threading.Event()
        self._next_backlog_gauges = 0.0
        self._parked_labels: set[str] = set()
        self._stalls = QueueStalls()
        self._thread = daemon_thread(self._run, "cgrid-sweeper")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        log = get_logger()
        pause_s = self.settings.sweep_interval_s
        while not self._stop.wait(pause_s):
            try:
                self.buyers.maybe_reload()  # never raises: a broken file keeps the last good one
            except Exception as e:
                log.error("buyers_file_check_failed", error=repr(e)[:300])
            try:
                buyers = self.buyers.config.buyers
                paused = {b: own.max_age_s or self.settings.event_max_age_s for b, own in buyers.items() if own.paused}
                delays = {b: own.retry_delay_s for b, own in buyers.items() if own.retry_delay_s is not None}
                sent = sweep_once(self.app, self.ledger, self.settings, paused, delays, self.broker, self._stalls)
                if metrics.ENABLED and time.monotonic() >= self._next_backlog_gauges:
                    self._next_backlog_gauges = time.monotonic() + BACKLOG_GAUGES_S
                    self._parked_labels = backlog_gauges(self.ledger, self._parked_labels)
                pause_s = 0.0 if sent >= SWEEP_LIMIT else self.settings.sweep_interval_s
            except (redis.RedisError, OSError, OperationalError) as e:
                # Redis away, or an error reply (full, a replica ...): kombu wraps a failed
                # trigger send in its OperationalError. Logged once per kind and 30 s.
                log_redis_error("sweep_failed", e)
                pause_s = min(max(pause_s * 2, 0.5), 5.0)
            except Exception as e:  # never let the sweeper die quietly
                log.error("sweep_crashed", error=repr(e)[:300])
                pause_s = 5.0
