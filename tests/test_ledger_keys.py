"""No id, buyer, day, queue or kind can forge another key of the ledger (issue 16).

Each key family of ``cgrid/ledger/ledger.py``'s key list gets a test against a real Redis
with hostile names; a static check keeps the list, the scripts and these tests in step: every
fixed key must be out of reach of every family's pattern."""

from __future__ import annotations

import json
import re
import time

import pytest
import redis

from cgrid.errors import CgridError, InvalidEvent
from cgrid.event import parse_event
from cgrid.ledger import Finish, Ledger, Outcome, Park, WaitReason, day_of
from cgrid.ledger import ledger as ledger_module
from cgrid.ledger.ledger import SCRIPTS_DIR
from cgrid.routing import QUEUE_NAME, Routing, check_queue_name
from worker.poison import configure, record_poison

P = "cgrid:"
TTL = dict(ledger_ttl_s=3600, report_ttl_s=3600)
Q = Routing("q", "q.retry")
SWEEP = dict(limit=100, redeliver_after_s=30, retry_delay_s=0, report_ttl_s=3600, routing=Q)
PRINTABLE = r"[ -~]"
DAY = r"\d{4}-\d{2}-\d{2}"
# Every key name the ledger writes below the prefix: the families, as patterns over what an
# event, a setting or a message can put in them (ids and buyers: 1-128 printable ASCII; days:
# from a created_at, YYYY-MM-DD; queues: QUEUE_NAME; kinds: nurl, burl) ...
FAMILIES = {
    "ev:<id>": rf"ev:{PRINTABLE}{{1,128}}",
    "parked:<buyer>": rf"parked:{PRINTABLE}{{1,128}}",
    "failed:<day>:<buyer>": rf"failed:{DAY}:{PRINTABLE}{{1,128}}",
    "report:<day>": rf"report:{DAY}",
    "watermark:<queue>": rf"watermark:{QUEUE_NAME.pattern}",
    "open:<kind>": r"open:(nurl|burl)",
    "pulled:<token>": r"pulled:[0-9a-f]{16,64}",
    "pending:<queue>": rf"pending:{QUEUE_NAME.pattern}",
    "trigger:<queue>": rf"trigger:{QUEUE_NAME.pattern}",
    "lease:<token>": r"lease:[0-9a-f]{16,64}",
}
# ... and the fixed keys, which none of those patterns may reach.
FIXED = ("due", "leases", "leases:shared", "report:days", "idx:parked-activity", "poison", "poison:count", "archive",
         "archive:format", "archive:records", "wait-mark")
LEGACY = ("parked:activity",)  # the index's former name: the sweep only moves entries out of it


@pytest.fixture()
def ledger(redis_url: str) -> Ledger:
    return Ledger(redis.Redis.from_url(redis_url))


def event(event_id: str, buyer: str | None = "b1", kind: str = "burl", created_at: float | None = None):  # type: ignore[no-untyped-def]
    data = {"id": event_id, "kind": kind, "url": "https://d.example/", "upstream": "s2s", "buyer": buyer}
    if created_at is not None:
        data["created_at"] = created_at
    return parse_event(data)


def attempt(n: int, status: int | None = 204) -> str:
    return json.dumps({"n": n, "started_at": time.time(), "ms": 1.0, "status": status, "error": None})


def claim_and_park(ledger: Ledger, ids: list[str], buyer: str, reason: str = "paused") -> None:
    ledger.accept([event(i, buyer) for i in ids], redeliver_after_s=30, **TTL)
    stamp: list[str] = []
    assert len(ledger.claim(ids, 1, lease_s=30, sent_at_s=0, stamp=stamp)) == len(ids)
    parks = [Park(i, 1, time.time() - 10, buyer, WaitReason(reason), stamp[0]) for i in ids]
    assert ledger.park(parks) == [True] * len(ids)


def key_names(client: redis.Redis) -> set[str]:
    return {k.decode() for k in client.keys("*")}


