"""The ledger scripts against a real Redis: the atomic one-retry guard and the sweeper."""

from __future__ import annotations

import json
import time

import pytest
import redis

from cgrid.event import parse_event
from cgrid.ledger import Finish, Ledger, NotReplicated, Outcome, Park, WaitReason
from cgrid.ledger.ledger import SHARED_TRIGGER_HOLD_MS
from cgrid.routing import Routing

TTL = dict(ledger_ttl_s=3600, report_ttl_s=3600)
Q = Routing("q", "q.retry")


@pytest.fixture()
def ledger(redis_url: str) -> Ledger:
    return Ledger(redis.Redis.from_url(redis_url))


def event(event_id: str, buyer: str = "b1"):  # type: ignore[no-untyped-def]
    return parse_event({"id": event_id, "kind": "burl", "url": "https://d.example/", "upstream": "s2s",
                        "buyer": buyer})


def attempt(n: int, status: int | None = 204, error: str | None = None) -> str:
    return json.dumps({"n": n, "started_at": time.time(), "ms": 1.0, "status": status, "error": error})


def finish(ledger: Ledger, event_id: str, n: int, outcome: Outcome, delay_s: float = 0.0, token: str = "") -> str:
    """``token``: the claim's (a shared claim's first attempts are known by it alone)."""
    return ledger.finish([Finish(event_id, outcome, attempt(n), claim_token=token)], n, retry_delay_s=delay_s,
                         **TTL)[0]


def test_accept_is_idempotent_by_id(ledger: Ledger) -> None:
    now_s, flags = ledger.accept([event("a"), event("b"), event("a")], redeliver_after_s=30, **TTL)
    assert flags == [True, True, False] and abs(now_s - time.time()) < 5  # the ledger's clock
    assert ledger.accept([event("a")], redeliver_after_s=30, **TTL)[1] == [False]
    assert ledger.record("a")["state"] == "pending"  # type: ignore[index]
    assert ledger.report()[0]["events"] == 2


def test_attempt_one_can_be_claimed_once(ledger: Ledger) -> None:
    ledger.accept([event("a")], redeliver_after_s=30, **TTL)
    assert [i for i, _ in ledger.claim(["a"], 1, lease_s=10, sent_at_s=0)] == ["a"]
    assert ledger.claim(["a"], 1, lease_s=10, sent_at_s=0) == []  # duplicate message
    assert finish(ledger, "a", 1, Outcome.OK) == "delivered"
    assert ledger.claim(["a"], 1, lease_s=10, sent_at_s=0) == []
    assert ledger.claim(["a"], 2, lease_s=10, sent_at_s=0) == []  # success is never retried
    record = ledger.record("a")
    assert record is not None and record["state"] == "delivered" and len(record["attempts"]) == 1


def test_retry_only_after_a_failure_and_only_once(ledger: Ledger) -> None:
    ledger.accept([event("a")], redeliver_after_s=30, **TTL)
    assert ledger.claim(["a"], 2, lease_s=10, sent_at_s=0) == []  # no retry before attempt 1
    ledger.claim(["a"], 1, lease_s=10, sent_at_s=0)
    assert finish(ledger, "a", 1, Outcome.FAIL, delay_s=0.0) == "retry_scheduled"
    assert len(ledger.claim(["a"], 2, lease_s=10, sent_at_s=0)) == 1
    assert ledger.claim(["a"], 2, lease_s=10, sent_at_s=0) == []
    assert finish(ledger, "a", 2, Outcome.FAIL) == "failed"
    assert ledger.claim(["a"], 2, lease_s=10, sent_at_s=0) == []
    record = ledger.record("a")
    assert record is not None and [a["n"] for a in record["attempts"]] == [1, 2]


def test_retry_not_claimable_before_its_delay(ledger: Ledger) -> None:
    ledger.accept([event("a")], redeliver_after_s=30, **TTL)
    ledger.claim(["a"], 1, lease_s=10, sent_at_s=0)
    finish(ledger, "a", 1, Outcome.FAIL, delay_s=60.0)
    assert ledger.claim(["a"], 2, lease_s=10, sent_at_s=0) == []


def test_sweeper_sends_the_due_retry_once(ledger: Ledger) -> None:
    ledger.accept([event("a")], redeliver_after_s=30, **TTL)
    ledger.claim(["a"], 1, lease_s=10, sent_at_s=0)
    finish(ledger, "a", 1, Outcome.FAIL, delay_s=0.0)
    sweep = dict(limit=100, redeliver_after_s=30, retry_delay_s=0, report_ttl_s=3600, routing=Q)
    assert ledger.sweep(**sweep)[1:] == ({}, {"q.retry": ["a"]})
    assert ledger.sweep(**sweep)[1:] == ({}, {})  # not due again for redeliver_after_s


def test_lost_attempt_counts_as_failed_and_late_success_cancels_the_retry(ledger: Ledger) -> None:
    sweep = dict(limit=100, redeliver_after_s=30, retry_delay_s=60, report_ttl_s=3600, routing=Q)
    ledger.accept([event("a"), event("b")], redeliver_after_s=30, **TTL)
    ledger.claim(["a", "b"], 1, lease_s=0.0, sent_at_s=0)  # the lease is over at once
    ledger.sweep(**sweep)
    for event_id in ("a", "b"):
        record = ledger.record(event_id)
        assert record is not None and record["state"] == "retry_scheduled"
        assert record["attempts"][0]["error"] == "lost"
    # "a"'s worker was only slow: its success still lands, and no retry follows.
    assert finish(ledger, "a", 1, Outcome.OK) == "delivered"
    assert ledger.claim(["a"], 2, lease_s=10, sent_at_s=0) == []
    # "b"'s failure arriving late changes nothing: the sweeper already decided.
    assert finish(ledger, "b", 1, Outcome.FAIL) == ""


