"""What one delivery task does with its batch of event ids: claim them, hand them over."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from typing import Any

import redis
from celery import Celery

from cgrid.broker import ARGSREPR_IDS, send_shared
from cgrid.ledger import NotReplicated, new_claim_token
from cgrid.logs import get_logger
from cgrid.redis_conn import ride_out_redis
from cgrid.routing import QUEUE_NAME
from worker.follow import ClaimRuns
from worker.poison import record_poison
from worker.runtime import Runtime

MAX_IDS_PER_TASK = 10_000
# How many triggers a shared trigger's claim sends on when more ids wait than it took: two,
# so that a backlog spreads over the workers (each takes one and sends two on while it
# waits for room in its engine) without a trigger per id batch in the queue.
SHARED_FAN_OUT = 2


def check_args(ids: Any, attempt: Any, sent_at: Any) -> str | None:
    """Why a task message is malformed (poisoned), or None."""
    if not isinstance(ids, list) or not all(isinstance(i, str) and 0 < len(i) <= 128 for i in ids):
        return "ids: must be a list of event id strings"
    if len(ids) > MAX_IDS_PER_TASK:
        return f"ids: more than {MAX_IDS_PER_TASK}"
    if attempt not in (1, 2) or isinstance(attempt, bool):
        return "attempt: must be 1 or 2"
    if isinstance(sent_at, bool) or not isinstance(sent_at, int | float) or not math.isfinite(sent_at):
        return "sent_at: must be a finite number"
    return None


def check_shared_args(ids: Any, partition: Any, sent_at: Any, partitions: int) -> str | None:
    """Why a shared trigger's message is malformed (poisoned), or None."""
    if ids != []:
        return "ids: a shared trigger carries none"
    if isinstance(partition, bool) or not isinstance(partition, int) or not 0 <= partition < partitions:
        return f"shared: must be a ledger partition, 0 to {partitions - 1}"
    return check_args([], 1, sent_at)


def claim(rt: Runtime, ids: list[str], attempt_n: int, sent_at_s: float,
          parked_buyers: list[str], queue: str, stamp: list[str]) -> tuple[list[tuple[str, str]], bool]:
    """Claim, riding out a short Redis outage; a longer one leaves the events to the
    sweeper (their trigger is resent), so nothing is lost by giving up. ``stamp`` receives
    the claim's stamp. Returns the claims and whether they must be handed back uncalled: no
    replica holds them and the sentinels do not vouch for the node that took them."""
    return _claim_riding_out(rt, lambda token: rt.ledger.claim(
        ids, attempt_n, lease_s=rt.engine.lease_s, sent_at_s=sent_at_s, parked_buyers=parked_buyers, queue=queue,
        stamp=stamp, token=token))


def _claim_riding_out(rt: Runtime, claim_with: Callable[[str], list[tuple[str, str]]]
                      ) -> tuple[list[tuple[str, str]], bool]:
    shortfalls = rt.ledger.replica_shortfalls
    token = new_claim_token()  # one per claim, sent again with it: a lost reply costs no events

    def claim_once() -> tuple[list[tuple[str, str]], bool]:
        try:
            return claim_with(token), False
        except NotReplicated as e:
            return e.result, True

    claimed, hold = ride_out_redis(claim_once, rt.settings.attempt_grace_s / 2)
    if rt.ledger.replica_shortfalls != shortfalls or hold:
        get_logger().warning("claim_not_replicated", events=len(claimed), replicas=rt.settings.redis_wait_replicas,
                             wait_ms=rt.settings.redis_wait_timeout_ms, handed_back=hold)
    return claimed, hold


def run_batch(rt: Runtime, ids: Any, attempt_n: Any, sent_at_s: Any, queue: Any = None) -> dict[str, int]:
    """Claim attempt ``attempt_n`` of each id and queue the calls in this process's engine.
    ``queue`` is the broker queue the trigger came from (its routing key)."""
    problem = check_args(ids, attempt_n, sent_at_s)
    if problem is not None:
        record_poison(f"task arguments: {problem}", repr([ids, attempt_n, sent_at_s]))
        return {"poisoned": 1}
    if not isinstance(queue, str) or not QUEUE_NAME.fullmatch(queue):
        queue = rt.settings.routing.queue_for(None, attempt_n)
    engine = rt.engine
    claimed_total = 0
    for start in range(0, len(ids), rt.settings.batch_size):
        chunk = ids[start:start + rt.settings.batch_size]
        engine.reserve(len(chunk))
        parked_buyers: list[str] = []
        stamp: list[str] = []
        try:
            claimed, hold = claim(rt, chunk, attempt_n, float(sent_at_s), parked_buyers, queue, stamp)
        except BaseException:
            engine.submit([], attempt_n, reserved=len(chunk))
            raise
        engine.submit(claimed, attempt_n, reserved=len(chunk), parked_buyers=parked_buyers,
                      claim_stamp=stamp[-1] if stamp else "", hold=hold)
        claimed_total += len(claimed)
    return {"ids": len(ids), "claimed": claimed_total}


