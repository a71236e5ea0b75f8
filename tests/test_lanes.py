"""Buyer lanes (worker/lanes.py): caps, round robin, AIMD narrowing, parking decisions."""

from __future__ import annotations

from worker.classify import ErrorClass
from worker.lanes import MIN_CAP, LaneLimits, Lanes


def lanes(call_slots: int = 100, cap: int = 4, timeout_s: float = 2.0) -> Lanes[str]:
    return Lanes(call_slots, lambda buyer: LaneLimits(max_concurrency=cap, timeout_s=timeout_s))


def start_all(scheduler: Lanes[str]) -> list[str]:
    started = []
    while (picked := scheduler.next_to_start()) is not None:
        started.append(picked[1])
    return started


def test_a_lane_admits_up_to_its_cap_and_the_rest_parks() -> None:
    s = lanes(cap=2)
    assert [s.admit("a", f"a{i}") for i in range(4)] == [True, True, False, False]
    assert s.admit("b", "b0")  # another buyer is not affected
    assert start_all(s) == ["a0", "b0", "a1"]  # round robin over lanes with work


def test_once_a_lane_parked_new_work_parks_behind_it_until_the_backlog_is_pulled() -> None:
    s = lanes(cap=2)
    s.admit("a", "a0")
    s.admit("a", "a1")
    assert not s.admit("a", "a2")  # lane full: parked
    [lane] = s.lanes.values()
    start_all(s)
    s.finished(lane, answered=True, error=None, now_s=0)
    assert not s.admit("a", "a3")  # room now, but older events wait in Redis: keep the order
    [(pull_lane, k)] = s.pulls_wanted(100)
    assert pull_lane is lane and k == 1
    assert s.pulls_wanted(100) == []  # one pull at a time per lane
    s.pulled(lane, left=0, parks_at_request=lane.parks - 1)  # a park raced the pull
    assert lane.backlog
    [(_, k)] = s.pulls_wanted(100)
    s.pulled(lane, left=0, parks_at_request=lane.parks)
    assert not lane.backlog and s.pulls_wanted(100) == []


def test_call_slots_are_shared_fairly_between_lanes() -> None:
    s = lanes(call_slots=3, cap=10)
    for i in range(5):
        s.admit("a", f"a{i}")
    s.admit("b", "b0")
    s.admit("c", "c0")
    assert start_all(s) == ["a0", "b0", "c0"]  # three slots: one per buyer, not three of a's
    assert s.free_slots == 0 and s.waiting == 4


def test_timeouts_halve_the_cap_once_per_deadline_and_answers_widen_it() -> None:
    s = lanes(cap=16, timeout_s=2.0)
    for i in range(16):
        s.admit("dead", f"d{i}")
    lane = s.lanes["dead"]
    start_all(s)
    s.finished(lane, answered=False, error=ErrorClass.TIMEOUT, now_s=10.0)
    assert lane.cap == 8
    for _ in range(5):  # the same outage's other timeouts: one signal per deadline
        s.finished(lane, answered=False, error=ErrorClass.TIMEOUT, now_s=10.5)
    assert lane.cap == 8 and lane.throttled
    for t in (12.0, 14.0, 16.0, 18.0, 20.0, 22.0):
        s.admit("dead", "x")
        start_all(s)
        s.finished(lane, answered=False, error=ErrorClass.CONNECT_REFUSED, now_s=t)
    assert lane.cap == MIN_CAP  # never zero: its events still get their calls
    s.finished(lane, answered=False, error=ErrorClass.TIMEOUT, now_s=30.0)
    assert lane.cap == MIN_CAP
    while lane.in_flight:
        s.finished(lane, answered=True, error=None, now_s=31.0)
    assert lane.cap > MIN_CAP and lane.failures_in_row == 0


def test_a_5xx_answer_does_not_narrow_the_lane() -> None:
    s = lanes(cap=4)
    s.admit("a", "a0")
    [(lane, _)] = [s.next_to_start()]  # type: ignore[list-item]
    s.finished(lane, answered=False, error=ErrorClass.CONNECTION_RESET, now_s=0)
    assert lane.cap == 4
    s.admit("a", "a1")
    s.next_to_start()
    s.finished(lane, answered=True, error=None, now_s=0)  # a 500 is an answer
    assert lane.cap == 4


def test_a_narrowed_lane_parks_the_waiting_it_can_no_longer_hold() -> None:
    s = lanes(call_slots=2, cap=8)
    for i in range(6):
        s.admit("a", f"a{i}")
    lane = s.lanes["a"]
    start_all(s)  # two slots: a0, a1 in flight, a2..a5 wait for a slot
    overflow = s.finished(lane, answered=False, error=ErrorClass.TIMEOUT, now_s=0)
    assert lane.cap == 4 and overflow == ["a5"]  # in flight 1 + waiting 3 = 4
    assert lane.backlog and s.waiting == 3
