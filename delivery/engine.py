"""The per-process delivery engine: one libcurl multi loop makes every call of the process,
scheduled by buyer lanes (``delivery/lanes.py``); one ledger thread writes outcomes, parks
and pulls in batches.

Threads of a worker process:

- Celery's task thread(s): claim a batch in the ledger and hand it over (:meth:`submit`),
  after waiting for room (:meth:`reserve`: a process holds at most ``capacity`` claimed
  attempts, so memory is bounded and a claimed attempt starts within one wave of calls).
- the **call loop** (``cgrid-curl-loop``): one ``CurlMulti`` driven with ``socket_action``
  over epoll; it admits claimed attempts to their lanes, starts calls as slots
  free up, and classifies each finished transfer. It never touches Redis.
- the **ledger thread** (``cgrid-ledger``): writes finished attempts (one Lua script per
  batch), parks what a lane could not admit (handed back to Redis unstarted, not an
  attempt) and pulls parked events back when their lane has room. With replicas to wait
  for (Sentinel), it keeps the outcomes no replica was seen to hold and has the ledger
  confirm them (:meth:`Ledger.confirm`) until one does — writing them again on a new
  primary after a failover.
"""

from __future__ import annotations

import os
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pycurl
import redis

from cgrid import metrics
from cgrid.buyers import BuyerSettings, BuyersFile
from cgrid.errors import InvalidEvent
from cgrid.event import Event
from cgrid.ledger import NO_BUYER, Finish, Ledger, NotReplicated, Outcome, Park, WaitReason, new_claim_token
from cgrid.logs import get_logger
from cgrid.macros import substitute
from cgrid.price_crypto import PriceCryptoError, encrypt_price
from cgrid.redis_conn import ride_out_redis
from cgrid.redis_replies import log_redis_error
from cgrid.settings import Settings
from cgrid.threads import daemon_thread
from delivery.attempt import Attempt, attempt_from, expired
from delivery.attempt_log import log_attempt
from delivery.headers import build_headers
from delivery.http_client import ClientConfig, Transfer, header_lines
from delivery.lanes import LANE_IDLE_S, Lane, LaneLimits, Lanes

PULL_MAX = 100  # events per pull
IDLE_WAIT_S = 1.0
BUYERS_FILE_CHECK_S = 1.0  # how often the buyers file's stamp is looked at
OVERDUE_CHECK_S = 0.05  # how often waiting attempts are checked for parking
IDLE_LANES_CHECK_S = 10.0  # how often idle lanes are looked for (delivery/lanes.py: LANE_IDLE_S)
UNCONFIRMED_MAX = 20_000  # outcomes kept for a replica to hold, per process (the oldest go first)
CONFIRM_EVERY_S = 1.0  # how often kept outcomes are confirmed (written again after a failover)
CONFIRM_SOON_S = 0.2  # ... when the node that answered is not the primary (a failover under way)
# Outcomes wait this long for more before the ledger thread writes them, unless RECORD_BATCH
# wait: one finish script for many. Each script call has a fixed cost (Redis: the script's
# prelude, its report counters, an fsync; the worker: a round trip through redis-py), and
# with events arriving a worker's outcomes came ~20 at a time. Parks, pulls and a warm
# shutdown do not wait. The call's own times are in its attempt, so this delays no figure
# of the call; a worker killed meanwhile loses these outcomes as it loses its calls in
# flight (their attempts count as lost after their lease).
RECORD_LINGER_S = 0.02
RECORD_BATCH = 500


# Not frozen: one is made per call, and a frozen dataclass's __init__ costs three times as much
# (object.__setattr__ per field). Nothing changes one once made.
@dataclass(slots=True)
class Handled:
    event_id: str
    event: Event | None
    attempt: Attempt
    claim_stamp: str = ""  # the claim's token: the finish names it (a shared claim's record has none)


@dataclass(slots=True, eq=False)
class Item:
    """A claimed attempt on its way through the loop."""

    event_id: str
    attempt_n: int
    event: Event
    buyer: str
    claim_stamp: str = ""  # the ledger's stamp of this claim: a park must show it
    lane: Lane[Any] | None = None
    started_at_s: float = 0.0
    started: float = 0.0


@dataclass(eq=False)
class _LedgerWork:
    done: list[Handled] = field(default_factory=list)
    parks: list[Park] = field(default_factory=list)
    pulls: list[tuple[str, int, int]] = field(default_factory=list)  # buyer, k, parks at request

    def __bool__(self) -> bool:
        return bool(self.done or self.parks or self.pulls)


