"""What one delivery task does with its batch of event ids: claim, deliver, record."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import redis

from cgrid.errors import InvalidEvent
from cgrid.event import Event
from cgrid.ledger import Finish, Outcome
from worker.delivery import Attempt, deliver, expired
from worker.logs import get_logger, log_attempt
from worker.poison import record_poison
from worker.runtime import Runtime

MAX_IDS_PER_TASK = 10_000


@dataclass(frozen=True, slots=True)
class Handled:
    event_id: str
    event: Event | None
    attempt: Attempt


def check_args(ids: Any, attempt: Any, sent_at: Any) -> str | None:
    """Why a task message is malformed (poisoned), or None."""
    if not isinstance(ids, list) or not all(isinstance(i, str) and 0 < len(i) <= 128 for i in ids):
        return "ids: must be a list of event id strings"
    if len(ids) > MAX_IDS_PER_TASK:
        return f"ids: more than {MAX_IDS_PER_TASK}"
    if attempt not in (1, 2) or isinstance(attempt, bool):
        return "attempt: must be 1 or 2"
    if isinstance(sent_at, bool) or not isinstance(sent_at, int | float):
        return "sent_at: must be a number"
    return None


def _handle(rt: Runtime, event_id: str, event_json: str, attempt_n: int) -> Handled:
    try:
        event = Event.from_json(event_json)
    except InvalidEvent as e:
        now = time.time()
        return Handled(event_id, None, Attempt(attempt_n, Outcome.REJECTED, now, 0.0, reason=str(e)))
    decision = expired(event, attempt_n, rt.settings.event_max_age_s)
    if decision is not None:
        return Handled(event_id, event, decision)
    attempt = deliver(event, rt.session, attempt_n=attempt_n, timeout_s=rt.settings.timeout_s)
    return Handled(event_id, event, attempt)


def _record(rt: Runtime, finishes: list[Finish], attempt_n: int) -> list[str]:
    """Write outcomes, riding out a short Redis outage. If it lasts past the attempts'
    lease, the sweeper counts them as lost (failed) attempts: never as silently done."""
    settings = rt.settings
    give_up_at = time.monotonic() + settings.attempt_grace_s / 2
    delay_s = 0.05
    while True:
        try:
            return rt.ledger.finish(
                finishes, attempt_n, ledger_ttl_s=settings.ledger_ttl_s,
                report_ttl_s=settings.report_ttl_s, retry_delay_s=settings.retry_delay_s,
            )
        except redis.RedisError as e:
            if time.monotonic() + delay_s > give_up_at:
                get_logger().error("ledger_write_failed", events=len(finishes), error=str(e)[:200])
                raise
            time.sleep(delay_s)
            delay_s = min(delay_s * 2, 1.0)


def run_batch(rt: Runtime, ids: Any, attempt_n: Any, sent_at_s: Any) -> dict[str, int]:
    """Claim attempt ``attempt_n`` of each id, make the calls concurrently, record them."""
    problem = check_args(ids, attempt_n, sent_at_s)
    if problem is not None:
        record_poison(f"task arguments: {problem}", repr([ids, attempt_n, sent_at_s]))
        return {"poisoned": 1}
    claimed = rt.ledger.claim(
        ids, attempt_n, lease_s=rt.settings.attempt_lease_s, sent_at_s=float(sent_at_s)
    )
    handled = rt.map(lambda pair: _handle(rt, pair[0], pair[1], attempt_n), claimed)
    states = _record(rt, [h.attempt.to_finish(h.event_id) for h in handled], attempt_n)
    summary: dict[str, int] = {"ids": len(ids), "claimed": len(claimed)}
    for item, state in zip(handled, states, strict=True):
        if item.event is not None:
            log_attempt(item.event, item.attempt, state or "superseded")
        else:
            get_logger().error("poisoned_event", event_id=item.event_id, reason=item.attempt.reason)
        key = state or "superseded"
        summary[key] = summary.get(key, 0) + 1
    return summary
