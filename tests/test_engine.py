"""The per-process engine against a real Redis and a real buyer on loopback, without
Celery: claimed attempts are called, a full lane parks in Redis and pulls back in order,
and a bug in the loop does not leak the process's room."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis

from cgrid.event import parse_event
from cgrid.ledger import Ledger
from cgrid.settings import Settings
from delivery.engine import DeliveryEngine
from ops.mock_dsp import MockDspServer
from tests.helpers import fleet_env, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture()
def engine(redis_url: str) -> Iterator[DeliveryEngine]:
    settings = Settings.from_env(fleet_env(redis_url, CGRID_BUYER_MAX_CONCURRENCY=2, CGRID_LANE_WAIT_MS=100,
                                           CGRID_TIMEOUT_S=1))
    yield DeliveryEngine(settings, Ledger(redis.Redis.from_url(redis_url)))


def accept_and_claim(engine: DeliveryEngine, events: list[dict[str, Any]]) -> list[str]:
    ledger, settings = engine.ledger, engine.settings
    parsed = [parse_event(e) for e in events]
    ledger.accept(parsed, ledger_ttl_s=3600, report_ttl_s=3600, redeliver_after_s=60)
    ids = [e.id for e in parsed]
    engine.reserve(len(ids))
    parked_buyers: list[str] = []
    claimed = ledger.claim(ids, 1, lease_s=settings.attempt_lease_s, sent_at_s=0, parked_buyers=parked_buyers)
    engine.submit(claimed, 1, reserved=len(ids), parked_buyers=parked_buyers)
    return ids


def test_a_full_lane_parks_in_redis_and_its_events_come_back_in_creation_order(
    engine: DeliveryEngine, dsp: MockDspServer
) -> None:
    ledger = engine.ledger
    slow = [{"id": f"slow-{i}", "kind": "burl", "upstream": "s2s", "buyer": "slow", "created_at": 1_800_000_000 + i,
             "url": f"{dsp.url}/sleep/400?e=slow-{i}"} for i in range(8)]
    ids = accept_and_claim(engine, slow[::-1])  # claimed newest first
    # Two calls in flight (the lane's cap), two waiting at most 100 ms, the rest parked.
    parked = wait_for(lambda: [i for i in ids if (ledger.record(i) or {}).get("waiting", {}).get("reason")
                               == "lane_full"], 5, "parked events")
    assert parked and all(not ledger.record(i)["attempts"] for i in parked)  # type: ignore[index]
    assert wait_for(lambda: all(ledger.record(i)["state"] == "delivered" for i in ids), 20,  # type: ignore[index]
                    "every event delivered")
    assert engine.drain(5)
    calls = [c["target"].split("e=")[1] for c in dsp.log.snapshot()]
    assert sorted(calls) == sorted(ids)  # each called once
    # Keep-alive: at most two calls at a time, so the multi handle's connections are reused.
    assert len({c["client_port"] for c in dsp.log.snapshot()}) <= 2
    # Parked ones were started oldest first (two at a time, so the buyer may log a pair in
    # either order: the ledger's start times tell).
    started = sorted(parked, key=lambda i: ledger.record(i)["attempts"][0]["started_at"])  # type: ignore[index]
    assert started == sorted(parked, key=lambda i: int(i.split("-")[1]))


def test_a_bug_in_the_loop_does_not_leak_the_process_room(
    engine: DeliveryEngine, dsp: MockDspServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any, **kwargs: Any) -> bool:
        raise RuntimeError("a bug")

    monkeypatch.setattr(engine.lanes, "admit", broken)
    event = {"id": "bug-1", "kind": "burl", "upstream": "s2s", "url": f"{dsp.url}/?e=bug-1"}
    accept_and_claim(engine, [event])
    assert engine.drain(2)  # the room was given back
    record = engine.ledger.record("bug-1")
    assert record is not None and record["in_flight_attempt"] == 1  # left to its lease
    assert dsp.log.snapshot() == []


def test_the_final_record_the_engine_writes_drops_the_users_data(engine: DeliveryEngine, dsp: MockDspServer) -> None:
    user = {"user_agent": "Mozilla/5.0 (secret)", "forwarded_for": ["77.16.215.3"], "upstream": "u2s"}
    ids = accept_and_claim(engine, [{**user, "id": "fin-ok", "kind": "burl", "url": f"{dsp.url}/status/204?e=ok"}])
    ledger = engine.ledger
    wait_for(lambda: (ledger.record(ids[0]) or {}).get("state") == "delivered", 10, "delivered")
    final = ledger.record(ids[0])["event"]  # type: ignore[index]
    assert "user_agent" not in final and "forwarded_for" not in final and "url" not in final
    assert final["host"] == dsp.url.split("//")[1]


def test_events_parked_by_a_worker_that_is_gone_are_pulled_first(engine: DeliveryEngine, dsp: MockDspServer) -> None:
    from cgrid.ledger import Park

    ledger, settings = engine.ledger, engine.settings
    old = [parse_event({"id": f"orph-{i}", "kind": "burl", "upstream": "s2s", "buyer": "orph",
                        "created_at": 1_800_000_000 + i, "url": f"{dsp.url}/?e=orph-{i}"}) for i in range(3)]
    ledger.accept(old, ledger_ttl_s=3600, report_ttl_s=3600, redeliver_after_s=600)
    ledger.claim([e.id for e in old], 1, lease_s=600, sent_at_s=0)
    ledger.park([Park(e.id, 1, e.created_at_s, "orph") for e in old])  # by a process that then died
    new = {"id": "orph-new", "kind": "burl", "upstream": "s2s", "buyer": "orph", "created_at": 1_800_000_100,
           "url": f"{dsp.url}/?e=orph-new"}
    accept_and_claim(engine, [new])
    ids = [e.id for e in old] + ["orph-new"]
    wait_for(lambda: all((ledger.record(i) or {}).get("state") == "delivered" for i in ids), 10,
             "the orphaned parked events pulled, not left to the sweeper's revive")
    started = sorted(ids, key=lambda i: ledger.record(i)["attempts"][0]["started_at"])  # type: ignore[index]
    assert started[-1] == "orph-new"  # the new event waited behind the older ones
    assert settings.park_revive_s >= 10  # so it was not the sweeper (none runs here anyway)


@pytest.mark.parametrize(("answer", "then", "error"), [
    (b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n", "stall", "timeout"),
    (b"HTTP/1.1 100 Continue\r\n\r\n", "reset", "connection_reset"),
])
def test_an_interim_answer_then_a_timeout_or_reset_is_a_failed_attempt(
        engine: DeliveryEngine, answer: bytes, then: str, error: str) -> None:
    """A buyer (or a CDN in front of it) that sends 103 Early Hints and stalls, or 100
    Continue and resets, has not answered: the attempt fails and its retry is scheduled."""
    from tests.test_http_client import raw_answer

    server, done = raw_answer(answer, then)
    try:
        event = {"id": "interim-1", "kind": "burl", "upstream": "s2s",
                 "url": f"http://127.0.0.1:{server.getsockname()[1]}/b"}
        accept_and_claim(engine, [event])
        record = wait_for(lambda: (r := engine.ledger.record("interim-1")) and r["attempts"] and r, 10,
                          "the attempt to be written")
    finally:
        done.set()
        server.close()
    assert record["state"] == "retry_scheduled", record
    assert record["attempts"][0]["status"] is None and record["attempts"][0]["error"] == error
    assert engine.drain(5)


def test_idle_lanes_are_forgotten(engine: DeliveryEngine, dsp: MockDspServer) -> None:
    """A lane per buyer id ever seen would grow without end (40,000 buyer ids took a worker
    from 72 to 134 MB): once idle, a lane goes."""
    engine.lane_idle_s = 0.5
    events = [{"id": f"idle-{i}", "kind": "burl", "upstream": "s2s", "buyer": f"idle-buyer-{i}",
               "url": f"{dsp.url}/?e=idle-{i}"} for i in range(60)]
    ids = accept_and_claim(engine, events)
    wait_for(lambda: all(engine.ledger.record(i)["state"] == "delivered" for i in ids), 20,  # type: ignore[index]
             "every event delivered")
    wait_for(lambda: not any(b.startswith("idle-buyer-") for b in list(engine.lanes.lanes)), 10,
             "the idle lanes to go")
    assert engine.drain(5)


def test_outcomes_ending_close_together_are_written_by_one_finish_script(
    engine: DeliveryEngine, dsp: MockDspServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import delivery.engine as engine_module

    monkeypatch.setattr(engine_module, "RECORD_LINGER_S", 1.0)  # wide enough for a loaded machine
    writes: list[int] = []
    finish = engine.ledger.finish

    def counted(results: Any, *args: Any, **kwargs: Any) -> list[str]:
        writes.append(len(results))
        return finish(results, *args, **kwargs)

    monkeypatch.setattr(engine.ledger, "finish", counted)
    # Ending 0.1 s apart (a lane each): without the linger, written as they end.
    events = [{"id": f"together-{i}", "kind": "burl", "upstream": "s2s", "buyer": f"b{i}",
               "url": f"{dsp.url}/sleep/{100 * i}?e=together-{i}"} for i in range(6)]
    ids = accept_and_claim(engine, events)
    assert wait_for(lambda: all(engine.ledger.record(i)["state"] == "delivered" for i in ids),  # type: ignore[index]
                    10, "every event delivered")
    assert writes == [6]


def test_a_warm_shutdown_writes_waiting_outcomes_at_once(
    engine: DeliveryEngine, dsp: MockDspServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    import delivery.engine as engine_module

    monkeypatch.setattr(engine_module, "RECORD_LINGER_S", 60.0)
    ids = accept_and_claim(engine, [{"id": "drained-1", "kind": "burl", "upstream": "s2s",
                                     "url": f"{dsp.url}/?e=drained-1"}])
    wait_for(lambda: dsp.log.snapshot(), 5, "the call")
    started = time.monotonic()
    assert engine.drain(30)
    assert time.monotonic() - started < 10  # not the linger's 60 s
    assert engine.ledger.record(ids[0])["state"] == "delivered"  # type: ignore[index]


def test_reserve_up_to_takes_the_room_there_is_and_lets_go_before_it_waits(engine: DeliveryEngine) -> None:
    """A shared trigger's claim takes as many as the engine has room for; with none, it
    calls ``before_waiting`` (which lets the trigger go to another worker) and waits."""
    import threading

    let_go: list[int] = []
    capacity = engine.capacity
    engine.reserve(capacity - 3)
    assert engine.reserve_up_to(10, before_waiting=lambda: let_go.append(1)) == 3 and not let_go
    got: list[int] = []
    waiter = threading.Thread(target=lambda: got.append(engine.reserve_up_to(10, lambda: let_go.append(1))))
    waiter.start()
    wait_for(lambda: let_go == [1], 5, "before_waiting to be called")
    assert not got  # waiting for room
    engine.submit([], 1, reserved=5)  # room for 5 comes back
    waiter.join(5)
    assert got == [5]
    engine.submit([], 1, reserved=capacity)