def test_the_key_list_names_every_key_the_scripts_build_and_no_fixed_key_is_in_a_familys_reach() -> None:
    documented = set(re.findall(r"``P ([a-z:<>-]+)``", ledger_module.__doc__ or ""))
    assert documented == set(FAMILIES) | set(FIXED)
    # Every literal key name in the scripts is a fixed key or a family's start.
    for script in SCRIPTS_DIR.glob("*.lua"):
        for name in re.findall(r"prefix \.\. '([^']+)'", script.read_text()):
            assert name in FIXED + LEGACY or any(f.startswith(name) for f in FAMILIES), (script, name)
    for fixed in FIXED:
        for family, pattern in FAMILIES.items():
            assert not re.fullmatch(pattern, fixed), f"{family} can forge the fixed key {fixed}"
    for a, pa in FAMILIES.items():  # the families start differently: none reaches another's keys
        for b in FAMILIES:
            assert a == b or not pa.startswith(b.split(":")[0] + ":")


def test_a_buyer_named_activity_paused_is_revived_whole_once_resumed(ledger: Ledger) -> None:
    """The issue's first case: the sweeper took the paused buyer's event ids for idle buyer
    names and dropped them from its parked set; once resumed, the event was in neither the
    due set nor a parked set, pending for ever."""
    claim_and_park(ledger, ["e1", "e2"], "activity")
    for _ in range(3):  # paused: left alone, whatever the revive delay
        assert ledger.sweep(**SWEEP, revive_after_s=0.0, paused={"activity": 3600.0})[1:] == ({}, {})
    assert ledger.sweep(**SWEEP, revive_after_s=0.0)[1] == {"q": ["e1", "e2"]}  # resumed
    for event_id in ("e1", "e2"):
        record = ledger.record(event_id)
        assert record is not None and record["waiting"]["reason"] == "queued"
        assert ledger.client.zscore(P + "due", event_id) is not None


def test_a_buyer_named_activity_cannot_pull_another_buyers_place_in_the_index(ledger: Ledger) -> None:
    """The issue's second case: 'activity''s pull popped another paused buyer's entry from
    the index, so that buyer's parked events were never revived."""
    claim_and_park(ledger, ["o1"], "other")
    claim_and_park(ledger, ["a1"], "activity")
    left, pulled = ledger.pull("activity", 10, lease_s=30)
    assert (left, [i for _, i, _ in pulled]) == (0, ["a1"])
    assert ledger.sweep(**SWEEP, revive_after_s=0.0)[1] == {"q": ["o1"]}
    assert ledger.backlog() == (2, {})  # both in the due set; no parked set left, no index entry


def test_parked_sets_a_hostile_buyer_name_gets_its_own_set(ledger: Ledger) -> None:
    hostile = ["activity", "idx:parked-activity", "b1", "parked:b1", ":", " "]
    for n, buyer in enumerate(hostile):
        claim_and_park(ledger, [f"h{n}"], buyer, reason="lane_full")
    assert ledger.backlog() == (0, {buyer: 1 for buyer in hostile})
    assert ledger.client.type(P + "idx:parked-activity") == b"zset"
    for n, buyer in enumerate(hostile):
        assert [i for _, i, _ in ledger.pull(buyer, 10, lease_s=30)[1]] == [f"h{n}"]
    assert ledger.backlog() == (len(hostile), {})