def test_a_claim_has_one_lease_which_its_finishes_and_parks_count_down(ledger: Ledger) -> None:
    """No due entry per claimed event: the claim's lease (P leases:shared, P lease:<token>)
    holds its ids and how many attempts are open; the finish and park scripts count it down
    and drop it at 0; what is left of it when its lease passes, the sweeper ends (lost). A
    shared claim writes nothing into the records: the finish and the park name the claim."""
    ledger.accept([event(i) for i in ("l1", "l2", "l3")], redeliver_after_s=30, shared_queue="q", **TTL)
    token = "ef" * 8
    assert len(ledger.claim_shared("q", 0, 3, lease_s=30, sent_at_s=0, token=token)) == 3
    assert ledger.client.zcard("cgrid:due") == 0
    assert ledger.client.hget(f"cgrid:lease:{token}", "open") == b"3"
    assert not ledger.client.hexists("cgrid:ev:l1", "claim") and not ledger.client.hexists("cgrid:ev:l1", "claim_id")
    assert (ledger.record("l1") or {})["waiting"]["reason"] == "in_flight"  # found through the lease
    assert finish(ledger, "l1", 1, Outcome.OK, token="") == ""  # no claim named: not ours
    assert finish(ledger, "l1", 1, Outcome.OK, token=token) == "delivered"
    assert ledger.client.hget(f"cgrid:lease:{token}", "open") == b"2"
    assert [k for k in ledger.client.hkeys("cgrid:ev:l1") if k.startswith(b"claim")] == []
    ledger.park([Park("l2", 1, time.time(), "b1", WaitReason.PAUSED, token)])
    assert ledger.client.hget(f"cgrid:lease:{token}", "open") == b"1"
    assert (ledger.record("l2") or {})["waiting"]["reason"] == "paused"
    assert finish(ledger, "l3", 1, Outcome.FAIL, delay_s=60.0, token=token) == "retry_scheduled"
    assert not ledger.client.exists(f"cgrid:lease:{token}") and ledger.client.zcard("cgrid:leases:shared") == 0
    assert ledger.client.zrange("cgrid:due", 0, -1) == [b"l3"]  # its retry's time
    assert finish(ledger, "l1", 1, Outcome.OK, token=token) == ""  # written again: counts nothing
    assert finish(ledger, "l2", 1, Outcome.OK, token=token) == ""  # parked: not this claim's any more


def test_a_claim_whose_lease_passed_with_attempts_open_has_them_lost(ledger: Ledger) -> None:
    sweep = dict(limit=100, redeliver_after_s=30, retry_delay_s=60, report_ttl_s=3600, routing=Q)
    ledger.accept([event(i) for i in ("m1", "m2")], redeliver_after_s=30, shared_queue="q", **TTL)
    token = "aa" * 8
    assert len(ledger.claim_shared("q", 0, 2, lease_s=0.05, sent_at_s=0, token=token)) == 2
    claimed_at = float(ledger.client.hget(f"cgrid:lease:{token}", "at") or 0)
    finish(ledger, "m1", 1, Outcome.OK, token=token)
    assert ledger.sweep(**sweep)[1:] == ({}, {})  # the lease runs
    assert (ledger.record("m2") or {})["state"] == "pending"
    time.sleep(0.1)
    ledger.sweep(**sweep)
    m1, m2 = ledger.record("m1"), ledger.record("m2")
    assert m1 is not None and m1["state"] == "delivered"
    assert m2 is not None and m2["state"] == "retry_scheduled" and m2["attempts"][0]["error"] == "lost"
    assert m2["attempts"][0]["started_at"] == claimed_at > 0  # when its claim took it
    assert not ledger.client.exists(f"cgrid:lease:{token}") and ledger.client.zcard("cgrid:leases:shared") == 0


def test_a_sweep_ends_passed_leases_a_bounded_number_of_events_at_a_time(ledger: Ledger) -> None:
    """As for the due set, one sweep looks at about `limit` events of passed leases (a claim
    whole), so that a fleet that died with many claims in flight does not make one long
    script; the next sweep takes the rest."""
    sweep = dict(limit=3, redeliver_after_s=30, retry_delay_s=60, report_ttl_s=3600, routing=Q)
    ids = [f"p{i}" for i in range(6)]
    ledger.accept([event(i) for i in ids], redeliver_after_s=30, shared_queue="q", **TTL)
    for _ in range(3):
        assert len(ledger.claim_shared("q", 0, 2, lease_s=0.0, sent_at_s=0)) == 2
    time.sleep(0.01)
    ledger.sweep(**sweep)
    lost = [i for i in ids if (ledger.record(i) or {}).get("state") == "retry_scheduled"]
    assert len(lost) == 4 and ledger.client.zcard("cgrid:leases:shared") == 1
    ledger.sweep(**sweep)
    assert all((ledger.record(i) or {}).get("state") == "retry_scheduled" for i in ids)
    assert ledger.client.zcard("cgrid:leases:shared") == 0


def test_an_event_due_for_its_trigger_and_claimed_under_a_running_lease_is_not_lost(ledger: Ledger) -> None:
    """Ids sent in the trigger: the event is due for the sweeper's look after
    redeliver_after_s, which may come before its claim's lease ends: then it is looked at
    again at the lease's end, not taken for lost; its finish takes it off the due set."""
    sweep = dict(limit=100, redeliver_after_s=0.05, retry_delay_s=60, report_ttl_s=3600, routing=Q)
    ledger.accept([event("n1")], redeliver_after_s=0.05, **TTL)
    token = "bb" * 8
    assert len(ledger.claim(["n1"], 1, lease_s=30, sent_at_s=0, token=token)) == 1
    time.sleep(0.1)
    ledger.sweep(**sweep)
    record = ledger.record("n1")
    assert record is not None and record["state"] == "pending" and record["attempts"] == []
    lease_end = float(ledger.client.zscore("cgrid:leases", token) or 0)
    assert ledger.client.zscore("cgrid:due", "n1") == pytest.approx(lease_end)
    assert finish(ledger, "n1", 1, Outcome.OK) == "delivered"
    assert ledger.client.zcard("cgrid:due") == 0 and ledger.client.zcard("cgrid:leases") == 0


