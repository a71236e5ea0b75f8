"""Claim runs: a worker that took a shared trigger goes on claiming its queue's new events
itself while they keep coming, for ``CGRID_CLAIM_RUN_MS``, instead of taking a trigger for
every publish.

Publishers send a shared trigger whenever none is on its way, and the claim that empties
the queue's pending list clears that mark: with events arriving steadily, that is a trigger
per publisher send (every ``CGRID_LINGER_MS``), each costing the worker that takes it
~1.5-2 ms of Celery's CPU (the message, its task events, the request, its log lines) — a
fifth of a worker's CPU at 6,000 events/s (docs/performance.md). In a run, the trigger's
claim keeps the mark when it empties the list (``claim.lua``, ``again``), so accepts send
no trigger meanwhile, and this process's claim-run thread claims the queue again every
``CGRID_LINGER_MS`` (the publishers' pace) with what arrived. Claims are the same
claims, each under its own lease; only who asks changes. The run ends, and its last claim
clears the mark when it leaves the list empty (the next accept sends a trigger, which any
worker may take: runs spread the work), when:

- ``CGRID_CLAIM_RUN_MS`` has passed since its trigger;
- nothing arrived for 3 x ``CGRID_LINGER_MS``, at least 50 ms (the publishers went quiet);
- a claim left ids in the list: the trigger is sent on, as a trigger's claim does, so
  other workers share a backlog;
- the engine has no room, or the process is shutting down: the mark is cleared at once
  (the next accept, or within a second the sweeper, sends a trigger another worker takes);
- a claim failed (Redis away): the mark's hold (1 s) lets it go, and the sweeper sends a
  trigger for a list left without one, as for a lost trigger.

The thread never waits on the engine and runs no task (it sends a trigger on, as a task
does, when a claim leaves ids): the main thread stays free for the other queues' triggers. A
trigger starts no run while the thread is gone or stuck in a claim (Redis slow to answer:
one partition of a cluster must not hold back the others' runs), and a warm shutdown ends
every run and lets its mark go before the engine drains (:meth:`ClaimRuns.stop`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from cgrid.logs import get_logger
from cgrid.threads import daemon_thread

# (queue, partition, take, sent_at_s, again) -> (claimed, ids left in the list, handed back)
ClaimStep = Callable[[str, int, int, float, bool], tuple[int, int, bool]]
MIN_EVERY_S = 0.005  # claims of a run come at most this often (CGRID_LINGER_MS=0)
MIN_QUIET_S = 0.05  # a run ends after this long without events at the least
STUCK_S = 0.25  # a claim that takes longer: no new run starts until it is done


@dataclass
class _Run:
    queue: str
    partition: int
    sent_at_s: float
    ends_at: float  # monotonic
    found_at: float  # when a claim of it last found events
    next_at: float


class ClaimRuns:
    """The claim runs of one process, made by one daemon thread (``cgrid-claim-run``)."""

    def __init__(self, *, run_ms: float, linger_ms: float, batch_size: int, reserve_now: Callable[[int], int],
                 step: ClaimStep, release: Callable[[str, int], None]) -> None:
        """``reserve_now(n)``: room for up to n attempts in the engine, without waiting;
        ``step``: one claim (its room reserved) and the hand-over of what it got (claims
        handed back: it lets the mark go);
        ``release(queue, partition)``: clear the queue's trigger mark."""
        self.run_s = run_ms / 1000
        self.every_s = max(linger_ms / 1000, MIN_EVERY_S)
        self.quiet_s = max(3 * linger_ms / 1000, MIN_QUIET_S)
        self.batch_size = batch_size
        self._reserve_now = reserve_now
        self._step = step
        self._release = release
        self._runs: dict[tuple[str, int], _Run] = {}
        self._cond = threading.Condition()
        self._busy_since: float | None = None  # when the claim under way began
        self._stopped = False
        self._thread = daemon_thread(self._loop, "cgrid-claim-run")
        self._thread.start()

    def ready(self) -> bool:
        """Whether a new run would be served now: the thread runs, is not stopped, and is not
        stuck in a claim (then a trigger's claim lets its mark go, as without runs)."""
        busy_since = self._busy_since
        return (self._thread.is_alive() and not self._stopped
                and (busy_since is None or time.monotonic() - busy_since < STUCK_S))

    def stop(self, wait_s: float = 1.0) -> None:
        """Warm shutdown: no more claims; the claim under way is let finish (``wait_s`` at
        most), then every run's mark is let go, so the next publish sends a trigger that
        another worker takes."""
        give_up_at = time.monotonic() + wait_s
        with self._cond:
            self._stopped = True
            while self._busy_since is not None and time.monotonic() < give_up_at:
                self._cond.wait(0.05)
            runs, self._runs = list(self._runs), {}
        for queue, partition in runs:
            self._release(queue, partition)

    def start(self, queue: str, partition: int, sent_at_s: float) -> None:
        """A trigger's claim of ``queue`` kept its mark: claim it again from here on."""
        now = time.monotonic()
        with self._cond:
            stopped = self._stopped
            if not stopped:
                self._runs[(queue, partition)] = _Run(queue, partition, sent_at_s, ends_at=now + self.run_s,
                                                      found_at=now, next_at=now + self.every_s)
                self._cond.notify()
        if stopped:  # (shutting down: the mark goes at once)
            self._release(queue, partition)

    def running(self) -> list[tuple[str, int]]:
        with self._cond:
            return list(self._runs)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while True:
                    now = time.monotonic()
                    due = [run for run in self._runs.values() if run.next_at <= now]
                    if due:
                        self._busy_since = now
                        break
                    soonest = min((run.next_at for run in self._runs.values()), default=None)
                    self._cond.wait(None if soonest is None else soonest - now)
            for run in due:
                try:
                    going = self._claim(run)
                except Exception as e:  # Redis away, or a bug: the mark's hold lets the queue go
                    get_logger().warning("claim_run_failed", queue=run.queue, partition=run.partition,
                                         error=repr(e)[:300])
                    going = False
                with self._cond:
                    if not going and self._runs.get((run.queue, run.partition)) is run:
                        del self._runs[(run.queue, run.partition)]
                    if self._stopped:
                        break
            with self._cond:
                self._busy_since = None
                self._cond.notify_all()

    def _claim(self, run: _Run) -> bool:
        """One claim of a run; whether the run goes on."""
        now = time.monotonic()
        last = now >= run.ends_at or now - run.found_at >= self.quiet_s
        take = self._reserve_now(self.batch_size)
        if take == 0:  # no room, or shutting down: another worker takes the queue
            self._release(run.queue, run.partition)
            return False
        claimed, waiting, handed_back = self._step(run.queue, run.partition, take, run.sent_at_s, not last)
        if claimed:
            run.found_at = now
        if last or waiting or handed_back:  # (handed back: the step let the mark go)
            return False
        run.next_at = time.monotonic() + self.every_s
        return True
