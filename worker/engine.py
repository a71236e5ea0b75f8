"""The per-process delivery engine: a queue of claimed events, caller threads that make
the calls, and one recorder thread that writes outcomes to the ledger in batches.

A delivery task only claims its batch and hands it to the engine, after waiting for room
(a process holds at most ``capacity`` claimed attempts), so a slow or hanging buyer holds
one caller thread, never a whole batch, and a task's Celery overhead is paid once per batch.
Under ``-P gevent`` the threads are greenlets (the monkey patch turns ``threading`` into them).
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass

import redis

from cgrid.errors import InvalidEvent
from cgrid.event import Event
from cgrid.ledger import Outcome
from worker.delivery import Attempt, deliver, expired
from worker.logs import get_logger, log_attempt
from worker.runtime import Runtime, ride_out_redis


@dataclass(frozen=True, slots=True)
class Handled:
    event_id: str
    event: Event | None
    attempt: Attempt


def handle(rt: Runtime, event_id: str, event_json: str, attempt_n: int) -> Handled:
    """Decide and make one claimed attempt."""
    try:
        event = Event.from_ledger_json(event_json)
    except InvalidEvent as e:
        return Handled(event_id, None, Attempt(attempt_n, Outcome.REJECTED, time.time(), 0.0, reason=str(e)))
    decision = expired(event, attempt_n, rt.settings.event_max_age_s)
    if decision is not None:
        return Handled(event_id, event, decision)
    attempt = deliver(event, rt.pool, attempt_n=attempt_n, timeout_s=rt.settings.timeout_s)
    return Handled(event_id, event, attempt)


class DeliveryEngine:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        settings = rt.settings
        self._work: queue.Queue[tuple[str, str, int]] = queue.Queue()
        self._done: list[Handled] = []
        self._cond = threading.Condition()
        self._pending = 0  # reserved or claimed here, and not yet recorded
        # At most this many attempts are claimed by one process at once, whatever the pool's
        # concurrency, so a claimed attempt waits at most one batch before its call starts.
        self.capacity = settings.call_concurrency + settings.batch_size
        for index in range(settings.call_concurrency):
            threading.Thread(target=self._call_loop, name=f"cgrid-call-{index}", daemon=True).start()
        threading.Thread(target=self._record_loop, name="cgrid-recorder", daemon=True).start()

    def reserve(self, n: int) -> None:
        """Wait for room for ``n`` attempts before claiming them (back-pressure)."""
        with self._cond:
            while self._pending and self._pending + n > self.capacity:
                self._cond.wait()
            self._pending += n

    def submit(self, claimed: list[tuple[str, str]], attempt_n: int, reserved: int) -> None:
        """Queue the claimed attempts; give back the room of ids that were not claimed."""
        with self._cond:
            self._pending -= reserved - len(claimed)
            self._cond.notify_all()
        for event_id, event_json in claimed:
            self._work.put((event_id, event_json, attempt_n))

    def drain(self, timeout_s: float) -> bool:
        """Wait until every claimed attempt has been made and recorded (warm shutdown)."""
        give_up_at = time.monotonic() + timeout_s
        with self._cond:
            while self._pending:
                left_s = give_up_at - time.monotonic()
                if left_s <= 0:
                    return False
                self._cond.wait(min(left_s, 0.1))
        return True

    def _call_loop(self) -> None:
        while True:
            event_id, event_json, attempt_n = self._work.get()
            try:
                handled = handle(self.rt, event_id, event_json, attempt_n)
            except Exception as e:  # a bug, not a buyer's answer: leave it to the lease
                get_logger().error("attempt_crashed", event_id=event_id, error=repr(e)[:300])
                with self._cond:
                    self._pending -= 1
                    self._cond.notify_all()
                continue
            with self._cond:
                self._done.append(handled)
                self._cond.notify_all()

    def _record_loop(self) -> None:
        while True:
            with self._cond:
                while not self._done:
                    self._cond.wait()
                done, self._done = self._done, []
            try:
                for attempt_n in (1, 2):
                    batch = [h for h in done if h.attempt.n == attempt_n]
                    if batch:
                        self._record(batch, attempt_n)
            finally:
                with self._cond:
                    self._pending -= len(done)
                    self._cond.notify_all()

    def _record(self, batch: list[Handled], attempt_n: int) -> None:
        """Write outcomes, riding out a short Redis outage. If it lasts past the attempts'
        lease, the sweeper counts them as lost (failed) attempts: never as silently done."""
        settings = self.rt.settings
        finishes = [h.attempt.to_finish(h.event_id) for h in batch]
        try:
            states = ride_out_redis(
                lambda: self.rt.ledger.finish(
                    finishes, attempt_n, ledger_ttl_s=settings.ledger_ttl_s,
                    report_ttl_s=settings.report_ttl_s, retry_delay_s=settings.retry_delay_s,
                ),
                settings.attempt_grace_s / 2,
            )
        except redis.RedisError as e:
            get_logger().error("ledger_write_failed", events=len(batch), error=str(e)[:200])
            return
        for item, state in zip(batch, states, strict=True):
            if item.event is not None:
                log_attempt(item.event, item.attempt, state or "superseded")
            else:
                get_logger().error("poisoned_event", event_id=item.event_id, reason=item.attempt.reason)
