"""The queue-stalled gauge: how long triggers have waited on a queue that no worker takes from."""

from __future__ import annotations

from worker.sweeper import QueueStalls


def test_a_queue_nobody_takes_from_counts_up_from_when_it_was_first_seen_waiting() -> None:
    stalls = QueueStalls()
    assert stalls.stalled_s("q", 5, 0.0, 100.0) == 0  # first seen: from now
    assert stalls.stalled_s("q", 5, 0.0, 101.5) == 1.5
    assert stalls.stalled_s("q", 9, 0.0, 130.0) == 30  # growing, watermark still: stalled


def test_an_empty_queue_a_shrinking_one_or_a_moving_watermark_is_not_stalled() -> None:
    stalls = QueueStalls()
    stalls.stalled_s("q", 5, 10.0, 100.0)
    assert stalls.stalled_s("q", 5, 10.0, 120.0) == 20
    assert stalls.stalled_s("q", 8, 11.0, 121.0) == 0  # a worker started a newer trigger
    assert stalls.stalled_s("q", 8, 11.0, 125.0) == 4
    assert stalls.stalled_s("q", 7, 11.0, 126.0) == 0  # shrank: taken from
    assert stalls.stalled_s("q", 0, 11.0, 140.0) == 0  # empty
    assert stalls.stalled_s("q", 3, 11.0, 141.0) == 1  # waiting again: since it was last seen empty
    assert stalls.stalled_s("q", 3, 11.0, 150.0) == 10


def test_each_queue_has_its_own_clock() -> None:
    stalls = QueueStalls()
    stalls.stalled_s("a", 1, 0.0, 100.0)
    stalls.stalled_s("b", 1, 5.0, 100.0)
    assert stalls.stalled_s("a", 1, 0.0, 110.0) == 10
    assert stalls.stalled_s("b", 0, 5.0, 110.0) == 0