class DeliveryEngine:
    def __init__(self, settings: Settings, ledger: Ledger) -> None:
        self.settings = settings
        self.ledger = ledger
        self.client = ClientConfig(settings.allowed_networks, settings.ca_file)
        self.buyers = BuyersFile.for_settings(settings)
        self.lanes: Lanes[Item] = Lanes(settings.call_concurrency, self.limits_for, wait_s=settings.lane_wait_s)
        # At most this many attempts are claimed by one process at once.
        self.capacity = settings.call_concurrency + settings.batch_size
        self.lane_idle_s = LANE_IDLE_S  # an idle lane untouched this long is forgotten
        self._cond = threading.Condition()
        self._pending = 0  # reserved, claimed or pulled here, and not yet recorded or parked
        self._draining = False
        self._inbox: deque[tuple[str, Any]] = deque()
        self._ledger_work = _LedgerWork()
        self._done_since = 0.0  # when the oldest outcome of _ledger_work joined it
        # The ledger thread's: outcomes and parks written but not yet seen held by a replica,
        # as (attempt n, finish or park, run id of the node that took it), oldest first.
        self._unconfirmed: list[tuple[int, Finish | Park, str]] = []
        self._confirm_at = 0.0
        self.call_loop: _CallLoop | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        daemon_thread(self._call_loop, "cgrid-curl-loop").start()
        daemon_thread(self._ledger_loop, "cgrid-ledger").start()

    def buyer(self, buyer: str | None) -> BuyerSettings:
        return self.buyers.config.get(buyer)

    @property
    def lease_s(self) -> float:
        """How long a claimed attempt may take before it counts as lost: from the longest
        deadline of any buyer (a buyer's own timeout_s may exceed CGRID_TIMEOUT_S)."""
        return self.settings.lease_for(self.buyers.config.longest_timeout_s)

    def limits_for(self, buyer: str) -> LaneLimits:
        settings, own = self.settings, self.buyer(buyer)
        return LaneLimits(max_concurrency=own.max_concurrency or settings.buyer_max_concurrency,
                          timeout_s=own.timeout_s or settings.timeout_s, paused=own.paused)

    def metrics_label(self, buyer: str) -> str:
        """The buyer's label in the metrics (a bounded set: cgrid/metrics.py)."""
        return metrics.buyer_label(buyer, named=buyer in self.buyers.config.buyers)

    def request_reload(self) -> None:
        """Re-read the buyers file now (SIGHUP); safe from a signal handler."""
        self._post("reload", None)

    # -- the task side -------------------------------------------------------------------

    def reserve(self, n: int) -> None:
        """Wait for room for ``n`` attempts before claiming them (back-pressure)."""
        with self._cond:
            while self._pending and self._pending + n > self.capacity:
                self._cond.wait()
            self._pending += n

    def reserve_up_to(self, n: int, before_waiting: Callable[[], None] | None = None) -> int:
        """Reserve room for at most ``n`` attempts, as much as there is (a shared trigger's
        claim takes that many): waits only while there is none, calling ``before_waiting``
        first. Returns how many were reserved (at least 1)."""
        with self._cond:
            full = self._pending >= self.capacity
        if full and before_waiting is not None:
            before_waiting()  # (outside the lock: it talks to Redis)
        with self._cond:
            while self._pending >= self.capacity:
                self._cond.wait()
            room = min(n, self.capacity - self._pending)
            self._pending += room
            return room

    def reserve_now(self, n: int) -> int:
        """Reserve room for at most ``n`` attempts without waiting: how many were reserved
        (0: none is free, or the engine is draining)."""
        with self._cond:
            if self._draining:
                return 0
            room = max(0, min(n, self.capacity - self._pending))
            self._pending += room
            return room

    @property
    def draining(self) -> bool:
        return self._draining

    def submit(self, claimed: list[tuple[str, str]], attempt_n: int, reserved: int,
               parked_buyers: list[str] | None = None, claim_stamp: str = "", *, hold: bool = False) -> None:
        """Hand claimed attempts to the call loop; give back the room of ids not claimed.
        ``parked_buyers``: their buyers that have events parked in Redis (perhaps by a
        worker that is gone): their lanes pull those first. ``hold``: claims no replica holds
        on a node the sentinels did not vouch for: handed back uncalled (parked)."""
        with self._cond:
            self._pending -= reserved - len(claimed)
            self._cond.notify_all()
        if claimed:
            self._post("claimed", ([(event_id, event_json, attempt_n) for event_id, event_json in claimed],
                                   parked_buyers or [], claim_stamp, hold))

    def drain(self, timeout_s: float) -> bool:
        """Wait until every claimed attempt has been made and recorded (warm shutdown)."""
        give_up_at = time.monotonic() + timeout_s
        with self._cond:
            self._draining = True
            self._cond.notify_all()  # outcomes waiting to be written go now
            while self._pending:
                left_s = give_up_at - time.monotonic()
                if left_s <= 0:
                    return False
                self._cond.wait(min(left_s, 0.1))
        return True

    def _post(self, kind: str, payload: Any) -> None:
        self._inbox.append((kind, payload))
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, InterruptedError):
            pass  # the loop is already due to wake

    def _release(self, n: int) -> None:
        with self._cond:
            self._pending -= n
            self._cond.notify_all()

    # -- the call loop -------------------------------------------------------------------

    def _call_loop(self) -> None:
        loop = self.call_loop = _CallLoop(self)  # the loop thread's state (tests look at it)
        while True:
            try:
                loop.run()
            except Exception as e:  # a bug: log it and keep the process's calls going
                get_logger().error("call_loop_crashed", error=repr(e)[:300])
                time.sleep(0.1)

    # -- the ledger thread ---------------------------------------------------------------

    def _to_ledger(self, done: list[Handled], parks: list[Park], pulls: list[tuple[str, int, int]]) -> None:
        with self._cond:
            work = self._ledger_work
            first_done = bool(done) and not work.done
            if first_done:
                self._done_since = time.monotonic()
            work.done += done
            work.parks += parks
            work.pulls += pulls
            # The ledger thread is woken when this makes its work due, or starts its wait for
            # more outcomes; not for every outcome that joins a wait already under way.
            batch_filled = len(work.done) >= RECORD_BATCH > len(work.done) - len(done)
            if parks or pulls or first_done or batch_filled:
                self._cond.notify_all()

    def _ledger_work_due(self) -> float:
        """How long the ledger thread waits before it takes its work (0: now; infinity: until
        woken). Called with ``_cond`` held."""
        work = self._ledger_work
        if work.parks or work.pulls or self._confirm_due():
            return 0.0
        if work.done:
            if self._draining or len(work.done) >= RECORD_BATCH:
                return 0.0
            linger_s = self._done_since + RECORD_LINGER_S - time.monotonic()
        else:
            linger_s = float("inf")
        if self._unconfirmed:
            linger_s = min(linger_s, self._confirm_at - time.monotonic())
        return max(0.0, linger_s)

    def _ledger_loop(self) -> None:
        while True:
            with self._cond:
                while (wait_s := self._ledger_work_due()) > 0:
                    self._cond.wait(None if wait_s == float("inf") else wait_s)
                work, self._ledger_work = self._ledger_work, _LedgerWork()
            # Each step on its own: a bug in one must not stop the others (a pull that never
            # answers would leave its lane waiting for good). What a bug leaves unwritten is
            # covered by the attempts' leases.
            steps: list[Any] = []
            kept: list[Handled] = []  # outcomes Redis could not take: written on the next round
            if work.parks:
                steps.append(lambda parks=work.parks: self._write_parks(parks))
            for attempt_n in (1, 2):
                batch = [h for h in work.done if h.attempt.n == attempt_n]
                if batch:
                    steps.append(lambda batch=batch, attempt_n=attempt_n, kept=kept:
                                 None if self._record(batch, attempt_n) else kept.extend(batch))
            for buyer, k, parks_at_request in work.pulls:
                steps.append(lambda b=buyer, k=k, p=parks_at_request: self._pull(b, k, p))
            if self._confirm_due():
                steps.append(self._confirm)
            for step in steps:
                try:
                    step()
                except Exception as e:
                    get_logger().error("ledger_thread_crashed", error=repr(e)[:300])
            self._release(len(work.done) - len(kept) + len(work.parks))
            if kept:
                time.sleep(0.5)
                self._to_ledger(kept, [], [])

    def _ride_out(self, call: Any) -> Any:
        return ride_out_redis(call, self.settings.attempt_grace_s / 2)

    def _record(self, batch: list[Handled], attempt_n: int) -> bool:
        """Write outcomes, riding out a short Redis outage; False when Redis stayed away (the
        caller keeps the outcomes and writes them later: a success written late still
        cancels the retry the sweeper may have scheduled meanwhile)."""
        settings = self.settings
        finishes = [h.attempt.to_finish(h.event_id, self.buyer(h.event.buyer if h.event else None).retry_delay_s,
                                        h.event, h.claim_stamp) for h in batch]

        def write() -> tuple[list[str], str | None]:
            try:
                states = self.ledger.finish(finishes, attempt_n, ledger_ttl_s=settings.ledger_ttl_s,
                                            report_ttl_s=settings.report_ttl_s, retry_delay_s=settings.retry_delay_s)
                return states, None
            except NotReplicated as e:  # written, but no replica seen to hold it yet
                return e.result, e.node

        try:
            states, node = self._ride_out(write)
        except redis.RedisError as e:
            log_redis_error("ledger_write_failed", e, level="error", events=len(batch), kept=True)
            return False
        if node is not None:
            self._keep_unconfirmed([(attempt_n, finish, node) for finish in finishes])
        if metrics.ENABLED:
            count_finished(batch, states, self.metrics_label)
        for item, state in zip(batch, states, strict=True):
            if item.event is not None:
                log_attempt(item.event, item.attempt, state or "superseded")
            else:
                get_logger().error("poisoned_event", event_id=item.event_id, reason=item.attempt.reason)
        return True

    def _confirm_due(self) -> bool:
        return bool(self._unconfirmed) and time.monotonic() >= self._confirm_at

    def _keep_unconfirmed(self, outcomes: list[tuple[int, Finish | Park, str]]) -> None:
        """Outcomes (and parks) written on a primary but not yet seen held by a replica: kept
        until one is, or until a new primary has them (:meth:`_confirm`). At most
        UNCONFIRMED_MAX: the oldest go first (one of those lost in a failover counts as a
        lost attempt after its lease, then its retry: never a third call)."""
        if not self._unconfirmed:
            self._confirm_at = time.monotonic() + CONFIRM_EVERY_S
            get_logger().warning("outcomes_not_replicated", events=len(outcomes),
                                 replicas=self.settings.redis_wait_replicas, kept=True)
        self._unconfirmed += outcomes
        dropped = len(self._unconfirmed) - UNCONFIRMED_MAX
        if dropped > 0:
            del self._unconfirmed[:dropped]
            get_logger().warning("outcomes_not_replicated", events=dropped, kept=False)

    def _confirm(self) -> None:
        """Have the ledger confirm the kept outcomes: written again on a new primary, then
        WAIT. Held by a replica: let go."""
        kept, settings = self._unconfirmed, self.settings
        try:
            found = self._ride_out(lambda: self.ledger.confirm(
                kept, ledger_ttl_s=settings.ledger_ttl_s, report_ttl_s=settings.report_ttl_s,
                retry_delay_s=settings.retry_delay_s))
        except redis.RedisError as e:
            get_logger().warning("ledger_confirm_failed", events=len(kept), error=str(e)[:200])
            self._confirm_at = time.monotonic() + CONFIRM_EVERY_S
            return
        if found.rewritten:
            get_logger().warning("outcomes_written_again", events=found.rewritten, node=found.node)
        if found.held:
            get_logger().info("outcomes_replicated", events=len(kept))
            self._unconfirmed = []
            return
        if found.node:  # every kept outcome is on the node that answered now
            self._unconfirmed = [(n, finish, found.node) for n, finish, _ in kept]
        self._confirm_at = time.monotonic() + (CONFIRM_SOON_S if found.soon else CONFIRM_EVERY_S)

    def _write_parks(self, parks: list[Park]) -> None:
        def write() -> str | None:
            try:
                self.ledger.park(parks)
                return None
            except NotReplicated as e:  # written, but no replica seen to hold it yet
                return e.node

        try:
            node = self._ride_out(write)
            if node is not None:
                self._keep_unconfirmed([(park.attempt_n, park, node) for park in parks])
        except redis.RedisError as e:
            # Still claimed: when their lease passes the sweeper counts them as lost attempts.
            log_redis_error("ledger_park_failed", e, level="error", events=len(parks))

    def _pull(self, buyer: str, k: int, parks_at_request: int) -> None:
        items: list[tuple[int, str, str]] = []
        stamp: list[str] = []
        left = 1  # on a Redis error, keep the lane's backlog: it is pulled again later
        hold = False
        with self._cond:
            draining = self._draining

        token = new_claim_token()  # sent again with the pull: a lost reply costs no events

        def pull() -> tuple[tuple[int, list[tuple[int, str, str]]], bool]:
            try:
                return self.ledger.pull(buyer, k, lease_s=self.lease_s, stamp=stamp, token=token), False
            except NotReplicated as e:  # pulled on a node not vouched for: parked again
                return e.result, True

        try:
            if not draining:
                (left, items), hold = self._ride_out(pull)
        except redis.RedisError as e:
            log_redis_error("ledger_pull_failed", e, buyer=buyer)
        finally:  # the lane always hears back, or it would never pull again
            with self._cond:
                self._pending += len(items)
            self._post("pulled", (buyer, left, parks_at_request, items, stamp[-1] if stamp else "", hold))