def test_lost_retry_is_final(ledger: Ledger) -> None:
    sweep = dict(limit=100, redeliver_after_s=30, retry_delay_s=0, report_ttl_s=3600, routing=Q)
    ledger.accept([event("a")], redeliver_after_s=30, **TTL)
    ledger.claim(["a"], 1, lease_s=10, sent_at_s=0)
    finish(ledger, "a", 1, Outcome.FAIL, delay_s=0.0)
    ledger.claim(["a"], 2, lease_s=0.0, sent_at_s=0)
    ledger.sweep(**sweep)
    record = ledger.record("a")
    assert record is not None and record["state"] == "failed"
    assert [a.get("error") for a in record["attempts"]] == [None, "lost"]
    assert ledger.report()[0]["failed"] == 1


def test_unsent_trigger_is_resent_when_the_queue_is_empty(ledger: Ledger) -> None:
    ledger.accept([event("a")], redeliver_after_s=0.0, **TTL)
    sweep = dict(limit=100, redeliver_after_s=0.0, retry_delay_s=1, report_ttl_s=3600, routing=Q)
    # The sweeper reads the queues on the broker (CGRID_BROKER_URL) and names the empty ones.
    assert ledger.sweep(**sweep)[1:] == ({}, {})  # queue not empty, watermark not passed: wait
    time.sleep(0.01)
    assert ledger.sweep(**sweep, empty_queues=["q"])[1:] == ({"q": ["a"]}, {})


def test_report_counts_per_buyer_and_day(ledger: Ledger) -> None:
    ledger.accept([event("a", "x"), event("b", "x"), event("c", "y")], redeliver_after_s=30, **TTL)
    ledger.claim(["a", "b", "c"], 1, lease_s=10, sent_at_s=0)
    ledger.finish([Finish("a", Outcome.OK, attempt(1)), Finish("b", Outcome.UNEXPECTED, attempt(1, 201)),
                   Finish("c", Outcome.REJECTED, "", "host: forbidden")], 1, retry_delay_s=1, **TTL)
    rows = {row["buyer"]: row for row in ledger.report()}
    assert rows["x"]["events"] == 2 and rows["x"]["delivered_first"] == 2 and rows["x"]["unexpected"] == 1
    assert rows["y"]["rejected"] == 1
    assert ledger.record("c")["reason"] == "host: forbidden"  # type: ignore[index]


def test_report_counters_of_one_batch_are_summed_per_day_and_buyer(ledger: Ledger) -> None:
    day1, day2 = 1_700_000_000.0, 1_700_000_000.0 + 86_400
    events = [parse_event({"id": f"d{i}", "kind": "nurl", "url": "https://d.example/", "upstream": "s2s",
                           "buyer": "x" if i % 2 else "y", "created_at": day1 if i < 6 else day2})
              for i in range(10)]
    ledger.accept(events, redeliver_after_s=30, **TTL)
    rows = {(row["day"], row["buyer"]): row["events"] for row in ledger.report()}
    assert rows == {("2023-11-14", "x"): 3, ("2023-11-14", "y"): 3, ("2023-11-15", "x"): 2, ("2023-11-15", "y"): 2}
    for day in ("2023-11-14", "2023-11-15"):
        assert 0 < ledger.client.ttl(f"cgrid:report:{day}") <= 3600


def park(ledger: Ledger, event_id: str, n: int, created_at_s: float, buyer: str = "b1") -> bool:
    return ledger.park([Park(event_id, n, created_at_s, buyer)])[0]


def test_a_parked_attempt_is_not_an_attempt_and_comes_back_oldest_first(ledger: Ledger) -> None:
    ledger.accept([event("new"), event("old"), event("mid")], redeliver_after_s=30, **TTL)
    ledger.claim(["new", "old", "mid"], 1, lease_s=10, sent_at_s=0)
    assert park(ledger, "new", 1, 300.0) and park(ledger, "old", 1, 100.0) and park(ledger, "mid", 1, 200.0)
    assert not park(ledger, "old", 1, 100.0)  # no longer claimed: not ours to park
    record = ledger.record("old")
    assert record is not None and record["state"] == "pending" and record["attempts"] == []
    assert record["waiting"]["reason"] == "lane_full" and record["waiting"]["buyer"] == "b1"
    assert "in_flight_attempt" not in record
    # The sweeper leaves parked events alone (they are not due: no lease runs, no trigger).
    assert ledger.sweep(limit=100, redeliver_after_s=0, retry_delay_s=0, report_ttl_s=60, routing=Q)[1:] == ({}, {})
    left, pulled = ledger.pull("b1", 2, lease_s=10)
    assert left == 1 and [(n, i) for n, i, _ in pulled] == [(1, "old"), (1, "mid")]
    assert json.loads(pulled[0][2])["id"] == "old"
    assert ledger.claim(["old"], 1, lease_s=10, sent_at_s=0) == []  # pulled = claimed: once
    assert ledger.record("old")["in_flight_attempt"] == 1  # type: ignore[index]
    assert ledger.pull("b1", 5, lease_s=10)[0] == 0
    assert ledger.pull("b1", 5, lease_s=10) == (0, [])


def test_a_parked_retry_is_pulled_as_the_retry(ledger: Ledger) -> None:
    ledger.accept([event("a")], redeliver_after_s=30, **TTL)
    ledger.claim(["a"], 1, lease_s=10, sent_at_s=0)
    finish(ledger, "a", 1, Outcome.FAIL, delay_s=0.0)
    ledger.claim(["a"], 2, lease_s=10, sent_at_s=0)
    assert park(ledger, "a", 2, 1.0)
    assert ledger.record("a")["state"] == "retry_scheduled"  # type: ignore[index]
    _, [(n, event_id, _)] = ledger.pull("b1", 10, lease_s=10)
    assert (n, event_id) == (2, "a")
    assert finish(ledger, "a", 2, Outcome.FAIL) == "failed"
    record = ledger.record("a")
    assert record is not None and [a["n"] for a in record["attempts"]] == [1, 2] and "waiting" not in record


