"""Buyer lanes: how one worker process shares its calls among buyers (pure logic, no I/O).

Every buyer has a lane (events without a buyer share one). A lane has at most its cap of
calls in flight in this process; the process has at most ``call_slots`` in flight in all.
Lanes with work and room take turns for free slots (round robin). An attempt that cannot
start soon — its lane is at its cap, it has waited ``wait_s`` and its lane is still full —
is *parked*: handed back to Redis unstarted, and pulled again, oldest first, when the
lane has room. So a buyer that hangs holds at most its lane's cap of calls and, briefly, a
few waiting attempts; never the process.

The cap adapts (AIMD, as TCP's window does): a call that times out or cannot connect halves
it, at most once per ``timeout_s`` (a burst of timeouts from one outage is one signal);
every HTTP answer widens it by one, up to the lane's maximum. It never closes below
``MIN_CAP``: a dead buyer's events still get their calls, at its lane's pace.

Below the cap, a lane's *width* follows what its calls need, not what it may take: every
call in flight holds a connection (HTTP/1.1), so a lane that ran its whole cap at once
would open a connection per call (with a deep backlog, a TLS handshake storm: the https
scenario of ``make bench`` measured hundreds of new connections per 1,000 calls). A lane
opens at ``INITIAL_WIDTH`` calls and widens by one per answer only while it is the limit
(its calls all busy and attempts of its own waiting) and more calls still pay: its
latency (the mean time its answered calls took: a call that hangs to its deadline is no
answer and does not count, so a buyer with a few hangs still widens) is within
``LATENCY_GROWTH_RATIO`` of the lowest measured lately. Slow start, up to the cap; past
that latency it narrows: the buyer, or this process's own loop, is the bottleneck, and
more calls in flight would only wait longer, each on a connection of its own, and time
out. A lane no longer pressed gives width back, down to what its calls used in the last
``WIDTH_WINDOW_S`` with ``WIDTH_HEADROOM`` to spare, never below ``INITIAL_WIDTH``: the
next burst opens few new connections at once.

A lane with nothing in flight, waiting or parked, untouched for ``LANE_IDLE_S``, goes away
(:meth:`Lanes.forget_idle`): a process's lanes are those of the buyers it served lately, not
of every buyer id it ever saw. Its next event opens it again, at ``INITIAL_WIDTH``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from delivery.classify import ErrorClass

T = TypeVar("T")

MIN_CAP = 1.0
INITIAL_WIDTH = 4  # calls a lane may have in flight before answers show it needs more
WIDTH_WINDOW_S = 1.0  # a lane not pressed for this long narrows to what it used in it
WIDTH_HEADROOM = 1.25  # ... times this, plus one
LATENCY_GROWTH_RATIO = 2.0  # widen only while answers take at most this times the quickest lately
LATENCY_SAMPLE_S = 0.2  # a lane's latency is measured over this long at least ...
LATENCY_SAMPLE_CALLS = 8  # ... and this many calls
BASE_LATENCY_WINDOW_S = 10.0  # "lately": the quickest answer of the last one or two windows
LANE_IDLE_S = 60.0  # an idle lane untouched this long is forgotten
# Failures that say "this buyer is not answering": they narrow its lane. A 5xx is an
# answer (the buyer is up and quick to say no), so it does not.
TROUBLE = frozenset({ErrorClass.TIMEOUT, ErrorClass.CONNECT_TIMEOUT, ErrorClass.CONNECT_REFUSED})


@dataclass(frozen=True)
class LaneLimits:
    max_concurrency: int
    timeout_s: float
    paused: bool = False  # a paused lane admits nothing and pulls nothing: all of it parks


@dataclass(eq=False, slots=True)
class Lane(Generic[T]):
    buyer: str
    limits: LaneLimits
    cap: float = 0.0
    in_flight: int = 0
    queue: deque[tuple[T, float]] = field(default_factory=deque)  # (item, when it joined)
    backlog: bool = False  # Redis holds parked events of this lane (as far as we know)
    parks: int = 0  # parks issued, so a pull that raced a park cannot clear ``backlog``
    pulling: bool = False
    next_pull_at: float = 0.0  # after a pull that found nothing callable, wait a little
    next_cut_at: float = 0.0
    failures_in_row: int = 0
    width: float = 0.0  # calls in flight its traffic needs (slow start, then what it uses)
    pressed: bool = False  # it was the limit (full, attempts waiting) within this window
    peak_in_flight: int = 0  # most calls in flight within this window
    window_ends_at: float = 0.0
    ended: int = 0  # calls answered since measured_at ...
    answered_s: float = 0.0  # ... and the seconds they took, summed
    measured_at: float = 0.0
    latency_s: float = 0.0  # its calls' latency in the last measure (0: none yet)
    width_measured: float = 0.0  # its width then
    base_latency_s: float = float("inf")  # the quickest answer lately ...
    base_latency_now_s: float = float("inf")  # ... of this window, measured narrow
    base_window_ends_at: float = 0.0
    ready: bool = False  # in the scheduler's round-robin ring
    used_at: float = 0.0  # when an attempt last joined or left it (the scheduler's clock)
    answered_at: float = float("-inf")  # when a call of it last had an HTTP answer

    def __post_init__(self) -> None:
        self.cap = float(self.limits.max_concurrency)

    @property
    def limit(self) -> int:
        """Calls it may have in flight now: its width, within its cap."""
        return int(min(self.cap, self.width))

    @property
    def full(self) -> bool:
        """``in_flight >= limit``, written without the property and its int(min()) (it runs
        several times per call): an int reaches int(x) exactly when it is above x - 1."""
        in_flight = self.in_flight + 1
        return in_flight > self.cap or in_flight > self.width

    @property
    def room(self) -> int:
        """How many more attempts the lane may hold (pull from its parked set): its cap, less
        its calls in flight and waiting. Its cap, not its width: a lane held back by its
        width keeps its waiting attempts (they are not parked, see :meth:`Lanes.overdue`), so
        pulling by its width would send its backlog through Redis a few at a time."""
        return max(0, int(self.cap) - self.in_flight - len(self.queue))

    @property
    def throttled(self) -> bool:
        return self.cap < self.limits.max_concurrency


class Lanes(Generic[T]):
    """The lanes of one process and its call slots."""

    def __init__(self, call_slots: int, limits_for: Callable[[str], LaneLimits], wait_s: float = 0.25,
                 initial_width: int = INITIAL_WIDTH) -> None:
        self.call_slots = call_slots
        self.initial_width = initial_width
        self.limits_for = limits_for
        self.wait_s = wait_s
        self.lanes: dict[str, Lane[T]] = {}
        self._ready: deque[Lane[T]] = deque()
        self._queued: dict[str, Lane[T]] = {}  # lanes with waiting attempts
        self._backlogged: dict[str, Lane[T]] = {}
        self.in_flight = 0
        self.waiting = 0
        # A lane at its cap may hold this many waiting attempts (each for at most wait_s);
        # beyond, new ones park at once: worker memory stays bounded.
        self.queue_max_per_cap = 2

    def lane(self, buyer: str) -> Lane[T]:
        lane = self.lanes.get(buyer)
        if lane is None:
            lane = self.lanes[buyer] = Lane(buyer, self.limits_for(buyer), width=float(self.initial_width))
        return lane

    @property
    def free_slots(self) -> int:
        return max(0, self.call_slots - self.in_flight - self.waiting)

    def admit(self, buyer: str, item: T, now_s: float) -> bool:
        """Queue ``item`` in its lane; False when it must park instead. While the lane has
        parked events, new ones park behind them, in creation order."""
        lane = self.lane(buyer)
        if lane.backlog or lane.limits.paused or (
                lane.full and len(lane.queue) >= self.queue_max_per_cap * max(1, int(lane.cap))
                and not self._answering_below_cap(lane, now_s)):
            self._mark_backlog(lane)
            return False
        self._enqueue(lane, item, now_s)
        return True

    def admit_pulled(self, buyer: str, item: T, now_s: float) -> None:
        """Queue an item pulled from the lane's parked set (room was checked at the pull)."""
        self._enqueue(self.lane(buyer), item, now_s)

    def _answering_below_cap(self, lane: Lane[T], now_s: float) -> bool:
        """The lane is held back by its width only (below its cap) and its calls answer
        (one did within ``wait_s``): its waiting attempts start at its pace, as soon as its
        width allows. They stay (the process's claims bound how many): parking them would
        only send them through Redis and back, and with its backlog set every new one
        would follow (measured: under a saturated loop, thousands of parks and pulls per
        40,000 events)."""
        return lane.in_flight < int(lane.cap) and now_s - lane.answered_at <= self.wait_s

    def _enqueue(self, lane: Lane[T], item: T, now_s: float) -> None:
        lane.used_at = now_s
        lane.queue.append((item, now_s))
        self.waiting += 1
        self._queued[lane.buyer] = lane
        self._make_ready(lane)

    def _make_ready(self, lane: Lane[T]) -> None:
        if not lane.ready and lane.queue and not lane.full:
            lane.ready = True
            self._ready.append(lane)

    def next_to_start(self) -> tuple[Lane[T], T] | None:
        """The next item to call, taking lanes in turn; None when no slot or no work."""
        while self._ready and self.in_flight < self.call_slots:
            lane = self._ready.popleft()
            lane.ready = False
            if not lane.queue or lane.full:
                continue
            item, _ = lane.queue.popleft()
            self.waiting -= 1
            if not lane.queue:
                self._queued.pop(lane.buyer, None)
            lane.in_flight += 1
            self.in_flight += 1
            lane.peak_in_flight = max(lane.peak_in_flight, lane.in_flight)
            self._make_ready(lane)
            return lane, item
        return None

    def finished(self, lane: Lane[T], *, answered: bool, error: ErrorClass | None, now_s: float,
                 duration_s: float = 0.0) -> None:
        """A call of ``lane`` ended after ``duration_s``: with an HTTP answer, or a failure
        ``error`` (None for a call that was not made)."""
        pressed = lane.full and bool(lane.queue)  # its own limit held back its waiting attempts
        if answered:
            lane.ended += 1
            lane.answered_s += duration_s
        lane.in_flight -= 1
        self.in_flight -= 1
        lane.used_at = now_s
        if pressed:
            lane.pressed = True
        if answered:
            lane.failures_in_row = 0
            lane.answered_at = now_s
            lane.cap = min(float(lane.limits.max_concurrency), lane.cap + 1)
            if pressed and 0 < lane.latency_s <= LATENCY_GROWTH_RATIO * lane.base_latency_s:
                # slow start: one more per answer, up to the cap, at most doubling between
                # two measures of its latency (so each step is seen before the next)
                top = min(max(lane.cap, float(self.initial_width)), 2 * lane.width_measured)
                lane.width = max(lane.width, min(top, lane.width + 1))
        elif error in TROUBLE:
            lane.failures_in_row += 1
            if now_s >= lane.next_cut_at:  # AIMD: half its cap, once per deadline
                lane.cap = max(MIN_CAP, lane.cap / 2)
                lane.next_cut_at = now_s + lane.limits.timeout_s
        self._measure_latency(lane, now_s)
        if now_s >= lane.window_ends_at:
            self._end_window(lane, now_s)
        self._make_ready(lane)

    def _measure_latency(self, lane: Lane[T], now_s: float) -> None:
        """The mean time of the calls answered since the last measure. Past
        ``LATENCY_GROWTH_RATIO`` x the lowest lately, the lane narrows in proportion (at most
        by half a measure)."""
        if lane.ended >= LATENCY_SAMPLE_CALLS and now_s - lane.measured_at >= LATENCY_SAMPLE_S:
            latency_s = lane.answered_s / lane.ended
            # The lowest lately is re-learnt only from measures taken narrow: measured wide,
            # a lane's latency holds its own queueing, and the reference would creep up.
            if now_s >= lane.base_window_ends_at:
                if lane.base_latency_now_s < float("inf"):
                    lane.base_latency_s = lane.base_latency_now_s
                lane.base_latency_now_s = float("inf")
                lane.base_window_ends_at = now_s + BASE_LATENCY_WINDOW_S
            if lane.width <= 2 * self.initial_width:
                lane.base_latency_now_s = min(lane.base_latency_now_s, latency_s)
            lane.base_latency_s = min(lane.base_latency_s, latency_s)
            lane.latency_s = latency_s
            lane.width_measured = lane.width
            if latency_s > LATENCY_GROWTH_RATIO * lane.base_latency_s:
                shrink = max(0.5, LATENCY_GROWTH_RATIO * lane.base_latency_s / latency_s)
                lane.width = max(float(self.initial_width), lane.width * shrink)
        if now_s - lane.measured_at >= LATENCY_SAMPLE_S:
            lane.measured_at, lane.ended, lane.answered_s = now_s, 0, 0.0

    def _end_window(self, lane: Lane[T], now_s: float) -> None:
        """A lane not pressed in the window narrows to what it used, with headroom."""
        if not lane.pressed:
            used = lane.peak_in_flight * WIDTH_HEADROOM + 1
            lane.width = max(float(self.initial_width), min(lane.width, used))
        lane.pressed = False
        lane.peak_in_flight = lane.in_flight
        lane.window_ends_at = now_s + WIDTH_WINDOW_S

    def overdue(self, now_s: float) -> list[T]:
        """Waiting attempts that cannot start soon: their lane is at its cap, or has had no
        answer for ``wait_s`` (a buyer that just died: its cap is cut only at its calls'
        deadline), and they have waited ``wait_s``. They are taken out of their lanes: park
        them. A lane held back by its width only (below its cap) whose calls answer keeps
        them: it widens while that pays, and parking would only send them through Redis
        and back."""
        out: list[T] = []
        for buyer, lane in list(self._queued.items()):
            if not lane.full or self._answering_below_cap(lane, now_s):  # (not full: waiting for the process)
                continue
            before = len(out)
            while lane.queue and now_s - lane.queue[0][1] >= self.wait_s:
                out.append(lane.queue.popleft()[0])
                self.waiting -= 1
            if not lane.queue:
                del self._queued[buyer]
            if len(out) > before:
                self._mark_backlog(lane)
        return out

    def forget_idle(self, now_s: float, idle_s: float = LANE_IDLE_S) -> list[str]:
        """Drop the lanes with nothing in flight, waiting, parked or being pulled that no
        attempt joined or left for ``idle_s``; returns their buyers."""
        gone = [buyer for buyer, lane in self.lanes.items()
                if not (lane.in_flight or lane.queue or lane.backlog or lane.pulling or lane.ready)
                and now_s - lane.used_at >= idle_s]
        for buyer in gone:
            del self.lanes[buyer]
        return gone

    def note_backlog(self, buyer: str) -> None:
        """Redis holds parked events of this buyer (parked by any process): pull them, and
        let new events park behind them."""
        lane = self.lane(buyer)
        if not lane.backlog:
            self._mark_backlog(lane)

    def _mark_backlog(self, lane: Lane[T]) -> None:
        lane.backlog = True
        lane.parks += 1
        self._backlogged[lane.buyer] = lane

    def pulls_wanted(self, max_k: int, now_s: float = 0.0) -> list[tuple[Lane[T], int]]:
        """Lanes with parked events and room, and how many to pull for each."""
        wanted = []
        free = self.free_slots
        for lane in self._backlogged.values():
            if free <= 0:
                break
            if not lane.pulling and lane.room > 0 and not lane.limits.paused and now_s >= lane.next_pull_at:
                k = min(lane.room, free, max_k)
                lane.pulling = True
                wanted.append((lane, k))
                free -= k
        return wanted

    def update_limits(self) -> list[T]:
        """Apply new limits (a reloaded buyers file) to every lane. A narrower maximum takes
        effect at once; a wider one is reached by the usual one-per-answer growth. Returns
        the waiting attempts of lanes that are now paused: park them."""
        out: list[T] = []
        for lane in self.lanes.values():
            lane.limits = self.limits_for(lane.buyer)
            lane.cap = min(lane.cap, float(lane.limits.max_concurrency))
            if lane.limits.paused and lane.queue:
                out += [item for item, _ in lane.queue]
                self.waiting -= len(lane.queue)
                lane.queue.clear()
                self._queued.pop(lane.buyer, None)
                self._mark_backlog(lane)
            self._make_ready(lane)
        return out

    def pulled(self, lane: Lane[T], left: int, parks_at_request: int, *, got: int = 1, now_s: float = 0.0) -> None:
        """A pull came back with ``got`` events; ``left`` stay parked in Redis."""
        lane.pulling = False
        if got == 0 and left > 0:  # nothing callable yet (a retry not due): do not spin on it
            lane.next_pull_at = now_s + 1.0
        if left == 0 and lane.parks == parks_at_request:
            lane.backlog = False
            self._backlogged.pop(lane.buyer, None)