def test_event_ids_cannot_reach_a_fixed_key_or_another_family(ledger: Ledger) -> None:
    ids = [*FIXED, "ev:x", "x", "parked:b1", "failed:2026-01-01:b1", "open:burl", "../due", "*", "ev:"]
    ledger.accept([event(i) for i in ids], redeliver_after_s=30, **TTL)
    assert {k for k in key_names(ledger.client) if k.startswith(P + "ev:")} == {P + "ev:" + i for i in ids}
    assert ledger.client.type(P + "due") == b"zset" and ledger.client.zcard(P + "due") == len(ids)
    claimed = ledger.claim(ids, 1, lease_s=30, sent_at_s=0)
    assert sorted(i for i, _ in claimed) == sorted(ids)
    results = [Finish(i, Outcome.OK, attempt(1)) for i in ids]
    assert ledger.finish(results, 1, retry_delay_s=0, **TTL) == ["delivered"] * len(ids)
    assert ledger.report()[0]["delivered_first"] == len(ids) and ledger.open_events()["burl"] == 0
    for fixed in ("due", "report:days", "open:burl"):
        assert ledger.client.type(P + fixed) in (b"zset", b"string", b"none")


def test_failed_sets_a_buyer_cannot_reach_another_days_set(ledger: Ledger) -> None:
    """``failed:<day>:<buyer>``: the day is always YYYY-MM-DD (no ':'), so the first ':'
    after it ends the day, whatever the buyer holds."""
    for created_at in (1e-6, 1.0, 9.99999e10, time.time()):
        assert re.fullmatch(DAY, day_of(created_at))
    with pytest.raises(InvalidEvent, match="created_at"):
        event("x", created_at=1e11)
    day = day_of(time.time())
    sly = f"{day}:b1"  # a buyer that looks like "<day>:<buyer>"
    ledger.accept([event("plain", "b1"), event("sly", sly)], redeliver_after_s=30, **TTL)
    ledger.claim(["plain", "sly"], 1, lease_s=30, sent_at_s=0)
    ledger.finish([Finish(i, Outcome.FAIL, attempt(1, 500)) for i in ("plain", "sly")], 1, retry_delay_s=0, **TTL)
    ledger.claim(["plain", "sly"], 2, lease_s=30, sent_at_s=0)
    ledger.finish([Finish(i, Outcome.FAIL, attempt(2, 500)) for i in ("plain", "sly")], 2, retry_delay_s=0, **TTL)
    assert ledger.failed_ids(day, "b1") == ["plain"] and ledger.failed_ids(day, sly) == ["sly"]


def test_report_fields_a_buyer_cannot_forge_another_buyers_counter(ledger: Ledger) -> None:
    """``report:<day>`` holds ``<buyer>\\t<counter>``: a buyer is printable ASCII, so it has
    no tab; a day is never ``days``."""
    for sly in ("b1\tevents", "b1\t", "\t"):
        with pytest.raises(InvalidEvent, match="buyer"):
            event("x", sly)
    ledger.accept([event("a", "b1"), event("b", "b1 events"), event("c", "events")], redeliver_after_s=30, **TTL)
    rows = {row["buyer"]: row["events"] for row in ledger.report()}
    assert rows == {"b1": 1, "b1 events": 1, "events": 1}
    assert ledger.client.type(P + "report:days") == b"zset"


def test_watermarks_a_queue_name_cannot_reach_another_key(ledger: Ledger) -> None:
    """``watermark:<queue>``: queue names are QUEUE_NAME (no ':'), checked in the settings
    and, for a trigger's routing key, in worker/batch.py; fixed-looking names stay watermarks."""
    for bad in ("due", "a:b", "cgrid:due", "../x", ""):
        if not QUEUE_NAME.fullmatch(bad):
            with pytest.raises(Exception, match="not a queue name"):
                check_queue_name(bad, "CGRID_BUYER_QUEUES")
    ledger.accept([event("a"), event("b")], redeliver_after_s=30, **TTL)
    ledger.claim(["a"], 1, lease_s=30, sent_at_s=time.time(), queue="due")
    ledger.claim(["b"], 1, lease_s=30, sent_at_s=time.time(), queue="archive")
    assert ledger.client.type(P + "due") == b"zset" and ledger.client.zcard(P + "due") == 2
    assert ledger.client.type(P + "watermark:due") == b"string"
    assert ledger.client.exists(P + "archive") == 0  # no archiver: no stream made
    assert not any(QUEUE_NAME.fullmatch(P + rest) for rest in FIXED)  # no queue sits under the prefix


