"""The ledger with replicas to wait for (CGRID_REDIS_WAIT_REPLICAS, Sentinel), against real
redis-server processes: outcomes and parks count as written only once a replica holds them,
are written again on a new primary, and a claim short of replicas goes ahead only on a
primary the sentinels vouch for. (tests/test_sentinel.py runs the same through failovers.)"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from cgrid.event import parse_event
from cgrid.ledger import Finish, Ledger, NotReplicated, Outcome, Park
from cgrid.redis_server import RedisServer
from cgrid.routing import Routing
from tests.helpers import wait_for

pytestmark = pytest.mark.integration

TTL = dict(ledger_ttl_s=3600, report_ttl_s=3600)
SWEEP = dict(limit=100, redeliver_after_s=30, retry_delay_s=60, report_ttl_s=3600, routing=Routing("q", "q.retry"))


@pytest.fixture()
def primary(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "primary").start()
    yield server
    server.stop()


@pytest.fixture()
def replica(tmp_path: Path, primary: RedisServer) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "replica", extra_args=["--replicaof", "127.0.0.1", str(primary.port)]).start()
    client = redis.Redis.from_url(server.url)
    wait_for(lambda: client.info("replication").get("master_link_status") == "up", 20, "the replica to sync")
    yield server
    server.stop()


def client_of(server: RedisServer) -> redis.Redis:
    return redis.Redis.from_url(server.url)


def run_id(server: RedisServer) -> str:
    return str(client_of(server).info("server")["run_id"])


def event(event_id: str):  # type: ignore[no-untyped-def]
    return parse_event({"id": event_id, "kind": "burl", "url": "https://d.example/", "upstream": "s2s",
                        "buyer": "b1"})


def ok(event_id: str, n: int = 1) -> Finish:
    return Finish(event_id, Outcome.OK, json.dumps({"n": n, "started_at": time.time(), "ms": 1.0, "status": 204}))


def claimed(server: RedisServer, *ids: str) -> str:
    """Accept and claim attempt 1 of ``ids`` (no waiting); returns the claim's stamp."""
    plain = Ledger(client_of(server))
    plain.accept([event(i) for i in ids], redeliver_after_s=30, **TTL)
    stamp: list[str] = []
    plain.claim(list(ids), 1, lease_s=60, sent_at_s=0, stamp=stamp)
    return stamp[0]


def test_an_outcome_no_replica_holds_is_written_and_kept(primary: RedisServer) -> None:
    claimed(primary, "a", "b")
    ledger = Ledger(client_of(primary), wait_replicas=1, wait_timeout_ms=100)
    with pytest.raises(NotReplicated) as short:
        ledger.finish([ok("a")], 1, retry_delay_s=10, **TTL)
    assert short.value.result == ["delivered"] and short.value.node == run_id(primary)
    assert (ledger.record("a") or {})["state"] == "delivered"  # written on the primary all the same
    assert ledger.replica_shortfalls == 1
    started = time.monotonic()
    with pytest.raises(NotReplicated):  # within the backoff: not waited for, kept as well
        ledger.park([Park("b", 1, time.time(), "b1")])
    assert time.monotonic() - started < 0.09
    assert (ledger.record("b") or {})["waiting"]["reason"] == "lane_full"


def test_a_replica_holding_them_lets_outcomes_and_kept_ones_go(primary: RedisServer, replica: RedisServer) -> None:
    claimed(primary, "a", "b")
    ledger = Ledger(client_of(primary), wait_replicas=1, wait_timeout_ms=2000)
    assert ledger.finish([ok("a")], 1, retry_delay_s=10, **TTL) == ["delivered"]
    # One written here earlier and kept: nothing to write again, and WAIT says it is held.
    plain = Ledger(client_of(primary))
    plain.finish([ok("b")], 1, retry_delay_s=10, **TTL)
    found = ledger.confirm([(1, ok("b"), run_id(primary))], retry_delay_s=10, **TTL)
    assert (found.held, found.rewritten, found.node) == (True, 0, run_id(primary))
    assert (Ledger(client_of(replica)).record("b") or {})["state"] == "delivered"


def test_a_new_primary_gets_what_it_lacks_and_a_late_success_cancels_the_retry(primary: RedisServer) -> None:
    """Kept outcomes taken by another node (the old primary) are written again on the node
    answering now. One whose attempt is still claimed there is simply written; one whose
    attempt the sweeper has meanwhile counted lost (its retry scheduled) is a late success:
    delivered, and no retry. A kept park takes back the claim it was made for."""
    stamp = claimed(primary, "still-claimed", "to-park")
    lost_stamp = claimed(primary, "counted-lost")
    plain = Ledger(client_of(primary))
    client_of(primary).hset("cgrid:ev:counted-lost", "claimed_at", "0")
    plain.client.zadd("cgrid:leases", {lost_stamp: 0})
    plain.sweep(**SWEEP)  # its claim's lease has passed: lost, retry scheduled
    assert (plain.record("counted-lost") or {})["state"] == "retry_scheduled"
    ledger = Ledger(client_of(primary), wait_replicas=1, wait_timeout_ms=100)
    kept = [(1, Park("to-park", 1, time.time(), "b1", claim_stamp=stamp), "old-primary"),
            (1, ok("still-claimed"), "old-primary"), (1, ok("counted-lost"), "old-primary")]
    found = ledger.confirm(kept, retry_delay_s=10, **TTL)
    assert (found.held, found.rewritten, found.node) == (False, 3, run_id(primary))  # no replica here
    assert (plain.record("still-claimed") or {})["state"] == "delivered"
    record = plain.record("counted-lost") or {}
    assert record["state"] == "delivered" and plain.claim(["counted-lost"], 2, lease_s=10, sent_at_s=0) == []
    assert (plain.record("to-park") or {})["waiting"]["reason"] == "lane_full"
    # Written here now: the next round writes nothing again.
    again = [(n, kept_one, found.node) for n, kept_one, _ in kept]
    assert ledger.confirm(again, retry_delay_s=10, **TTL).rewritten == 0


