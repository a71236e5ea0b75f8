"""Claim runs (worker/follow.py): a worker that took a shared trigger claims its queue's new
events itself while they keep coming, so steady publishing costs a trigger per run, not one
per send. The run's rules on their own (no Redis), the mark in a real Redis, and a real
``celery worker`` delivering events published one by one."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import pytest
import redis

from cgrid.event import Event
from cgrid.ledger import Ledger
from cgrid.routing import DELIVER_QUEUE
from cgrid.settings import Settings
from ops.mock_dsp import MockDspServer
from producer import Publisher
from tests.helpers import WorkerProcess, fleet_env, wait_for
from worker.follow import ClaimRuns


class Steps:
    """A claim step that records what it was asked (``again``) and answers as told."""

    def __init__(self, claimed: int = 1, waiting: int = 0) -> None:
        self.claimed, self.waiting = claimed, waiting
        self.agains: list[bool] = []
        self.released: list[tuple[str, int]] = []
        self.done = threading.Event()

    def step(self, queue: str, partition: int, take: int, sent_at_s: float, again: bool) -> tuple[int, int, bool]:
        self.agains.append(again)
        if not again:
            self.done.set()
        return self.claimed, self.waiting, False

    def release(self, queue: str, partition: int) -> None:
        self.released.append((queue, partition))
        self.done.set()


def runs_with(steps: Steps, run_ms: float, room: int = 500) -> ClaimRuns:
    return ClaimRuns(run_ms=run_ms, linger_ms=10, batch_size=500, reserve_now=lambda n: min(n, room),
                     step=steps.step, release=steps.release)


@pytest.mark.parametrize(("claimed", "run_ms", "claims_at_least", "claims_at_most"), [
    (3, 150, 5, 20),  # events keep coming: every 10 ms until its 150 ms are up
    (0, 60_000, 2, 20),  # nothing comes: it ends after 50 ms of nothing
])
def test_a_run_claims_every_linger_until_its_time_is_up_or_nothing_comes_then_lets_the_mark_go(
        claimed: int, run_ms: float, claims_at_least: int, claims_at_most: int) -> None:
    steps = Steps(claimed=claimed)
    runs = runs_with(steps, run_ms=run_ms)
    runs.start("q", 0, 1.0)
    assert steps.done.wait(5)
    time.sleep(0.05)
    assert steps.agains[-1] is False and all(steps.agains[:-1]), steps.agains  # (a busy machine: a few more)
    assert claims_at_least <= len(steps.agains) <= claims_at_most, steps.agains
    assert runs.running() == [] and steps.released == []


def test_a_run_ends_when_its_claim_leaves_ids_for_the_trigger_sent_on() -> None:
    steps = Steps(claimed=500, waiting=200)
    runs = runs_with(steps, run_ms=60_000)
    runs.start("q", 0, 1.0)
    wait_for(lambda: steps.agains and runs.running() == [], 5, "the run ended")
    assert steps.agains == [True]


def test_a_run_with_no_room_in_the_engine_lets_the_queue_go_at_once() -> None:
    steps = Steps()
    runs = runs_with(steps, run_ms=60_000, room=0)
    runs.start("q", 3, 1.0)
    assert steps.done.wait(5)
    assert steps.released == [("q", 3)] and steps.agains == []
    wait_for(lambda: runs.running() == [], 5, "the run ended")


def test_a_warm_shutdown_ends_the_runs_and_lets_their_marks_go_at_once() -> None:
    steps = Steps(claimed=2)
    runs = runs_with(steps, run_ms=60_000)
    runs.start("q", 0, 1.0)
    runs.start("r", 1, 1.0)
    wait_for(lambda: len(steps.agains) >= 4, 5, "the runs claim")
    runs.stop()
    assert sorted(steps.released) == [("q", 0), ("r", 1)] and runs.running() == []
    claims = len(steps.agains)
    time.sleep(0.1)
    assert len(steps.agains) == claims  # no claim after the stop
    runs.start("s", 0, 1.0)  # a trigger's claim that ends after the stop: its mark goes too
    assert steps.released[-1] == ("s", 0) and runs.running() == [] and not runs.ready()


def test_no_run_starts_while_the_thread_is_stuck_in_a_claim() -> None:
    """A claim that hangs (a partition of a cluster slow to answer) must not hold back other
    queues: a trigger then claims without a run, as before runs."""
    unblock = threading.Event()
    steps = Steps(claimed=1)

    def slow_step(queue: str, partition: int, take: int, sent_at_s: float, again: bool) -> tuple[int, int, bool]:
        unblock.wait(5)
        return steps.step(queue, partition, take, sent_at_s, again)

    runs = ClaimRuns(run_ms=60_000, linger_ms=10, batch_size=500, reserve_now=lambda n: n, step=slow_step,
                     release=steps.release)
    assert runs.ready()
    runs.start("q", 0, 1.0)
    wait_for(lambda: not runs.ready(), 5, "the stuck claim seen")
    unblock.set()
    wait_for(runs.ready, 5, "the thread free again")
    runs.stop()


def event(run: str, n: int, dsp: MockDspServer) -> Event:
    return Event.from_dict({"id": f"run-{run}-{n}", "kind": "burl", "upstream": "s2s", "url": f"{dsp.url}/?e={n}"})


def test_a_claim_that_goes_on_keeps_the_mark_and_accepts_send_no_trigger(redis_url: str,
                                                                          dsp: MockDspServer) -> None:
    client = redis.Redis.from_url(redis_url)
    client.flushall()
    ledger = Ledger(client)
    run = uuid.uuid4().hex[:6]

    def accept(n: int) -> bool:
        trigger: list[bool] = []
        ledger.accept([event(run, n, dsp)], ledger_ttl_s=600, report_ttl_s=600, redeliver_after_s=30,
                      shared_queue=DELIVER_QUEUE, trigger=trigger)
        return trigger[-1]

    assert accept(1) is True  # no trigger on its way: the publisher sends one
    got = ledger.claim_shared(DELIVER_QUEUE, 0, 100, lease_s=60, sent_at_s=time.time(), token="a" * 32, again=True)
    assert [i for i, _ in got] == [f"run-{run}-1"]
    mark = client.get(f"cgrid:trigger:{DELIVER_QUEUE}")
    assert mark is not None
    # A run's claim that finds nothing writes nothing (its mark is set again only past half its hold).
    assert ledger.claim_shared(DELIVER_QUEUE, 0, 100, lease_s=60, sent_at_s=time.time(), token="c" * 32,
                               again=True) == []
    assert client.get(f"cgrid:trigger:{DELIVER_QUEUE}") == mark
    assert accept(2) is False  # the run claims it: no trigger
    got = ledger.claim_shared(DELIVER_QUEUE, 0, 100, lease_s=60, sent_at_s=time.time(), token="b" * 32)
    assert [i for i, _ in got] == [f"run-{run}-2"]
    assert accept(3) is True  # the run's last claim let the mark go


@pytest.mark.integration
@pytest.mark.parametrize(("run_ms", "triggers_at_most"), [("2000", 3), ("0", None)])
def test_events_published_one_by_one_ride_on_a_few_triggers(
        redis_url: str, dsp: MockDspServer, tmp_path: Path, run_ms: str, triggers_at_most: int | None) -> None:
    """Forty events, one every 25 ms, to a real worker: with a 2 s run they ride on one trigger
    (three on a slow machine); with runs off, on a trigger each, or nearly (the counter-check).
    Each is called once."""
    env = fleet_env(redis_url, CGRID_CLAIM_RUN_MS=run_ms)
    client = redis.Redis.from_url(redis_url)
    ledger = Ledger(client)
    run = uuid.uuid4().hex[:6]
    worker = WorkerProcess(env, tmp_path / "worker.log", pool="solo", name=f"runs-{run}").start()
    ids = []
    try:
        lpush0 = int(client.info("commandstats").get("cmdstat_lpush", {}).get("calls", 0))
        with Publisher(Settings.from_env(env), linger_ms=0) as publisher:
            for n in range(40):
                ids.append(f"run-{run}-{n}")
                publisher.publish({"id": ids[-1], "kind": "burl", "upstream": "s2s", "url": f"{dsp.url}/?e={ids[-1]}"})
                publisher.flush()
                time.sleep(0.025)
        wait_for(lambda: all((ledger.record(i) or {}).get("state") == "delivered" for i in ids), 40,
                 "every event delivered")
        triggers = int(client.info("commandstats").get("cmdstat_lpush", {}).get("calls", 0)) - lpush0
        for event_id in ids:
            assert sum(1 for c in dsp.log.snapshot() if c["target"].endswith(f"e={event_id}")) == 1, event_id
        if triggers_at_most is not None:
            assert 1 <= triggers <= triggers_at_most, triggers
        else:
            assert triggers >= 20, triggers
        assert "claim_run_failed" not in worker.log_text()
    finally:
        worker.stop()
    assert client.llen(f"cgrid:pending:{DELIVER_QUEUE}") == 0
    wait_for(lambda: not client.exists(f"cgrid:trigger:{DELIVER_QUEUE}"), 5, "the run's mark let go")