def test_sweeper_revives_a_parked_set_no_worker_touches(ledger: Ledger) -> None:
    ledger.accept([event("a"), event("b", buyer="b2")], redeliver_after_s=30, **TTL)
    ledger.claim(["a", "b"], 1, lease_s=10, sent_at_s=0)
    park(ledger, "a", 1, 1.0)
    park(ledger, "b", 1, 1.0, buyer="b2")
    args = dict(limit=100, redeliver_after_s=30, retry_delay_s=0, report_ttl_s=60, routing=Q)
    assert ledger.sweep(**args, revive_after_s=60)[1:] == ({}, {})  # touched just now
    time.sleep(1.1)
    _, first, second = ledger.sweep(**args, revive_after_s=1, revive_batch=10)
    assert sorted(first["q"]) == ["a", "b"] and second == {}
    assert ledger.record("a")["waiting"]["reason"] == "queued"  # type: ignore[index]
    assert [i for i, _ in ledger.claim(["a"], 1, lease_s=10, sent_at_s=0)] == ["a"]
    assert ledger.client.zcard("cgrid:idx:parked-activity") == 0


def test_a_paused_buyers_parked_events_expire_past_its_maximum_age(ledger: Ledger) -> None:
    ledger.accept([event("young"), event("old")], redeliver_after_s=30, **TTL)
    ledger.claim(["young", "old"], 1, lease_s=10, sent_at_s=0)
    now = time.time()
    park(ledger, "young", 1, now - 5)
    park(ledger, "old", 1, now - 500)
    args = dict(limit=100, redeliver_after_s=30, retry_delay_s=0, report_ttl_s=60, routing=Q, revive_after_s=0.0)
    assert ledger.sweep(**args, paused={"b1": 100.0})[1:] == ({}, {})  # paused: nothing is revived
    old, young = ledger.record("old"), ledger.record("young")
    assert old is not None and old["state"] == "expired" and "maximum age of 100" in old["reason"]
    assert young is not None and young["state"] == "pending" and young["waiting"]["reason"] == "lane_full"
    assert ledger.report()[0]["expired"] == 1


def test_a_final_record_drops_the_users_data_and_keeps_what_reconciliation_needs(ledger: Ledger) -> None:
    full = {"kind": "burl", "upstream": "u2s", "buyer": "b1", "user_agent": "Mozilla/5.0 (secret)",
            "created_at": 1796000000.5,
            "forwarded_for": ["77.16.215.3"],
            "macros": {"AUCTION_PRICE": 1.25, "AUCTION_ID": "auc-7", "AUCTION_IMP_ID": 2, "AUCTION_BID_ID": "b9"},
            "url": "https://dsp.example:8443/b?p=${AUCTION_PRICE}&a=${AUCTION_ID}&i=${AUCTION_IMP_ID}"}
    ledger.accept([parse_event({**full, "id": "ok"}), parse_event({**full, "id": "bad"})], redeliver_after_s=30,
                  **TTL)
    assert ledger.record("ok")["event"]["user_agent"] == "Mozilla/5.0 (secret)"  # type: ignore[index]
    ledger.claim(["ok", "bad"], 1, lease_s=10, sent_at_s=0)
    finish(ledger, "ok", 1, Outcome.OK)
    finish(ledger, "bad", 1, Outcome.FAIL, delay_s=0.0)
    ledger.claim(["bad"], 2, lease_s=10, sent_at_s=0)
    finish(ledger, "bad", 2, Outcome.FAIL)
    delivered = ledger.record("ok")["event"]  # type: ignore[index]
    assert "user_agent" not in delivered and "forwarded_for" not in delivered
    assert "url" not in delivered and delivered["host"] == "dsp.example:8443"
    # The auction and impression ids stay (not personal data): what a buyer's log is matched on
    # by cgrid-s2s reconcile; the other macros (the price) go.
    assert delivered["macros"] == {"AUCTION_ID": "auc-7", "AUCTION_IMP_ID": 2}
    assert (delivered["id"], delivered["kind"], delivered["buyer"]) == ("ok", "burl", "b1")
    # The worker makes the same final record in Python (Attempt.to_finish), off Redis's CPU.
    assert json.loads(parse_event({**full, "id": "ok"}).to_final_json(keep_call=False)) == delivered
    failed = ledger.record("bad")["event"]  # type: ignore[index]
    assert "user_agent" not in failed and "forwarded_for" not in failed
    assert failed["url"] == full["url"] and failed["macros"] == full["macros"]  # kept for replay
    assert parse_event({k: v for k, v in failed.items() if k != "id"}).macros == full["macros"]  # as replay
    no_ids = parse_event({**full, "id": "plain", "macros": {"AUCTION_PRICE": 1.25}, "url": "https://d.example/"})
    assert "macros" not in json.loads(no_ids.to_final_json(keep_call=False))


def test_the_backlog_counts_events_accepted_and_not_final_per_kind(ledger: Ledger) -> None:
    win = parse_event({"id": "w", "kind": "nurl", "url": "https://d.example/", "upstream": "s2s"})
    ledger.accept([event("b1"), event("b2"), win, event("b1")], redeliver_after_s=30, **TTL)  # b1 twice: once
    assert ledger.open_events() == {"nurl": 1, "burl": 2}
    ledger.claim(["b1", "b2"], 1, lease_s=10, sent_at_s=0)
    finish(ledger, "b1", 1, Outcome.OK)
    finish(ledger, "b2", 1, Outcome.FAIL, delay_s=0.0)  # retry scheduled: still open
    assert ledger.open_events() == {"nurl": 1, "burl": 1}
    ledger.claim(["b2"], 2, lease_s=10, sent_at_s=0)
    finish(ledger, "b2", 2, Outcome.FAIL)
    assert ledger.open_events() == {"nurl": 1, "burl": 0}