def run_shared(rt: Runtime, ids: Any, partition: Any, sent_at_s: Any, queue: Any,
               send_on: Callable[[str, int, int, float], None]) -> dict[str, Any]:
    """A shared trigger: claim the first attempts of up to ``CGRID_BATCH_SIZE`` ids waiting
    in the pending list of ``queue`` (ledger partition ``partition``), as many as this
    process's engine has room for, and queue their calls. With no room at all it first lets
    the trigger go (another worker gets one) and waits for room.
    When ids stay in the list, ``send_on(queue, n, partition, sent_at_s)`` sends the trigger
    on, as ``n`` triggers (at most :data:`SHARED_FAN_OUT`), before the calls are made, so
    that other workers take them while this one calls. When the claim empties the list, a
    claim run follows (``CGRID_CLAIM_RUN_MS``, worker/follow.py): this process claims the
    queue's new events itself while they keep coming."""
    problem = check_shared_args(ids, partition, sent_at_s, len(rt.ledger.keyspaces))
    if problem is not None:
        record_poison(f"task arguments: {problem}", repr([ids, partition, sent_at_s]))
        return {"poisoned": 1}
    if not isinstance(queue, str) or not QUEUE_NAME.fullmatch(queue):
        queue = rt.settings.routing.queue_for(None, 1)
    engine = rt.engine
    let_go_called: list[bool] = []

    def let_go() -> None:  # (a full engine: another worker should take this queue's ids)
        let_go_called.append(True)
        release_shared(rt, queue, partition)

    take = engine.reserve_up_to(rt.settings.batch_size, before_waiting=let_go)
    runs = claim_runs(rt, send_on) if rt.settings.claim_run_ms > 0 else None
    run = runs is not None and not let_go_called and not engine.draining and runs.ready()
    first_ids: list[str] = []
    claimed, waiting, hold = claim_shared_step(rt, send_on, queue, partition, take, float(sent_at_s), run,
                                               first_ids)
    if runs is not None and run and not waiting and not hold:
        runs.start(queue, partition, float(sent_at_s))
    # (Flower shows a task's result: the first ids it took tell which trigger an event rode on)
    return {"shared": 1, "claimed": claimed, "waiting": waiting, "first_ids": first_ids}


def claim_shared_step(rt: Runtime, send_on: Callable[[str, int, int, float], None], queue: str, partition: int,
                      take: int, sent_at_s: float, again: bool, first_ids: list[str] | None = None
                      ) -> tuple[int, int, bool]:
    """One claim of a shared queue, ``take`` attempts' room reserved in the engine: the
    claimed attempts handed to the engine, the trigger sent on when ids stay in the list.
    ``again``: the caller claims the queue again soon (a claim run: the mark stays).
    Returns how many were claimed, how many ids stay in the list, and whether the claims
    were handed back (no replica holds them on a node the sentinels do not vouch for: then
    no run follows, and a mark ``again`` kept is let go)."""
    engine = rt.engine
    parked_buyers: list[str] = []
    stamp: list[str] = []
    left: list[int] = []
    try:
        claimed, hold = _claim_riding_out(rt, lambda token: rt.ledger.claim_shared(
            queue, partition, take, lease_s=engine.lease_s, sent_at_s=sent_at_s, parked_buyers=parked_buyers,
            stamp=stamp, token=token, left=left, again=again))
    except BaseException:
        engine.submit([], 1, reserved=take)
        raise
    waiting = left[-1] if left else 0
    if waiting > 0:
        try:
            send_on(queue, min(SHARED_FAN_OUT, math.ceil(waiting / take)), partition, sent_at_s)
        except Exception as e:  # the broker is away: the next accept asks again, or the sweeper resends
            get_logger().warning("shared_trigger_not_sent", queue=queue, waiting=waiting, error=type(e).__name__)
    engine.submit(claimed, 1, reserved=take, parked_buyers=parked_buyers, claim_stamp=stamp[-1] if stamp else "",
                  hold=hold)
    if again and hold and not waiting:
        release_shared(rt, queue, partition)
    if first_ids is not None:
        first_ids += [event_id for event_id, _ in claimed[:ARGSREPR_IDS]]
    return len(claimed), waiting, hold


def release_shared(rt: Runtime, queue: str, partition: int) -> None:
    """Clear ``queue``'s trigger mark: the next accept (or the sweeper) sends a trigger."""
    try:
        rt.ledger.release_shared(queue, partition)
    except (redis.RedisError, redis.exceptions.RedisClusterException):
        pass  # then the mark's hold (1 s) lets it go


def claim_runs(rt: Runtime, send_on: Callable[[str, int, int, float], None]) -> ClaimRuns:
    """This process's claim runs (one thread, made at the first run). Runs send triggers on
    with the ``send_on`` of the task that started the first run (the process's Celery app)."""
    with _runs_lock:
        runs = rt.claim_runs
        if runs is None:
            settings = rt.settings
            runs = rt.claim_runs = ClaimRuns(
                run_ms=settings.claim_run_ms, linger_ms=settings.linger_ms, batch_size=settings.batch_size,
                reserve_now=rt.engine.reserve_now,
                step=lambda queue, partition, take, sent_at_s, again: claim_shared_step(
                    rt, send_on, queue, partition, take, sent_at_s, again),
                release=lambda queue, partition: release_shared(rt, queue, partition))
        return runs


_runs_lock = threading.Lock()


def send_on(app: Celery, queue: str, n: int, partition: int, sent_at_s: float) -> None:
    """Send ``n`` shared triggers of ``queue`` (``run_shared``'s ``send_on``, with the app)."""
    for _ in range(n):
        send_shared(app, queue, partition, sent_at_s)