def test_open_counters_only_the_two_kinds(ledger: Ledger) -> None:
    with pytest.raises(InvalidEvent, match="kind"):
        event("x", kind="burl:x")
    ledger.accept([event("w", kind="nurl"), event("b", kind="burl")], redeliver_after_s=30, **TTL)
    assert {k for k in key_names(ledger.client) if k.startswith(P + "open:")} == {P + "open:nurl", P + "open:burl"}


def test_poison_records_stay_in_their_two_keys(redis_url: str) -> None:
    from cgrid.settings import Settings

    configure(Settings.from_env({"CGRID_REDIS_URL": redis_url}))
    record_poison("task arguments: ids", "ev:x poison:count due")
    client = redis.Redis.from_url(redis_url)
    Ledger(client).accept([event("poison"), event("poison:count")], redeliver_after_s=30, **TTL)
    assert client.type(P + "poison") == b"list" and client.llen(P + "poison") == 1
    assert client.get(P + "poison:count") == b"1"
    assert Ledger(client).poisoned() == 1


def test_the_archive_stream_takes_records_whatever_their_ids(ledger: Ledger) -> None:
    from archive.files import archive_lines, ensure_group, stream_key

    ensure_group(ledger.client)
    ledger.accept([event("archive"), event("ev:archive")], redeliver_after_s=30, **TTL)
    ledger.claim(["archive", "ev:archive"], 1, lease_s=30, sent_at_s=0)
    ledger.finish([Finish(i, Outcome.OK, attempt(1)) for i in ("archive", "ev:archive")], 1, retry_delay_s=0, **TTL)
    entries = ledger.client.xrange(stream_key())
    assert [json.loads(line)["id"] for i, f in entries for _, _, line in archive_lines(i.decode(), f)] == [
        "archive", "ev:archive"]
    assert ledger.client.type(P + "ev:archive") == b"hash"


def test_an_upgrade_moves_the_former_index_and_keeps_the_activity_buyers_events(ledger: Ledger) -> None:
    """A fleet upgraded in place: its index is still under the former name, parked:activity,
    mixed (the bug) with the parked events of a buyer named 'activity'; workers not yet
    upgraded keep writing it. The sweep moves the buyer names to the index and leaves the
    events, so every parked set is revived and nothing is dropped."""
    claim_and_park(ledger, ["o1"], "other")
    claim_and_park(ledger, ["a1"], "activity")
    index = ledger.client.zrange(P + "idx:parked-activity", 0, -1, withscores=True)
    ledger.client.delete(P + "idx:parked-activity")
    ledger.client.zadd(P + "parked:activity", {member.decode(): score for member, score in index})
    assert sorted(ledger.client.zrange(P + "parked:activity", 0, -1)) == [b"a1", b"activity", b"other"]
    _, first, _ = ledger.sweep(**SWEEP, revive_after_s=0.0)
    assert sorted(first["q"]) == ["a1", "o1"]
    assert ledger.client.exists(P + "parked:activity", P + "idx:parked-activity") == 0
    assert ledger.backlog() == (2, {})


def test_pull_lists_only_a_token_made_for_it(ledger: Ledger) -> None:
    """``pulled:<token>``: the token is random hex made by the ledger's caller; anything else
    is refused before a key is built from it."""
    claim_and_park(ledger, ["p1"], "b1", reason="lane_full")
    for bad in ("../due", "ABCDEF0123456789", "0123", "x" * 16):
        with pytest.raises(CgridError, match="token"):
            ledger.pull("b1", 1, lease_s=30, token=bad)
    token = "0123456789abcdef"
    assert [i for _, i, _ in ledger.pull("b1", 1, lease_s=30, token=token)[1]] == ["p1"]
    assert ledger.client.smembers(P + "pulled:" + token) == {b"p1"}
    assert 0 < ledger.client.pttl(P + "pulled:" + token) <= 30_000
