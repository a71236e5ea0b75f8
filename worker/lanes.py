"""Buyer lanes: how one worker process shares its calls among buyers (pure logic, no I/O).

Every buyer has a lane (events without a buyer share one). A lane admits at most its cap
of attempts in this process — calls in flight plus those waiting for one of the process's
``CGRID_CALL_CONCURRENCY`` call slots — and lanes with waiting work take turns for free
slots (round robin). What a lane cannot admit is *parked*: handed back to Redis unstarted,
and pulled again, oldest first, when the lane has room. So a buyer that hangs holds at most
its lane, never the process.

The cap adapts (AIMD, as TCP's window does): a call that times out or cannot connect halves
it, at most once per ``cut_interval_s`` (a burst of timeouts from one outage is one signal);
every HTTP answer widens it by one, up to the lane's maximum. It never closes below
``MIN_CAP``: a dead buyer's events still get their calls, at its lane's pace.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from worker.classify import ErrorClass

T = TypeVar("T")

MIN_CAP = 1.0
# Failures that say "this buyer is not answering": they narrow its lane. A 5xx is an
# answer (the buyer is up and quick to say no), so it does not.
TROUBLE = frozenset({ErrorClass.TIMEOUT, ErrorClass.CONNECT_TIMEOUT, ErrorClass.CONNECT_REFUSED})


@dataclass(frozen=True)
class LaneLimits:
    max_concurrency: int
    timeout_s: float


@dataclass(eq=False)
class Lane(Generic[T]):
    buyer: str
    limits: LaneLimits
    cap: float = 0.0
    in_flight: int = 0
    queue: deque[T] = field(default_factory=deque)
    backlog: bool = False  # Redis holds parked events of this lane (as far as we know)
    parks: int = 0  # parks issued, so a pull that raced a park cannot clear ``backlog``
    pulling: bool = False
    next_cut_at: float = 0.0
    failures_in_row: int = 0
    ready: bool = False  # in the scheduler's round-robin ring

    def __post_init__(self) -> None:
        self.cap = float(self.limits.max_concurrency)

    @property
    def admitted(self) -> int:
        return self.in_flight + len(self.queue)

    @property
    def room(self) -> int:
        return max(0, int(self.cap) - self.admitted)

    @property
    def throttled(self) -> bool:
        return self.cap < self.limits.max_concurrency


class Lanes(Generic[T]):
    """The lanes of one process and its call slots."""

    def __init__(self, call_slots: int, limits_for: Callable[[str], LaneLimits]) -> None:
        self.call_slots = call_slots
        self.limits_for = limits_for
        self.lanes: dict[str, Lane[T]] = {}
        self._ready: deque[Lane[T]] = deque()
        self._backlogged: dict[str, Lane[T]] = {}
        self.in_flight = 0
        self.waiting = 0  # admitted, waiting for a call slot

    def lane(self, buyer: str) -> Lane[T]:
        lane = self.lanes.get(buyer)
        if lane is None:
            lane = self.lanes[buyer] = Lane(buyer, self.limits_for(buyer))
        return lane

    @property
    def free_slots(self) -> int:
        return max(0, self.call_slots - self.in_flight - self.waiting)

    def admit(self, buyer: str, item: T) -> bool:
        """Queue ``item`` in its lane; False when the lane has no room (park it instead).
        While the lane has parked events, new ones park behind them, in creation order."""
        lane = self.lane(buyer)
        if lane.backlog or lane.room <= 0:
            self._mark_backlog(lane)
            return False
        self._enqueue(lane, item)
        return True

    def admit_pulled(self, buyer: str, item: T) -> None:
        """Queue an item pulled from the lane's parked set (room was checked at the pull)."""
        self._enqueue(self.lane(buyer), item)

    def _enqueue(self, lane: Lane[T], item: T) -> None:
        lane.queue.append(item)
        self.waiting += 1
        if not lane.ready:
            lane.ready = True
            self._ready.append(lane)

    def next_to_start(self) -> tuple[Lane[T], T] | None:
        """The next item to call, taking lanes in turn; None when no slot or no work."""
        while self._ready and self.in_flight < self.call_slots:
            lane = self._ready.popleft()
            if not lane.queue:
                lane.ready = False
                continue
            item = lane.queue.popleft()
            self.waiting -= 1
            lane.in_flight += 1
            self.in_flight += 1
            if lane.queue:
                self._ready.append(lane)
            else:
                lane.ready = False
            return lane, item
        return None

    def finished(self, lane: Lane[T], *, answered: bool, error: ErrorClass | None, now_s: float) -> list[T]:
        """A call of ``lane`` ended: with an HTTP answer, or a failure ``error`` (None for a
        call that was not made). Returns the waiting items a narrowed lane can no longer
        hold: park them."""
        lane.in_flight -= 1
        self.in_flight -= 1
        if answered:
            lane.failures_in_row = 0
            lane.cap = min(float(lane.limits.max_concurrency), lane.cap + 1)
            return []
        if error not in TROUBLE:
            return []
        lane.failures_in_row += 1
        if now_s >= lane.next_cut_at:
            lane.cap = max(MIN_CAP, lane.cap / 2)
            lane.next_cut_at = now_s + lane.limits.timeout_s
        overflow: list[T] = []
        while lane.queue and lane.admitted > int(lane.cap):
            overflow.append(lane.queue.pop())
            self.waiting -= 1
        if overflow:
            self._mark_backlog(lane)
        return overflow[::-1]

    def _mark_backlog(self, lane: Lane[T]) -> None:
        lane.backlog = True
        lane.parks += 1
        self._backlogged[lane.buyer] = lane

    def pulls_wanted(self, max_k: int) -> list[tuple[Lane[T], int]]:
        """Lanes with parked events and room, and how many to pull for each."""
        wanted = []
        free = self.free_slots
        for lane in self._backlogged.values():
            if free <= 0:
                break
            if not lane.pulling and lane.room > 0:
                k = min(lane.room, free, max_k)
                lane.pulling = True
                wanted.append((lane, k))
                free -= k
        return wanted

    def pulled(self, lane: Lane[T], left: int, parks_at_request: int) -> None:
        """A pull came back; ``left`` events stay parked in Redis."""
        lane.pulling = False
        if left == 0 and lane.parks == parks_at_request:
            lane.backlog = False
            self._backlogged.pop(lane.buyer, None)