_children: dict[tuple[Any, ...], Any] = {}  # (metric, labels...) -> its child (the ledger thread's own)


def _child(metric: Any, *labels: str) -> Any:
    """``metric.labels(*labels)``, kept: labels() takes a lock and costs more than the count."""
    key = (metric, *labels)
    child = _children.get(key)
    if child is None:
        child = _children[key] = metric.labels(*labels)
    return child


def count_finished(batch: list[Handled], states: list[str], label: Callable[[str], str]) -> None:
    m = metrics.M
    for item, state in zip(batch, states, strict=True):
        buyer = label((item.event.buyer if item.event else None) or NO_BUYER)
        kind = item.event.kind.value if item.event else "-"
        _child(m.attempts, buyer, kind, item.attempt.outcome.value).inc()
        if item.attempt.called:
            _child(m.latency, buyer).observe(item.attempt.duration_ms / 1000)
            if item.attempt.n == 1 and item.event is not None:  # publish -> first call (0 if clocks disagree)
                _child(m.first_delay, kind).observe(max(0.0, item.attempt.started_at_s - item.event.created_at_s))
        if state == "retry_scheduled":
            _child(m.retries, buyer, kind).inc()
        elif state:
            _child(m.finished, buyer, kind, state).inc()


# libcurl's wish (POLL_IN, POLL_OUT, POLL_INOUT) as an epoll mask.
_EPOLL_MASKS = {pycurl.POLL_IN: select.EPOLLIN, pycurl.POLL_OUT: select.EPOLLOUT,
                pycurl.POLL_INOUT: select.EPOLLIN | select.EPOLLOUT}