def test_a_claim_short_of_replicas_goes_ahead_only_on_a_primary_the_sentinels_vouch_for(
    primary: RedisServer,
) -> None:
    plain = Ledger(client_of(primary))
    plain.accept([event(i) for i in ("vouched", "replaced", "failover")], redeliver_after_s=30, **TTL)
    said = {"run_id": run_id(primary), "failover": False}
    ledger = Ledger(client_of(primary), wait_replicas=1, wait_timeout_ms=100,
                    primary_check=lambda: (str(said["run_id"]), bool(said["failover"])))
    # A primary running alone, the one the sentinels name: the call is made.
    assert [i for i, _ in ledger.claim(["vouched"], 1, lease_s=10, sent_at_s=0)] == ["vouched"]
    # The sentinels name another node (this one was replaced and is still writable): refused,
    # the claims come back with the error for the caller to hand back.
    said["run_id"] = "the-new-primary"
    time.sleep(0.6)  # what the sentinels said is kept half a second
    stamp: list[str] = []
    with pytest.raises(NotReplicated) as refused:
        ledger.claim(["replaced"], 1, lease_s=10, sent_at_s=0, stamp=stamp)
    assert [i for i, _ in refused.value.result] == ["replaced"] and stamp
    said.update(run_id=run_id(primary), failover=True)  # a failover under way
    time.sleep(0.6)
    with pytest.raises(NotReplicated):
        ledger.claim(["failover"], 1, lease_s=10, sent_at_s=0)
    assert ledger.claims_refused == 2


def test_a_claim_goes_by_what_the_sentinels_say_after_it_ran_not_by_an_earlier_word(
    primary: RedisServer, replica: RedisServer
) -> None:
    """What the sentinels said is kept half a second, but a claim's call may not go by a word
    from before the claim: a replica promoted meanwhile lacks the claim (a planned failover
    made an event's successful call twice: claimed on the replaced primary, and again on the
    new one). Here the sentinels change their word right after a claim asked them, and the
    very next claim hears it — with no replica acknowledging (the primary running alone) and
    with one (a second replica still attached to a primary being replaced)."""
    plain = Ledger(client_of(primary))
    plain.accept([event(i) for i in ("alone-1", "alone-2", "acked-1", "acked-2")], redeliver_after_s=30, **TTL)
    said = {"run_id": run_id(primary), "failover": False}
    asked = []

    def primary_check() -> tuple[str, bool]:
        asked.append(time.monotonic())
        return str(said["run_id"]), bool(said["failover"])

    # No replica acknowledges (it waits for two, and there is one): vouched, the call is made.
    alone = Ledger(client_of(primary), wait_replicas=2, wait_timeout_ms=100, primary_check=primary_check)
    assert [i for i, _ in alone.claim(["alone-1"], 1, lease_s=10, sent_at_s=0)] == ["alone-1"]
    said["run_id"] = "the-new-primary"  # at once: no half second passes
    with pytest.raises(NotReplicated):
        alone.claim(["alone-2"], 1, lease_s=10, sent_at_s=0)
    assert alone.claims_refused == 1
    # The replica acknowledges the claim, but the sentinels now see a failover.
    said.update(run_id=run_id(primary), failover=False)
    acked = Ledger(client_of(primary), wait_replicas=1, wait_timeout_ms=2000, primary_check=primary_check)
    assert [i for i, _ in acked.claim(["acked-1"], 1, lease_s=10, sent_at_s=0)] == ["acked-1"]
    said["failover"] = True
    with pytest.raises(NotReplicated):
        acked.claim(["acked-2"], 1, lease_s=10, sent_at_s=0)
    # Outcomes may go by the kept word (they are kept until a replica holds them anyway).
    before = len(asked)
    for _ in range(3):
        with pytest.raises(NotReplicated):
            acked.finish([ok("acked-1")], 1, retry_delay_s=10, **TTL)
    assert len(asked) - before <= 1


def test_a_replica_acknowledging_does_not_count_while_the_sentinels_see_a_failover(
    primary: RedisServer, replica: RedisServer
) -> None:
    """A second replica may still be attached to a primary being replaced: its WAIT succeeds
    for writes the new primary will not have."""
    plain = Ledger(client_of(primary))
    plain.accept([event("a"), event("b")], redeliver_after_s=30, **TTL)
    said = {"failover": False}
    ledger = Ledger(client_of(primary), wait_replicas=1, wait_timeout_ms=2000,
                    primary_check=lambda: (run_id(primary), said["failover"]))
    assert [i for i, _ in ledger.claim(["a"], 1, lease_s=10, sent_at_s=0)] == ["a"]
    said["failover"] = True
    time.sleep(0.6)
    with pytest.raises(NotReplicated):
        ledger.claim(["b"], 1, lease_s=10, sent_at_s=0)
    with pytest.raises(NotReplicated):
        ledger.finish([ok("a")], 1, retry_delay_s=10, **TTL)