def test_a_parked_event_is_claimed_only_by_its_pull_and_a_pull_keeps_the_retry_delay(ledger: Ledger) -> None:
    ledger.accept([event("p"), event("r")], redeliver_after_s=30, **TTL)
    ledger.claim(["p", "r"], 1, lease_s=10, sent_at_s=0)
    park(ledger, "p", 1, 1.0)
    assert ledger.claim(["p"], 1, lease_s=10, sent_at_s=0) == []  # a stray or duplicate trigger
    # A retry parked before it is due stays parked: the pull does not shorten the delay.
    finish(ledger, "r", 1, Outcome.FAIL, delay_s=600)
    ledger.client.hset("cgrid:ev:r", "claim", 2)  # as if attempt 2 had been claimed...
    park(ledger, "r", 2, 2.0)  # ...and parked
    ledger.client.hset("cgrid:ev:r", "retry_at", f"{time.time() + 600:.6f}")
    left, pulled = ledger.pull("b1", 10, lease_s=10)
    assert [(n, i) for n, i, _ in pulled] == [(1, "p")] and left == 1
    assert ledger.record("r")["state"] == "retry_scheduled" and ledger.record("r")["attempts"][0]["n"] == 1  # type: ignore[index]


def test_a_lost_first_attempt_waits_its_buyers_own_retry_delay(ledger: Ledger) -> None:
    sweep = dict(limit=100, redeliver_after_s=30, retry_delay_s=10, report_ttl_s=3600, routing=Q)
    ledger.accept([event("slow", buyer="b-slow"), event("plain", buyer="b-plain")], redeliver_after_s=30, **TTL)
    ledger.claim(["slow", "plain"], 1, lease_s=0.0, sent_at_s=0)  # both leases over at once: lost
    now, _, _ = ledger.sweep(**sweep, retry_delays={"b-slow": 300.0})
    waits = {}
    for event_id in ("slow", "plain"):
        record = ledger.record(event_id)
        assert record is not None and record["state"] == "retry_scheduled"
        waits[event_id] = round(record["retry_at"] - now)
    assert waits == {"slow": 300, "plain": 10}


def test_an_accept_no_replica_holds_is_withdrawn(redis_url: str) -> None:
    """A Redis with no replica: WAIT 1 times out, the accept raises NotReplicated, and the new
    events are taken back (no record, no backlog, no report count) so none is ever called;
    an event the ledger already held is left alone."""
    client = redis.Redis.from_url(redis_url)
    Ledger(client).accept([event("known")], redeliver_after_s=30, **TTL)
    ledger = Ledger(client, wait_replicas=1, wait_timeout_ms=50)
    with pytest.raises(NotReplicated) as refused:
        ledger.accept([event("new-1"), event("known"), event("new-2")], redeliver_after_s=30, **TTL)
    assert refused.value.withdrawn
    assert ledger.record("new-1") is None and ledger.record("new-2") is None
    assert ledger.record("known") is not None
    assert ledger.open_events()["burl"] == 1
    [row] = ledger.report()
    assert row["events"] == 1
    assert client.zscore("cgrid:due", "new-1") is None