class _CallLoop:
    """State owned by the call-loop thread: the multi handle, its sockets, the lanes."""

    def __init__(self, engine: DeliveryEngine) -> None:
        self.engine = engine
        self.settings = engine.settings
        self.lanes = engine.lanes
        self.multi = pycurl.CurlMulti()
        self.multi.setopt(pycurl.M_SOCKETFUNCTION, self._on_socket)
        self.multi.setopt(pycurl.M_TIMERFUNCTION, self._on_timer)
        # Idle connections kept for reuse. libcurl's default, 4 x the transfers in the multi,
        # shrinks whenever few calls run and closes the idle connections of quieter buyers.
        self.multi.setopt(pycurl.M_MAXCONNECTS, max(self.settings.call_concurrency, 1))
        # libcurl's sockets and the wake socket, on one epoll (select() breaks past 1,024 sockets).
        self.epoll = select.epoll()
        self.wake_fd = engine._wake_r.fileno()
        self.epoll.register(self.wake_fd, select.EPOLLIN)
        self.registered: dict[int, int] = {}  # fd -> the epoll mask it is registered with
        self.wanted: set[int] = set()  # the fds libcurl watches now (a subset of registered)
        self.timer_at: float | None = None
        self.free: list[Transfer] = []
        self.running = 0
        self.next_overdue_check = 0.0
        self.next_buyers_check = time.monotonic() + BUYERS_FILE_CHECK_S
        self.next_idle_check = 0.0
        self.gauge_labels: set[str] = set()  # buyer labels whose lane gauges are set
        # Handed to the ledger thread once per loop iteration, not per call.
        self.done: list[Handled] = []
        self.parks: list[Park] = []

    # libcurl tells us which sockets to watch and when to call it back. A keep-alive
    # connection is unwatched (POLL_REMOVE) after each call and watched again by the next one
    # on it: it stays registered in between, so a reused connection costs no epoll_ctl. One
    # that stirs while unwatched (the buyer closed it) is unregistered then (:meth:`run`);
    # one libcurl closes is forgotten in :meth:`_on_close_socket` (closing drops it from epoll).
    def _on_socket(self, what: int, fd: int, multi: Any, socketp: Any) -> None:
        mask = _EPOLL_MASKS.get(what, 0)
        if not mask:  # POLL_REMOVE
            self.wanted.discard(fd)
            return
        self.wanted.add(fd)
        registered = self.registered.get(fd)
        if registered == mask:
            return
        if registered is None:
            try:
                self.epoll.register(fd, mask)
            except FileExistsError:
                self.epoll.modify(fd, mask)
        else:
            try:
                self.epoll.modify(fd, mask)
            except FileNotFoundError:
                self.epoll.register(fd, mask)
        self.registered[fd] = mask

    def _on_close_socket(self, fd: int) -> int:
        """libcurl closes one of its sockets (CLOSESOCKETFUNCTION): closing drops it from
        epoll; its number may come back as a new socket."""
        self.registered.pop(fd, None)
        self.wanted.discard(fd)
        try:
            os.close(fd)
        except OSError:
            return 1
        return 0

    def _unwatch(self, fd: int) -> None:
        """An fd libcurl does not watch stirred (an idle keep-alive connection the buyer
        closed): stop watching it; libcurl finds it dead if it tries to reuse it."""
        if self.registered.pop(fd, None) is not None:
            try:
                self.epoll.unregister(fd)
            except OSError:
                pass

    def _on_timer(self, timeout_ms: int) -> None:
        self.timer_at = None if timeout_ms < 0 else time.monotonic() + timeout_ms / 1000

    def run(self) -> None:
        engine = self.engine
        inbox = engine._inbox
        while True:
            if inbox:
                wait_s = 0.0
            else:
                wait_until = self.next_overdue_check if self.lanes.waiting else time.monotonic() + IDLE_WAIT_S
                if self.timer_at is not None:
                    wait_until = min(wait_until, self.timer_at)
                wait_s = max(0.0, wait_until - time.monotonic())
            try:
                ready = self.epoll.poll(wait_s)
            except InterruptedError:
                ready = []
            for fd, events in ready:
                if fd == self.wake_fd:
                    try:
                        while engine._wake_r.recv(4096):
                            pass
                    except (BlockingIOError, InterruptedError):
                        pass
                    continue
                if fd not in self.wanted:
                    self._unwatch(fd)
                    continue
                # As selectors reads epoll: anything but "writable" wakes a reader (a hang-up,
                # an error), anything but "readable" a writer.
                flags = (pycurl.CSELECT_IN if events & ~select.EPOLLOUT else 0) | (
                    pycurl.CSELECT_OUT if events & ~select.EPOLLIN else 0)
                self.multi.socket_action(fd, flags)
            if self.timer_at is not None and time.monotonic() >= self.timer_at:
                self.timer_at = None
                self.multi.socket_action(pycurl.SOCKET_TIMEOUT, 0)
            self._collect()
            while inbox:
                kind, payload = inbox.popleft()
                if kind == "claimed":
                    self._take_claimed(*payload)
                elif kind == "pulled":
                    self._take_pulled(*payload)
                else:
                    self._reload_buyers(force=True)
            self._start_ready()
            now = time.monotonic()
            if now >= self.next_idle_check:
                self.next_idle_check = now + min(IDLE_LANES_CHECK_S, engine.lane_idle_s)
                self.lanes.forget_idle(now, engine.lane_idle_s)
            if now >= self.next_buyers_check:
                self.next_buyers_check = now + BUYERS_FILE_CHECK_S
                self._reload_buyers(force=False)
                if metrics.ENABLED:
                    self._lane_gauges()
            if now >= self.next_overdue_check:
                self.next_overdue_check = now + OVERDUE_CHECK_S
                self._park(self.lanes.overdue(now))
            # No pulls while draining (warm shutdown): parked events wait for other workers.
            pulls = [] if engine._draining else [
                (lane.buyer, k, lane.parks) for lane, k in self.lanes.pulls_wanted(PULL_MAX, now)]
            if self.done or self.parks or pulls:
                engine._to_ledger(self.done, self.parks, pulls)
                self.done, self.parks = [], []

    # -- work coming in --------------------------------------------------------------------

    def _prepared(self, event_id: str, event_json: str, attempt_n: int, claim_stamp: str) -> Item | None:
        """Decode a claimed attempt; one that must not be called is recorded at once."""
        try:
            event = Event.from_ledger_json(event_json)
        except InvalidEvent as e:
            attempt = Attempt(attempt_n, Outcome.REJECTED, time.time(), 0.0, reason=str(e))
            self.done.append(Handled(event_id, None, attempt, claim_stamp))
            return None
        decision = expired(event, attempt_n, self.engine.buyer(event.buyer).max_age_s or self.settings.event_max_age_s)
        if decision is not None:
            self.done.append(Handled(event_id, event, decision, claim_stamp))
            return None
        return Item(event_id, attempt_n, event, event.buyer or NO_BUYER, claim_stamp)

    def _take_claimed(self, claimed: list[tuple[str, str, int]], parked_buyers: list[str], claim_stamp: str,
                      hold: bool = False) -> None:
        now = time.monotonic()
        for buyer in parked_buyers:  # older events wait in Redis: pull them, park new ones behind
            self.lanes.note_backlog(buyer)
        for event_id, event_json, attempt_n in claimed:
            try:
                item = self._prepared(event_id, event_json, attempt_n, claim_stamp)
                if item is not None and hold:  # no replica holds the claim: not called, handed back
                    self.lanes.note_backlog(item.buyer)
                    self._park([item], WaitReason.NO_REPLICA)
                elif item is not None and not self.lanes.admit(item.buyer, item, now):
                    self._park([item])
            except Exception as e:
                self._lost_to_a_bug(event_id, e)

    def _take_pulled(self, buyer: str, left: int, parks_at_request: int,
                     items: list[tuple[int, str, str]], claim_stamp: str, hold: bool = False) -> None:
        lane = self.lanes.lane(buyer)
        now = time.monotonic()
        if hold:  # pulled on a node no replica or sentinel vouched for: parked again, pulled in a second
            self.lanes.pulled(lane, left + len(items), parks_at_request, got=0, now_s=now)
        else:
            self.lanes.pulled(lane, left, parks_at_request, got=len(items), now_s=now)
        for attempt_n, event_id, event_json in items:
            try:
                item = self._prepared(event_id, event_json, attempt_n, claim_stamp)
                if item is not None and hold:
                    self._park([item], WaitReason.NO_REPLICA)
                elif item is not None and lane.limits.paused:  # paused while the pull was on its way
                    self.lanes.note_backlog(item.buyer)
                    self._park([item])
                elif item is not None:
                    self.lanes.admit_pulled(item.buyer, item, now)
            except Exception as e:
                self._lost_to_a_bug(event_id, e)

    def _lost_to_a_bug(self, event_id: str, error: Exception) -> None:
        """A bug, not a buyer's answer: the process lets go of the attempt (its room is
        given back) and leaves it to its lease: the sweeper counts it as a lost attempt."""
        get_logger().error("attempt_crashed", event_id=event_id, error=repr(error)[:300])
        self.engine._release(1)

    def _park(self, items: list[Item], why: WaitReason | None = None) -> None:
        for i in items:
            paused = self.lanes.lane(i.buyer).limits.paused
            reason = why or (WaitReason.PAUSED if paused else WaitReason.LANE_FULL)
            self.parks.append(Park(i.event_id, i.attempt_n, i.event.created_at_s, i.buyer, reason, i.claim_stamp))
            if metrics.ENABLED:
                metrics.M.parked.labels(self.engine.metrics_label(i.buyer), reason.value).inc()

    def _lane_gauges(self) -> None:
        """The lanes' gauges, summed per buyer label (buyers past the label limit share
        one); a label whose lanes are gone (idle) reads 0."""
        m = metrics.M
        sums: dict[str, list[int]] = {}  # label -> in flight, waiting, cap, throttled
        for buyer, lane in self.lanes.lanes.items():
            row = sums.setdefault(self.engine.metrics_label(buyer), [0, 0, 0, 0])
            row[0] += lane.in_flight
            row[1] += len(lane.queue)
            row[2] += int(lane.cap)
            row[3] = max(row[3], 1 if lane.throttled else 0)
        gone = self.gauge_labels - sums.keys()
        self.gauge_labels = set(sums)
        for label in gone:
            sums[label] = [0, 0, 0, 0]
        for label, (in_flight, waiting, cap, throttled) in sums.items():
            m.in_flight.labels(label).set(in_flight)
            m.waiting.labels(label).set(waiting)
            m.cap.labels(label).set(cap)
            m.throttled.labels(label).set(throttled)

    def _reload_buyers(self, *, force: bool) -> None:
        """A new buyers file (changed on disk, or SIGHUP): new limits for every lane; the
        waiting attempts of a buyer that is now paused go back to Redis."""
        buyers = self.engine.buyers
        error_before = buyers.last_error
        changed = buyers.reload() if force else buyers.maybe_reload()
        if changed:
            self._park(self.lanes.update_limits())
            get_logger().info("buyers_file_loaded", path=buyers.path, buyers=len(buyers.config.buyers))
        elif buyers.last_error and buyers.last_error != error_before:
            get_logger().error("buyers_file_refused", error=buyers.last_error, kept="the last good version")

    # -- calls -----------------------------------------------------------------------------

    def _start_ready(self) -> None:
        while True:
            picked = self.lanes.next_to_start()
            if picked is None:
                return
            lane, item = picked
            item.lane = lane
            self._start(item, lane.limits.timeout_s)

    def _start(self, item: Item, timeout_s: float) -> None:
        item.started_at_s = time.time()
        item.started = time.perf_counter()
        try:
            url = self._target_url(item.event)
            headers = header_lines(build_headers(item.event))
        except Exception as e:  # the event cannot make a request: rejected, nothing sent
            reason = str(e) if str(e).startswith("macros.") else f"url: {e}"
            self._done(item, Attempt(item.attempt_n, Outcome.REJECTED, item.started_at_s, 0.0, reason=reason))
            return
        transfer = self.free.pop() if self.free else self._new_transfer()
        try:
            transfer.prepare(url, headers, timeout_s)
        except Exception as e:  # libcurl refuses the URL (e.g. an embedded NUL): nothing sent
            self.free.append(transfer)
            self._done(item, Attempt(item.attempt_n, Outcome.REJECTED, item.started_at_s, 0.0,
                                     reason=f"url: {e}"))
            return
        transfer.item = item
        try:
            self.multi.add_handle(transfer.curl)
        except Exception as e:
            transfer.item = None
            self.free.append(transfer)
            assert item.lane is not None
            self.lanes.finished(item.lane, answered=False, error=None, now_s=time.monotonic())
            self._lost_to_a_bug(item.event_id, e)
            return
        self.running += 1

    def _new_transfer(self) -> Transfer:
        transfer = Transfer(self.engine.client)
        transfer.curl.setopt(pycurl.CLOSESOCKETFUNCTION, self._on_close_socket)
        return transfer

    def _target_url(self, event: Event) -> str:
        """The URL to call; for a buyer with price keys, ``${AUCTION_PRICE}`` carries the
        price encrypted, with a fresh IV for every call."""
        keys = self.engine.buyer(event.buyer).price_keys
        price = event.macros.get("AUCTION_PRICE")
        if keys is None or price is None:
            return event.target_url()
        try:
            encrypted = encrypt_price(price, keys)
        except PriceCryptoError as e:
            raise ValueError(f"macros.{e}") from None
        return substitute(event.url, {**event.macros, "AUCTION_PRICE": encrypted})

    def _collect(self) -> None:
        while True:
            queued, ok, failed = self.multi.info_read()
            for curl in ok:
                self._finish(curl.transfer, 0, "")
            for curl, errno, message in failed:
                self._finish(curl.transfer, errno, message)
            if not queued:
                return

    def _finish(self, transfer: Transfer, errno: int, message: str) -> None:
        item: Item = transfer.item
        result = transfer.result(errno, message)
        self.multi.remove_handle(transfer.curl)
        self.running -= 1
        transfer.item = None
        self.free.append(transfer)
        duration_ms = (time.perf_counter() - item.started) * 1000
        attempt = attempt_from(result, item.attempt_n, item.started_at_s, duration_ms)
        self._done(item, attempt)

    def _done(self, item: Item, attempt: Attempt) -> None:
        assert item.lane is not None
        self.lanes.finished(item.lane, answered=attempt.status is not None, error=attempt.error,
                            now_s=time.monotonic(), duration_s=attempt.duration_ms / 1000)
        self.done.append(Handled(item.event_id, item.event, attempt, item.claim_stamp))
