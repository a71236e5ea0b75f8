"""The sweeper: a thread in every worker's main process that keeps the ledger moving.

Each pass runs one Lua script over the events whose due time has passed. It sends the
one retry when it is due, resends a trigger that was lost (producer crash, Redis restart,
a worker killed with messages in hand), and gives up attempts whose worker died (they
count as failed). Every worker runs one; the script is atomic, so they never collide.
"""

from __future__ import annotations

import threading
import time

import redis
from celery import Celery

from cgrid import metrics
from cgrid.broker import send_deliver
from cgrid.buyers import BuyersFile
from cgrid.ledger import Ledger
from cgrid.logs import get_logger
from cgrid.routing import Routing
from cgrid.settings import Settings

SWEEP_LIMIT = 2000
BACKLOG_GAUGES_S = 5.0  # how often the backlog gauges are read from Redis (metrics on)


def backlog_gauges(ledger: Ledger) -> None:
    """Events accepted and not yet final: due, parked per buyer, open per kind; final
    records not yet archived."""
    due, parked = ledger.backlog()
    metrics.M.due.set(due)
    for buyer, count in parked.items():
        metrics.M.parked_events.labels(buyer).set(count)
    for kind, count in ledger.open_events().items():
        metrics.M.open_events.labels(kind).set(count)
    archive = ledger.archive_backlog()
    if archive is not None:
        metrics.M.archive_backlog.set(archive[0])
        metrics.M.archive_oldest.set(archive[1])


def send_triggers(app: Celery, by_queue: dict[str, list[str]], attempt_n: int, batch_size: int,
                  sent_at_s: float) -> int:
    """Send the triggers, in batches, each to its queue; returns how many ids they carry."""
    sent = 0
    for queue, ids in by_queue.items():
        for start in range(0, len(ids), batch_size):
            send_deliver(app, ids[start:start + batch_size], attempt_n, sent_at_s, queue)
        sent += len(ids)
    return sent


def queue_depths(ledger: Ledger, routing: Routing) -> dict[str, tuple[int, float]]:
    """Per queue of the routing: the triggers waiting on it, and its watermark (the newest
    ``sent_at`` of a trigger a worker started from it; 0 if none ever was)."""
    pipe = ledger.client.pipeline(transaction=False)
    for queue in routing.queues:
        pipe.llen(queue)
        pipe.get(f"{ledger.prefix}watermark:{queue}")
    replies = pipe.execute()
    return {queue: (int(replies[2 * i]), float(replies[2 * i + 1] or 0))
            for i, queue in enumerate(routing.queues)}


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
               retry_delays: dict[str, float] | None = None, stalls: QueueStalls | None = None) -> int:
    """One pass; returns how many triggers it sent. The parked events of ``paused`` buyers
    (id -> maximum event age) are left where they are, or expire past that age; a lost first
    attempt's retry waits its buyer's ``retry_delays`` (id -> seconds), else the fleet's.
    With metrics on, the queues' gauges are set (``stalls`` keeps what the last pass saw)."""
    routing = settings.routing
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
    )
    resent = send_triggers(app, first, 1, settings.batch_size, now_s)
    retries = send_triggers(app, second, 2, settings.batch_size, now_s)
    if metrics.ENABLED:
        metrics.M.sweeper.labels("retry_triggers_sent").inc(retries)
        metrics.M.sweeper.labels("attempt1_triggers_resent").inc(resent)
        stalls = stalls or QueueStalls()
        for queue, (depth, watermark) in queue_depths(ledger, routing).items():
            metrics.M.queue_depth.labels(queue).set(depth)
            metrics.M.queue_stalled.labels(queue).set(stalls.stalled_s(queue, depth, watermark, now_s))
    if resent:
        get_logger().warning("resent_lost_triggers", attempt=1, events=resent, queues=sorted(first))
    return resent + retries


class Sweeper:
    def __init__(self, app: Celery, ledger: Ledger, settings: Settings) -> None:
        self.app = app
        self.ledger = ledger
        self.settings = settings
        self.buyers = BuyersFile.for_settings(settings)
        self._stop = threading.Event()
        self._next_backlog_gauges = 0.0
        self._stalls = QueueStalls()
        self._thread = threading.Thread(target=self._run, name="cgrid-sweeper", daemon=True)

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
                sent = sweep_once(self.app, self.ledger, self.settings, paused, delays, self._stalls)
                if metrics.ENABLED and time.monotonic() >= self._next_backlog_gauges:
                    self._next_backlog_gauges = time.monotonic() + BACKLOG_GAUGES_S
                    backlog_gauges(self.ledger)
                pause_s = 0.0 if sent >= SWEEP_LIMIT else self.settings.sweep_interval_s
            except (redis.RedisError, OSError) as e:
                log.warning("sweep_failed", error=str(e)[:200])
                pause_s = min(max(pause_s * 2, 0.5), 5.0)
            except Exception as e:  # never let the sweeper die quietly
                log.error("sweep_crashed", error=repr(e)[:300])
                pause_s = 5.0