def test_claims_short_of_replicas_go_ahead_and_stop_waiting_for_a_while(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    Ledger(client).accept([event("a"), event("b")], redeliver_after_s=30, **TTL)
    ledger = Ledger(client, wait_replicas=1, wait_timeout_ms=300)
    started = time.monotonic()
    assert [i for i, _ in ledger.claim(["a"], 1, lease_s=10, sent_at_s=0)] == ["a"]
    first_s = time.monotonic() - started
    started = time.monotonic()
    assert [i for i, _ in ledger.claim(["b"], 1, lease_s=10, sent_at_s=0)] == ["b"]
    second_s = time.monotonic() - started
    assert ledger.replica_shortfalls == 1
    assert first_s >= 0.25 and second_s < 0.25  # the second claim did not wait out the timeout


def test_a_trigger_stamped_in_the_future_does_not_move_the_watermark_past_now(ledger: Ledger) -> None:
    ledger.accept([event("a")], redeliver_after_s=30, **TTL)
    ledger.claim(["a"], 1, lease_s=10, sent_at_s=1e12, queue="q")
    assert float(ledger.client.get("cgrid:watermark:q") or 0) <= time.time() + 1


def test_a_park_sent_again_after_a_lost_reply_cannot_take_back_a_later_pull(ledger: Ledger) -> None:
    """Process A parks its claim; the reply is lost, and before A sends the park again,
    process B pulls the event (a new claim of the same attempt). A's repeated park must not
    release B's claim (B would call, and the event be pulled and called once more)."""
    ledger.accept([event("a")], redeliver_after_s=30, **TTL)
    stamp_a: list[str] = []
    ledger.claim(["a"], 1, lease_s=10, sent_at_s=0, stamp=stamp_a)
    park_a = Park("a", 1, time.time(), "b1", claim_stamp=stamp_a[0])
    assert ledger.park([park_a]) == [True]  # done, but A never heard so
    time.sleep(0.002)  # (the stamp has microseconds)
    stamp_b: list[str] = []
    _, [(n, event_id, _)] = ledger.pull("b1", 1, lease_s=10, stamp=stamp_b)
    assert (n, event_id) == (1, "a") and stamp_b[0] != stamp_a[0]
    assert ledger.park([park_a]) == [False]  # A again: not its claim any more
    record = ledger.record("a")
    assert record is not None and record["in_flight_attempt"] == 1
    assert ledger.client.zscore("cgrid:parked:b1", "a") is None  # still B's, not parked again
    assert ledger.park([Park("a", 1, time.time(), "b1", claim_stamp=stamp_b[0])]) == [True]  # B's own park


def test_a_late_success_of_a_lost_retry_ends_delivered_and_corrects_report_replay_and_archive(
        ledger: Ledger) -> None:
    """The sweeper gave the retry up for lost (the event ended failed: counted, listed for
    replay, streamed to the archive), then the slow worker's success arrived: the buyer did
    get the notice. The event ends delivered; the failed count, the replay set and the
    archive (a second, correcting line) follow, and nothing can call it a third time."""
    from archive.files import archive_lines, ensure_group, stream_key

    ensure_group(ledger.client)
    sweep = dict(limit=100, redeliver_after_s=30, retry_delay_s=0, report_ttl_s=3600, routing=Q)
    ledger.accept([event("a"), event("b"), event("c")], redeliver_after_s=30, **TTL)
    ledger.claim(["a", "b", "c"], 1, lease_s=10, sent_at_s=0)
    ledger.finish([Finish(i, Outcome.FAIL, attempt(1, 500)) for i in ("a", "b", "c")], 1, retry_delay_s=0, **TTL)
    ledger.claim(["a", "b", "c"], 2, lease_s=0.0, sent_at_s=0)  # the lease is over at once
    ledger.sweep(**sweep)
    day = ledger.record("a")["event"]  # type: ignore[index]
    day = time.strftime("%Y-%m-%d", time.gmtime(day["created_at"]))
    assert ledger.failed_ids(day, "b1") == ["a", "b", "c"] and ledger.report()[0]["failed"] == 3
    assert finish(ledger, "a", 2, Outcome.OK) == "delivered"
    assert ledger.finish([Finish("b", Outcome.UNEXPECTED, attempt(2, 201), duration_ms=3.0)], 2,
                         retry_delay_s=0, **TTL) == ["delivered"]
    assert finish(ledger, "c", 2, Outcome.FAIL) == ""  # a late failure changes nothing
    assert finish(ledger, "a", 2, Outcome.OK) == ""  # nor a success written twice
    record = ledger.record("a")
    assert record is not None and record["state"] == "delivered"
    assert [a["status"] for a in record["attempts"]] == [500, 204]  # the call, not "lost"
    assert "url" not in record["event"] and record["event"]["host"] == "d.example"
    assert "lost" in record["reason"]
    [row] = ledger.report()
    assert (row["failed"], row["delivered_retry"], row["unexpected"], row["calls_timed"]) == (1, 2, 1, 1)
    assert ledger.failed_ids(day, "b1") == ["c"]
    assert ledger.open_events()["burl"] == 0  # final once: not taken off the backlog twice
    assert ledger.claim(["a", "b"], 2, lease_s=10, sent_at_s=0) == []  # no third call
    assert ledger.sweep(**sweep)[1:] == ({}, {})
    records = [json.loads(line) for i, f in ledger.client.xrange(stream_key())
               for _, _, line in archive_lines(i.decode(), f)]
    lines = [(r["id"], r["state"]) for r in records]
    assert lines == [("a", "failed"), ("b", "failed"), ("c", "failed"), ("a", "delivered"), ("b", "delivered")]


TRICKY = {"kind": "burl", "upstream": "u2s", "buyer": "b1", "created_at": 1764000000.123456,
          "user_agent": 'Mozilla "x" \\ ,"forwarded_for":["9.9.9.9"],"macros":{} \u00e9',
          "forwarded_for": ["77.16.215.3", "2001:db8::1"],
          "macros": {"AUCTION_PRICE": 1.2345678901234567, "AUCTION_ID": 123456789012345678901234567,
                     "AUCTION_BID_ID": 'a/b "c" \\ \u00e9 ,"user_agent":"u"', "AUCTION_SEAT_ID": 1e-7},
          "url": "https://dsp.example:8443/b?p=${AUCTION_PRICE}&i=${AUCTION_ID}"}


def test_final_records_made_in_lua_keep_the_macros_byte_for_byte(ledger: Ledger) -> None:
    """cjson writes 14 significant digits (1.2345678901234567 became 1.2345678901235, and a
    replay sent that): the scripts slim a final record without re-encoding what they keep."""
    ids = ["finished", "lost", "paused", "delivered"]
    events = [parse_event({**TRICKY, "id": i}) for i in ids]
    ledger.accept(events, redeliver_after_s=30, **TTL)
    ledger.claim(ids, 1, lease_s=10, sent_at_s=0)
    # failed by finish (the script makes the record), failed by the sweeper (a lost retry),
    # expired by the sweeper (paused buyer), delivered by finish.
    for i in ("finished", "lost"):
        finish(ledger, i, 1, Outcome.FAIL, delay_s=0.0)
    ledger.claim(["finished"], 2, lease_s=10, sent_at_s=0)
    finish(ledger, "finished", 2, Outcome.FAIL)
    ledger.claim(["lost"], 2, lease_s=0.0, sent_at_s=0)
    park(ledger, "paused", 1, time.time() - 500)
    finish(ledger, "delivered", 1, Outcome.OK)
    ledger.sweep(limit=100, redeliver_after_s=30, retry_delay_s=0, report_ttl_s=60, routing=Q,
                 paused={"b1": 100.0})
    macros_text = '"macros":' + json.dumps(TRICKY["macros"], separators=(",", ":"), ensure_ascii=False)
    for event_id, state in zip(ids, ["failed", "failed", "expired", "delivered"], strict=True):
        record = ledger.record(event_id)
        assert record is not None and record["state"] == state, (event_id, record)
        text = ledger.client.hget(f"cgrid:ev:{event_id}", "event").decode()
        final = json.loads(text)
        assert "user_agent" not in final and "forwarded_for" not in final, text
        assert final["created_at"] == TRICKY["created_at"] and final["buyer"] == "b1"
        if state == "delivered":
            # the auction id stays for reconcile, byte for byte; the other macros and the URL go
            assert '"macros":{"AUCTION_ID":123456789012345678901234567}' in text, text
            assert "url" not in final and final["host"] == "dsp.example:8443"
        else:
            assert macros_text in text, text
            assert final["url"] == TRICKY["url"]
            replayed = parse_event({k: v for k, v in final.items() if k != "id"})  # as replay parses it
            assert replayed.macros == TRICKY["macros"]
            assert replayed.target_url().endswith("p=1.2345678901234567&i=123456789012345678901234567")


def test_publishers_share_a_trigger_and_its_claim_takes_what_waits_in_order(ledger: Ledger) -> None:
    """Shared triggers: the first accept of a queue asks for a trigger, the next ones (other
    publishers) add their ids to its pending list and ask for none; the claim takes them in
    order, and the claim that empties the list lets the next accept ask again."""
    asks: list[bool] = []
    ledger.accept([event("s1"), event("s2")], redeliver_after_s=30, shared_queue="q", trigger=asks, **TTL)
    ledger.accept([event("s3")], redeliver_after_s=30, shared_queue="q", trigger=asks, **TTL)
    ledger.accept([event("s3")], redeliver_after_s=30, shared_queue="q", trigger=asks, **TTL)  # known: not added
    ledger.accept([event("o1")], redeliver_after_s=30, shared_queue="other", trigger=asks, **TTL)
    assert asks == [True, False, False, True]
    left: list[int] = []
    claimed = ledger.claim_shared("q", 0, 10, lease_s=10, sent_at_s=0, left=left)
    assert [i for i, _ in claimed] == ["s1", "s2", "s3"] and left == [0]
    assert ledger.claim_shared("q", 0, 10, lease_s=10, sent_at_s=0) == []  # a second trigger: nothing left
    asks.clear()
    ledger.accept([event("s4")], redeliver_after_s=30, shared_queue="q", trigger=asks, **TTL)
    assert asks == [True]
    # By ids, neither: s1 was taken by the shared claim (its record has no claim fields: a
    # trigger with its id must not claim it again), s4 waits in its list.
    assert ledger.claim(["s1", "s4"], 1, lease_s=10, sent_at_s=0) == []
    assert [i for i, _ in ledger.claim_shared("q", 0, 10, lease_s=10, sent_at_s=0)] == ["s4"]


def test_a_shared_claim_takes_a_batch_and_says_how_many_wait(ledger: Ledger) -> None:
    ids = [f"w{i}" for i in range(7)]
    ledger.accept([event(i) for i in ids], redeliver_after_s=30, shared_queue="q", **TTL)
    left: list[int] = []
    first = ledger.claim_shared("q", 0, 3, lease_s=10, sent_at_s=0, left=left)
    second = ledger.claim_shared("q", 0, 3, lease_s=10, sent_at_s=0, left=left)
    asks: list[bool] = []
    ledger.accept([event("w7")], redeliver_after_s=30, shared_queue="q", trigger=asks, **TTL)
    assert asks == [False]  # ids still wait: the claim kept the trigger on its way
    third = ledger.claim_shared("q", 0, 3, lease_s=10, sent_at_s=0, left=left)
    assert [[i for i, _ in c] for c in (first, second, third)] == [ids[0:3], ids[3:6], ["w6", "w7"]]
    assert left == [4, 1, 0]


def test_a_shared_claim_sent_again_takes_the_same_ids(ledger: Ledger) -> None:
    """Its reply lost, the same claim (same token) gets its own events again, not new ones."""
    ledger.accept([event(f"t{i}") for i in range(4)], redeliver_after_s=30, shared_queue="q", **TTL)
    token = "ab" * 8
    once = ledger.claim_shared("q", 0, 2, lease_s=10, sent_at_s=0, token=token)
    again = ledger.claim_shared("q", 0, 2, lease_s=10, sent_at_s=0, token=token)
    assert [i for i, _ in once] == [i for i, _ in again] == ["t0", "t1"]
    assert ledger.client.hget(f"cgrid:lease:{token}", "open") == b"2"  # not counted twice
    assert [i for i, _ in ledger.claim_shared("q", 0, 2, lease_s=10, sent_at_s=0)] == ["t2", "t3"]


def test_a_withdrawn_event_leaves_its_list_and_one_a_shared_claim_took_stays(ledger: Ledger) -> None:
    """An accept no replica held is withdrawn; an event of it a shared claim already took
    off the list (no claim fields say so) is in use: it stays, and is delivered. The others
    leave the list, so the same ids published again are in it once, and claimed once."""
    ledger.accept([event("x1"), event("x2")], redeliver_after_s=30, shared_queue="q", **TTL)
    token = "be" * 8
    assert [i for i, _ in ledger.claim_shared("q", 0, 1, lease_s=10, sent_at_s=0, token=token)] == ["x1"]
    accepted_at = ledger.client.hget("cgrid:ev:x1", "accepted_at").decode()  # type: ignore[union-attr]
    assert not ledger._withdraw_unreplicated([event("x1"), event("x2")], accepted_at, [1, 1], "q")
    assert (ledger.record("x1") or {})["state"] == "pending" and ledger.record("x2") is None
    assert ledger.client.lrange("cgrid:pending:q", 0, -1) == []
    assert ledger.accept([event("x2")], redeliver_after_s=30, shared_queue="q", **TTL)[1] == [True]
    assert [i for i, _ in ledger.claim_shared("q", 0, 10, lease_s=10, sent_at_s=0)] == ["x2"]
    assert ledger.claim_shared("q", 0, 10, lease_s=10, sent_at_s=0) == []
    assert finish(ledger, "x1", 1, Outcome.OK, token=token) == "delivered"


def test_a_park_naming_another_claim_cannot_take_an_event_a_shared_claim_holds(ledger: Ledger) -> None:
    """After a failover the new primary may have given an id to another claim (its call on)
    while the first claim's worker hands the event back there: with no claim fields to
    compare, the park holds only if the claim it names lists the id."""
    ledger.accept([event("y1")], redeliver_after_s=30, shared_queue="q", **TTL)
    holder, other = "d1" * 8, "d2" * 8
    assert [i for i, _ in ledger.claim_shared("q", 0, 1, lease_s=10, sent_at_s=0, token=holder)] == ["y1"]
    assert ledger.park([Park("y1", 1, time.time(), "b1", WaitReason.NO_REPLICA, other)]) == [False]
    assert (ledger.record("y1") or {})["waiting"]["reason"] == "in_flight"
    assert ledger.client.zcard("cgrid:parked:b1") == 0
    assert finish(ledger, "y1", 1, Outcome.OK, token=holder) == "delivered"


def test_an_id_twice_in_one_claimed_batch_is_claimed_once(ledger: Ledger) -> None:
    """An earlier version's withdrawal left its ids in the list, so the same id published
    again is there twice: one claim taking both entries claims it once (entries taken by two
    claims are why publishers are upgraded first: docs/hosts.md)."""
    ledger.accept([event("z1")], redeliver_after_s=30, shared_queue="q", **TTL)
    ledger.client.rpush("cgrid:pending:q", "z1")
    token = "d3" * 8
    assert [i for i, _ in ledger.claim_shared("q", 0, 10, lease_s=10, sent_at_s=0, token=token)] == ["z1"]
    assert ledger.client.hget(f"cgrid:lease:{token}", "open") == b"1"


def test_an_outcome_written_again_where_its_shared_claim_is_unknown_still_counts(ledger: Ledger) -> None:
    """After a failover the worker writes its outcomes again on the new primary, which may
    lack the claim (the event still in its list there): a success counts, and the list's
    entry claims nothing, so the event is not called a second time."""
    ledger.accept([event("f1")], redeliver_after_s=30, shared_queue="q", **TTL)
    assert finish(ledger, "f1", 1, Outcome.OK, token="99" * 8) == "delivered"
    assert ledger.claim_shared("q", 0, 10, lease_s=10, sent_at_s=0) == []
    assert ledger.backlog() == (0, {})


def test_a_shared_claim_of_an_event_with_sent_at_writes_its_claim_fields(ledger: Ledger) -> None:
    """An event accepted with sent_at (by a publisher of an earlier version) may also have a
    trigger with its id: a shared claim marks it claimed in its record, as a claim by id does,
    and the sweeper's look at its due entry finds the lease (P leases:shared) running."""
    sweep = dict(limit=100, redeliver_after_s=0.05, retry_delay_s=60, report_ttl_s=3600, routing=Q)
    ledger.accept([event("v1")], redeliver_after_s=30, shared_queue="q", **TTL)
    ledger.client.hset("cgrid:ev:v1", "sent_at", "1")
    ledger.client.zadd("cgrid:due", {"v1": 0})
    token = "c0" * 8
    assert [i for i, _ in ledger.claim_shared("q", 0, 1, lease_s=30, sent_at_s=0, token=token)] == ["v1"]
    assert ledger.client.hget("cgrid:ev:v1", "claim_id") == token.encode()
    # Its lease where every sweeper looks: an earlier one reads P leases only.
    assert ledger.client.zscore("cgrid:leases", token) and not ledger.client.zscore("cgrid:leases:shared", token)
    assert ledger.claim(["v1"], 1, lease_s=10, sent_at_s=0) == []  # by id: claimed already
    ledger.sweep(**sweep)
    assert (ledger.record("v1") or {})["state"] == "pending"  # not lost: its lease runs
    assert float(ledger.client.zscore("cgrid:due", "v1") or 0) > time.time() + 20  # looked at again at its end
    assert finish(ledger, "v1", 1, Outcome.OK) == "delivered"


def test_an_event_waiting_for_a_shared_trigger_is_in_its_list_not_the_due_set(ledger: Ledger) -> None:
    """The pending list is where the sweeper looks for it (no due entry, no sent_at: a write
    each spared per event); its claim puts it under the claim's lease, not in the due set;
    the backlog counts both."""
    ledger.accept([event("d1"), event("d2")], redeliver_after_s=30, shared_queue="q", **TTL)
    ledger.accept([event("i1")], redeliver_after_s=30, **TTL)  # ids sent in the trigger: due
    assert ledger.client.zrange("cgrid:due", 0, -1) == [b"i1"]
    assert "sent_at" not in (ledger.record("d1") or {})
    assert ledger.backlog() == (3, {})
    token = "cd" * 8
    claimed = ledger.claim_shared("q", 0, 1, lease_s=10, sent_at_s=0, token=token)
    assert [i for i, _ in claimed] == ["d1"]
    assert ledger.client.zrange("cgrid:due", 0, -1) == [b"i1"]
    assert ledger.client.zrange("cgrid:leases:shared", 0, -1) == [token.encode()]
    lease = ledger.client.hgetall(f"cgrid:lease:{token}")
    assert lease.keys() == {b"ids", b"at", b"open"} and (lease[b"ids"], lease[b"open"]) == (b"d1", b"1")
    assert ledger.backlog() == (3, {})  # d1 in flight, d2 waiting, i1 queued


def test_a_shared_trigger_lost_on_its_way_is_asked_for_again_after_its_hold(ledger: Ledger) -> None:
    asks: list[bool] = []
    ledger.accept([event("h1")], redeliver_after_s=30, shared_queue="q", trigger=asks, **TTL)
    ledger.accept([event("h2")], redeliver_after_s=30, shared_queue="q", trigger=asks, **TTL)
    time.sleep(SHARED_TRIGGER_HOLD_MS / 1000 + 0.2)  # the first never reached a worker
    ledger.accept([event("h3")], redeliver_after_s=30, shared_queue="q", trigger=asks, **TTL)
    assert asks == [True, False, True]
    assert [i for i, _ in ledger.claim_shared("q", 0, 10, lease_s=10, sent_at_s=0)] == ["h1", "h2", "h3"]


def test_a_pending_list_with_no_trigger_on_its_way_is_found_once(ledger: Ledger) -> None:
    ledger.accept([event("o1")], redeliver_after_s=30, shared_queue="q", **TTL)
    assert ledger.orphaned_pending(["q", "q.retry"]) == []  # its trigger is on its way
    ledger.client.delete("cgrid:trigger:q")  # (as when its hold has passed)
    assert ledger.orphaned_pending(["q", "q.retry"]) == [("q", 0)]
    assert ledger.orphaned_pending(["q", "q.retry"]) == []  # marked: one trigger, not one per sweep


def test_a_shared_trigger_let_go_is_asked_for_again(ledger: Ledger) -> None:
    asks: list[bool] = []
    ledger.accept([event("g1")], redeliver_after_s=30, shared_queue="q", trigger=asks, **TTL)
    ledger.release_shared("q", 0)  # its worker's engine is full
    ledger.accept([event("g2")], redeliver_after_s=30, shared_queue="q", trigger=asks, **TTL)
    assert asks == [True, True]
