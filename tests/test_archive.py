"""The archive: every final record reaches a daily JSON-lines file exactly once, whatever
happens to the archiver (kill -9 at any instant, a torn line, a full disk, Redis away)."""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import redis

from archive.archiver import Archiver
from archive.files import GROUP, ensure_group, file_for, read_lines, recover_tail, stream_key
from cgrid.event import parse_event
from cgrid.ledger import Finish, Ledger, Outcome, Park, day_of
from cgrid.redis_server import RedisServer
from cgrid.routing import Routing
from delivery.attempt import Attempt
from tests.helpers import ROOT, fleet_env, wait_for

pytestmark = pytest.mark.integration

TTL = dict(ledger_ttl_s=3600, report_ttl_s=3600)


def make_event(event_id: str, buyer: str = "b1", created_at: float | None = None) -> Any:
    return parse_event({"id": event_id, "kind": "burl", "upstream": "u2s", "buyer": buyer,
                        "url": "https://d.example/bill?p=${AUCTION_PRICE}", "macros": {"AUCTION_PRICE": "1.5"},
                        "user_agent": "Mozilla/5.0", "forwarded_for": ["77.16.215.3"],
                        **({"created_at": created_at} if created_at else {})})


def attempt(n: int, status: int | None = 204, error: str | None = None) -> str:
    return json.dumps({"n": n, "started_at": time.time(), "ms": 1.0, "status": status, "error": error})


def deliver_all(ledger: Ledger, ids: list[str]) -> None:
    """Accept, claim and deliver the events: each record becomes final."""
    ledger.accept([make_event(i) for i in ids], redeliver_after_s=30, **TTL)
    ledger.claim(ids, 1, lease_s=30, sent_at_s=0)
    ledger.finish([Finish(i, Outcome.OK, attempt(1)) for i in ids], 1, retry_delay_s=1, **TTL)


def archived(root: Path) -> list[dict[str, Any]]:
    return [record for path in sorted(root.glob("*/*.jsonl")) for _, record in read_lines(path)]


def drain(archiver: Archiver, client: redis.Redis, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while client.xlen(archiver.key) or archiver.recovering:
        assert time.monotonic() < deadline, "archive stream not drained"
        archiver.step()


@pytest.fixture()
def client(redis_url: str) -> redis.Redis:
    c = redis.Redis.from_url(redis_url)
    ensure_group(c)
    return c


def test_every_final_state_is_archived_with_its_fields(client: redis.Redis, tmp_path: Path) -> None:
    ledger = Ledger(client)
    yesterday = time.time() - 86_400
    ledger.accept([make_event("ok", created_at=yesterday), make_event("fail"), make_event("rej"),
                   make_event("old"), make_event("lost"), make_event("paused", buyer="bp")],
                  redeliver_after_s=30, **TTL)
    ledger.claim(["ok", "fail", "rej", "old", "lost", "paused"], 1, lease_s=0.01, sent_at_s=0)
    ledger.finish([Finish("ok", Outcome.OK, attempt(1)), Finish("fail", Outcome.FAIL, attempt(1, 500)),
                   Finish("rej", Outcome.REJECTED, "", reason="127.0.0.2 is a loopback address"),
                   Finish("old", Outcome.EXPIRED, "", reason="created 99s ago")], 1, retry_delay_s=0, **TTL)
    ledger.claim(["fail"], 2, lease_s=30, sent_at_s=0)
    ledger.finish([Finish("fail", Outcome.FAIL, attempt(2, None, "timeout"))], 2, retry_delay_s=0, **TTL)
    ledger.park([Park("paused", 1, time.time() - 1000, "bp")])
    time.sleep(0.05)
    sweep = dict(limit=100, redeliver_after_s=30, retry_delay_s=0, report_ttl_s=3600, routing=Routing("q", "q.retry"))
    ledger.sweep(**sweep, paused={"bp": 10.0})  # "lost": attempt 1 lost; "paused": too old, expired
    ledger.claim(["lost"], 2, lease_s=0.01, sent_at_s=0)
    time.sleep(0.05)
    ledger.sweep(**sweep)  # attempt 2 of "lost" lost too: failed
    root = tmp_path / "archive"
    archiver = Archiver(client, root, "a1", claim_idle_s=600)
    archiver.open()
    drain(archiver, client)
    lines = {r["id"]: r for r in archived(root)}
    assert {k: v["state"] for k, v in lines.items()} == {
        "ok": "delivered", "fail": "failed", "rej": "rejected", "old": "expired", "lost": "failed",
        "paused": "expired"}
    ok = lines["ok"]
    assert ok["day"] == day_of(yesterday) and (root / day_of(yesterday) / "a1.jsonl").is_file()
    assert ok["buyer"] == "b1" and ok["kind"] == "burl" and ok["entry"] and ok["finished_at"] >= ok["accepted_at"]
    assert [a["status"] for a in ok["attempts"]] == [204]
    assert "url" not in ok["event"] and "user_agent" not in ok["event"] and ok["event"]["host"] == "d.example"
    fail = lines["fail"]
    assert [a["status"] for a in fail["attempts"]] == [500, None] and fail["attempts"][1]["error"] == "timeout"
    assert fail["event"]["url"].startswith("https://d.example/") and fail["event"]["macros"] == {"AUCTION_PRICE": "1.5"}
    assert "user_agent" not in fail["event"] and "forwarded_for" not in fail["event"]
    assert lines["rej"]["reason"] == "127.0.0.2 is a loopback address" and lines["rej"]["attempts"] == []
    assert [a["error"] for a in lines["lost"]["attempts"]] == ["lost", "lost"]
    assert "paused" in lines["paused"]["reason"]
    # Expired uncalled: kept for replay, like a failed event (but never the user's data).
    for expired in (lines["old"], lines["paused"]):
        assert expired["event"]["url"].startswith("https://d.example/") and "user_agent" not in expired["event"]
    assert Ledger(client).failed_ids(day_of(time.time()), "bp") == ["paused"]
    assert client.xlen(stream_key()) == 0  # acknowledged and deleted
    assert Ledger(client).archive_backlog() == (0, 0.0)


def test_entries_of_the_previous_formats_left_in_the_stream_are_still_archived(
        client: redis.Redis, tmp_path: Path) -> None:
    """An upgrade: until an archiver that reads batch entries has started (P
    archive:format), the scripts add entries as the previous versions did, a field per value
    or one-field `line` entries (a fleet upgraded before its archivers loses nothing);
    entries of every format wait in the stream, and the archiver writes them the same way."""
    client.delete("cgrid:archive:format")  # the stream as an archiver of an older version made it
    day = day_of(time.time())
    deliver_all(Ledger(client), ["old-format"])
    client.set("cgrid:archive:format", "line")  # as an archiver of the previous version says
    deliver_all(Ledger(client), ["line-format"])
    ensure_group(client)  # an archiver of this version starts
    assert client.get("cgrid:archive:format") == b"lines"
    deliver_all(Ledger(client), ["new-format", "new-format-2"])
    entries = client.xrange(stream_key())
    assert [list(f) for _, f in entries] == [
        [b"id", b"state", b"day", b"buyer", b"kind", b"accepted_at", b"finished_at", b"a1", b"a2", b"reason",
         b"event"], [b"line"], [b"lines", *list(entries[2][1])[1:]]]
    assert len(entries[2][1]) == 3  # one entry for the script's two records
    assert Ledger(client).archive_backlog()[0] == 2  # type: ignore[index]  # (the earlier formats' are left out)
    root = tmp_path / "archive"
    archiver = Archiver(client, root, "a1", claim_idle_s=600)
    archiver.open()
    drain(archiver, client)
    records = archived(root)
    assert [r["id"] for r in records] == ["old-format", "line-format", "new-format", "new-format-2"]
    batch_entry = entries[2][0].decode()
    assert [r["entry"] for r in records[2:]] == [f"{batch_entry}/0", f"{batch_entry}/1"]
    for record, event_id in zip(records, ["old-format", "line-format", "new-format", "new-format-2"], strict=True):
        assert list(record) == ["entry", "id", "state", "day", "buyer", "kind", "accepted_at", "finished_at",
                                "attempts", "event"]
        assert (record["id"], record["state"], record["day"], record["buyer"]) == (event_id, "delivered", day, "b1")
        assert [a["status"] for a in record["attempts"]] == [204] and record["event"]["host"] == "d.example"
        assert record["finished_at"] >= record["accepted_at"] > 0
    assert Ledger(client).archive_backlog() == (0, 0.0)


def test_a_line_the_worker_made_is_the_line_the_script_makes(client: redis.Redis, tmp_path: Path) -> None:
    """A first attempt's delivery comes with its archive line made by the worker
    (Attempt.to_finish, cgrid.ledger.delivered_line_parts): the script adds it as it is and
    the archiver puts the record's times in. The same record, made by the script (no line
    given, or one that does not fit what the script found), reads the same."""
    ledger = Ledger(client)
    ids = ["by-worker", "by-script", "unexpected", "retried"]
    created_at = time.time()
    events = {i: make_event(i, created_at=created_at) for i in ids}
    ledger.accept(list(events.values()), redeliver_after_s=30, **TTL)
    ledger.claim(ids, 1, lease_s=30, sent_at_s=0)
    ok = Attempt(1, Outcome.OK, time.time(), 12.5, status=204)
    odd = Attempt(1, Outcome.UNEXPECTED, time.time(), 3.0, status=302)
    fail = Attempt(1, Outcome.FAIL, time.time(), 3.0, status=500)
    by_worker = ok.to_finish("by-worker", None, events["by-worker"])
    assert by_worker.line_parts.count("\n") == 1
    by_script = dataclasses.replace(ok.to_finish("by-script", None, events["by-script"]), line_parts="")
    assert fail.to_finish("retried", None, events["retried"]).line_parts == ""  # not final: no line
    ledger.finish([by_worker, by_script, odd.to_finish("unexpected", None, events["unexpected"]),
                   fail.to_finish("retried", None, events["retried"])], 1, retry_delay_s=0, **TTL)
    ledger.claim(["retried"], 2, lease_s=30, sent_at_s=0)
    # A retry's line is the script's (the first attempt is in the record, not the worker's).
    ledger.finish([Attempt(2, Outcome.OK, time.time(), 1.0, status=204).to_finish("retried", None, events["retried"])],
                  2, retry_delay_s=0, **TTL)
    root = tmp_path / "archive"
    archiver = Archiver(client, root, "a1", claim_idle_s=600)
    archiver.open()
    drain(archiver, client)
    records = {r["id"]: r for r in archived(root)}
    assert sorted(records) == sorted(ids)
    for record in records.values():
        status = ledger.record(record["id"])
        assert status is not None
        assert record["accepted_at"] == float(status["accepted_at"]) and record["finished_at"] >= record["accepted_at"]
        assert record["state"] == "delivered" and record["event"] == json.loads(events[record["id"]].to_final_json(
            keep_call=False))
    same = {k: v for k, v in records["by-worker"].items() if k not in ("entry", "id", "accepted_at", "finished_at")}
    other = {k: v for k, v in records["by-script"].items() if k not in ("entry", "id", "accepted_at", "finished_at")}
    same["event"] = {k: v for k, v in same["event"].items() if k != "id"}
    other["event"] = {k: v for k, v in other["event"].items() if k != "id"}
    same["attempts"][0].pop("started_at")
    other["attempts"][0].pop("started_at")
    assert same == other
    assert list(records["by-worker"]) == list(records["by-script"])
    assert records["unexpected"]["attempts"][0]["unexpected_status"] is True
    assert [a["status"] for a in records["retried"]["attempts"]] == [500, 204]


def test_a_corrupt_record_still_gets_a_line_of_json(client: redis.Redis, tmp_path: Path) -> None:
    """The line is made in the ledger script; what Redis held corrupt is shown, never a line
    that is not JSON: an unreadable event as {"unreadable": its text}, as `status` shows it; a
    corrupt attempt makes the whole line {"entry", "day", "unreadable"}. Non-ASCII text is
    escaped, as in every line."""
    ledger = Ledger(client)
    ids = ["bad-event", "bad-attempt", "quo\"te\\\\d/"]
    ledger.accept([make_event(i) for i in ids], redeliver_after_s=30, **TTL)
    client.hset("cgrid:ev:bad-event", "event", "{broken")
    ledger.claim(ids, 1, lease_s=30, sent_at_s=0)
    ledger.finish([Finish("bad-event", Outcome.REJECTED, "", reason="event: unreadable"),
                   Finish("bad-attempt", Outcome.OK, '{"n":1,'),
                   Finish(ids[2], Outcome.REJECTED, "", reason="r\u00e9ason \"quoted\"\n")], 1,
                  retry_delay_s=1, **TTL)
    root = tmp_path / "archive"
    archiver = Archiver(client, root, "a1", claim_idle_s=600)
    archiver.open()
    drain(archiver, client)
    lines = [line for path in sorted(root.glob("*/*.jsonl")) for line in path.read_bytes().splitlines()]
    assert len(lines) == 3 and all(line.isascii() for line in lines)
    records = [json.loads(line) for line in lines]
    assert records[0]["id"] == "bad-event" and records[0]["event"] == {"unreadable": "{broken"}
    assert set(records[1]) == {"entry", "day", "unreadable"} and records[1]["day"] == day_of(time.time())
    assert '"id":"bad-attempt"' in records[1]["unreadable"]
    assert records[2]["id"] == ids[2] and records[2]["reason"] == "r\u00e9ason \"quoted\"\n"
    assert records[2]["event"]["id"] == ids[2]


def test_after_a_short_batch_the_archiver_waits_for_more(client: redis.Redis, tmp_path: Path) -> None:
    """A batch short of the archiver's batch size: the next read waits LINGER_S, so that
    batches gather (fewer reads, acknowledgements and fsyncs per record); a full batch is
    followed at once by the next read."""
    from archive.archiver import IDLE_POLL_S, LINGER_S

    for i in range(7):  # seven entries (a script's records are one entry)
        deliver_all(Ledger(client), [f"l{i}"])
    archiver = Archiver(client, tmp_path / "archive", "a1", claim_idle_s=600, batch=5, block_ms=None)
    archiver.open()
    log = type("Log", (), {"info": lambda *a, **k: None})()
    assert archiver.turn(log) == IDLE_POLL_S and archiver.recovering is False  # nothing pending on this name
    assert archiver.turn(log) == 0.0 and archiver.written == 5  # a full batch: read again at once
    assert archiver.turn(log) == LINGER_S > 0 and archiver.written == 7  # 2 of 5: wait for more
    assert len(archived(tmp_path / "archive")) == 7


def test_without_an_archiver_nothing_is_kept_for_one(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    ledger = Ledger(client)
    deliver_all(ledger, ["x1", "x2"])
    assert not client.exists(stream_key()) and ledger.archive_backlog() is None


def test_a_torn_last_line_is_cut_and_a_batch_already_written_is_not_written_again(
        client: redis.Redis, tmp_path: Path) -> None:
    deliver_all(Ledger(client), [f"t{i}" for i in range(3)])
    deliver_all(Ledger(client), [f"t{i}" for i in range(3, 5)])
    # A previous run of "a1" read the two entries (five records), wrote three lines and half
    # of the fourth, and died.
    read = client.xreadgroup(GROUP, "a1", {stream_key(): ">"}, count=10)
    entries = read[0][1]
    assert len(entries) == 2
    root = tmp_path / "archive"
    from archive.files import archive_lines

    lines = [made for e, f in entries for made in archive_lines(e.decode(), f)]
    path = file_for(root, lines[0][1], "a1")
    path.parent.mkdir(parents=True)
    written = b"".join(line for _, _, line in lines[:4])
    path.write_bytes(written[:-40])
    archiver = Archiver(client, root, "a1", claim_idle_s=600)
    archiver.open()
    drain(archiver, client)
    ids = [r["id"] for _, r in read_lines(path)]
    assert ids == [f"t{i}" for i in range(5)]
    assert path.read_bytes().endswith(b"\n") and path.read_bytes().count(b"\n") == 5


def test_recover_tail_reads_only_the_last_lines(tmp_path: Path) -> None:
    path = tmp_path / "f.jsonl"
    path.write_bytes(b"".join(json.dumps({"entry": f"{i}-0", "pad": "x" * 300}).encode() + b"\n"
                              for i in range(1000)) + b'{"entry": "torn')
    assert recover_tail(path, 3) == {"997-0", "998-0", "999-0"}
    assert path.read_bytes().endswith(b"\n") and path.read_bytes().count(b"\n") == 1000


def test_entries_left_pending_by_a_gone_archiver_are_taken_over(client: redis.Redis, tmp_path: Path) -> None:
    deliver_all(Ledger(client), [f"g{i}" for i in range(4)])
    client.xreadgroup(GROUP, "gone-host", {stream_key(): ">"}, count=10)  # read, never acknowledged
    root = tmp_path / "archive"
    archiver = Archiver(client, root, "a2", claim_idle_s=0.2)
    archiver.open()
    archiver.step()
    assert archived(root) == [] and Ledger(client).archive_backlog()[0] == 4  # type: ignore[index]  # not idle yet
    time.sleep(0.3)
    archiver._next_claim_s = 0.0
    archiver.step()
    assert sorted(r["id"] for r in archived(root)) == [f"g{i}" for i in range(4)]
    assert client.xlen(stream_key()) == 0 and client.xpending(stream_key(), GROUP)["pending"] == 0


# -- the archiver as a process ---------------------------------------------------------------


def start_archiver(env: dict[str, str], root: Path, name: str, log: Path, **popen: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "ops.cli", "archive", "--dir", str(root), "--name", name],
                            cwd=ROOT, env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT, **popen)


def produce(client: redis.Redis, prefix: str, total: int, stop: threading.Event | None = None,
            pause_s: float = 0.0) -> list[str]:
    ledger = Ledger(client)
    ids: list[str] = []
    for start in range(0, total, 100):
        chunk = [f"{prefix}-{i}" for i in range(start, min(start + 100, total))]
        deliver_all(ledger, chunk)
        ids += chunk
        if pause_s:
            time.sleep(pause_s)
    return ids


def archive_bytes(root: Path) -> int:
    return sum(path.stat().st_size for path in root.glob("*/*.jsonl"))


def test_kill_9_at_any_instant_loses_nothing_and_writes_nothing_twice(redis_url: str, tmp_path: Path) -> None:
    client = redis.Redis.from_url(redis_url)
    ensure_group(client)
    env = fleet_env(redis_url)
    root, log = tmp_path / "archive", tmp_path / "archiver.log"
    produced = produce(client, "early", 5_000)
    producer = threading.Thread(target=lambda: produced.extend(produce(client, "k", 30_000, pause_s=0.02)))
    producer.start()
    kills = 0
    try:
        while producer.is_alive() or kills < 12:
            process = start_archiver(env, root, "a1", log)
            if kills % 2:
                time.sleep(0.3 + (kills % 5) * 0.15)  # at some instant
            else:  # just after it wrote: most likely between its fsync and its acknowledgement
                size = archive_bytes(root)
                deadline = time.monotonic() + 5
                while archive_bytes(root) == size and time.monotonic() < deadline:
                    time.sleep(0.001)
            process.kill()
            process.wait()
            kills += 1
        started = log.read_text().count("archiver_started")
        process = start_archiver(env, root, "a1", log)
        wait_for(lambda: log.read_text().count("archiver_started") > started, 20, "the last archiver started")
        wait_for(lambda: client.xlen(stream_key()) == 0, 60, "the stream drained")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
    finally:
        producer.join()
        if process.poll() is None:
            process.kill()
    counts = Counter(r["id"] for r in archived(root))
    assert len(produced) == 35_000 and kills >= 12
    assert set(counts) == set(produced), f"missing: {len(set(produced) - set(counts))}"
    assert max(counts.values()) == 1, [i for i, n in counts.items() if n > 1][:5]
    assert client.xpending(stream_key(), GROUP)["pending"] == 0
    assert "Traceback" not in log.read_text()
    print("kills:", kills, "restarts that found their batch written:", log.read_text().count("archive_recovered"))


def test_two_archivers_share_the_work_without_duplicates(redis_url: str, tmp_path: Path) -> None:
    client = redis.Redis.from_url(redis_url)
    ensure_group(client)
    env = fleet_env(redis_url)
    root = tmp_path / "archive"
    archivers = [start_archiver(env, root, name, tmp_path / f"{name}.log") for name in ("h1", "h2")]
    try:
        for name in ("h1", "h2"):  # both waiting for entries
            wait_for(lambda name=name: "archiver_started" in (tmp_path / f"{name}.log").read_text(), 20, name)
        ids = produce(client, "two", 4000, pause_s=0.02)
        wait_for(lambda: client.xlen(stream_key()) == 0, 30, "the stream drained")
    finally:
        for process in archivers:
            process.send_signal(signal.SIGTERM)
        codes = [process.wait(timeout=20) for process in archivers]
    assert codes == [0, 0]
    counts = Counter(r["id"] for r in archived(root))
    assert set(counts) == set(ids) and max(counts.values()) == 1
    per_name = {name: sum(1 for _ in read_lines(p)) for name in ("h1", "h2") for p in root.glob(f"*/{name}.jsonl")}
    assert per_name["h1"] > 0 and per_name["h2"] > 0


def test_a_second_archiver_with_the_same_name_is_refused(redis_url: str, tmp_path: Path) -> None:
    env = fleet_env(redis_url)
    root = tmp_path / "archive"
    first = start_archiver(env, root, "same", tmp_path / "first.log")
    try:
        wait_for(lambda: "archiver_started" in (tmp_path / "first.log").read_text(), 20, "first archiver")
        second = subprocess.run([sys.executable, "-m", "ops.cli", "archive", "--dir", str(root),
                                 "--name", "same"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
        assert second.returncode == 2 and "another archiver named 'same'" in second.stderr
        assert "Traceback" not in second.stderr
    finally:
        first.send_signal(signal.SIGINT)  # Ctrl-C: a clean stop too
        assert first.wait(timeout=20) == 0
    assert "Traceback" not in (tmp_path / "first.log").read_text()


def test_an_unwritable_directory_is_a_clear_error(redis_url: str, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    result = subprocess.run([sys.executable, "-m", "ops.cli", "archive", "--dir", str(tmp_path / "file" / "a")],
                            cwd=ROOT, env=fleet_env(redis_url), capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "CGRID_ARCHIVE_DIR: cannot write to" in result.stderr
    assert "Traceback" not in result.stderr


def _small_file_limit() -> None:
    # Files may not grow past 50,000 bytes: a write beyond fails (EFBIG), like a full disk.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000))


def test_a_failing_disk_acknowledges_nothing_and_the_archive_resumes(redis_url: str, tmp_path: Path) -> None:
    client = redis.Redis.from_url(redis_url)
    ensure_group(client)
    env = fleet_env(redis_url)
    root, log = tmp_path / "archive", tmp_path / "archiver.log"
    ids = produce(client, "disk", 300)
    process = start_archiver(env, root, "a1", log, preexec_fn=_small_file_limit)
    try:
        wait_for(lambda: "archive_write_failed" in log.read_text(), 20, "the write failure logged")
        assert Ledger(client).archive_backlog()[0] == 300  # type: ignore[index]  # nothing acknowledged, deleted
        assert archived(root) == []  # cut back: no partial batch
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
    assert "cannot write" in log.read_text() and "Traceback" not in log.read_text()
    process = start_archiver(env, root, "a1", log)  # the disk has room again
    try:
        wait_for(lambda: client.xlen(stream_key()) == 0, 20, "the stream drained")
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=20)
    counts = Counter(r["id"] for r in archived(root))
    assert set(counts) == set(ids) and max(counts.values()) == 1


def test_the_archiver_rides_out_a_redis_restart(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis").start()
    root, log = tmp_path / "archive", tmp_path / "archiver.log"
    process = None
    try:
        client = redis.Redis.from_url(server.url)
        env = fleet_env(server.url)
        process = start_archiver(env, root, "a1", log)
        wait_for(lambda: client.exists(stream_key()), 20, "the archiver's group")
        first = produce(client, "before", 500)
        wait_for(lambda: client.xlen(stream_key()) == 0, 20, "first part archived")
        server.stop(kill=True)
        time.sleep(2)
        server.start()
        wait_for(lambda: "archive_redis_unavailable" in log.read_text(), 20, "the outage noticed")
        second = produce(client, "after", 500)
        wait_for(lambda: client.xlen(stream_key()) == 0, 30, "second part archived")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
    finally:
        if process is not None and process.poll() is None:
            process.kill()
        server.stop()
    counts = Counter(r["id"] for r in archived(root))
    assert set(counts) == set(first + second) and max(counts.values()) == 1
    assert "Traceback" not in log.read_text()


def test_archive_files_are_readable_while_written(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"entry":"1-0","id":"a"}\n{"entry":"2-0","id":"b"}\n{"entry":"3-')
    assert [r["id"] for _, r in read_lines(path)] == ["a", "b"]
    assert os.path.getsize(path) > 0


# -- past the ledger's window: status and replay from the archive ------------------------------


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ops.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)


def test_status_and_replay_of_an_event_past_the_window_use_the_archive(
        client: redis.Redis, redis_url: str, tmp_path: Path) -> None:
    ledger = Ledger(client)
    event = make_event("gone-1")
    ledger.accept([event, make_event("gone-2", buyer="other")], redeliver_after_s=30, **TTL)
    ids = ["gone-1", "gone-2"]
    for n in (1, 2):
        ledger.claim(ids, n, lease_s=30, sent_at_s=0)
        ledger.finish([Finish(i, Outcome.FAIL, attempt(n, 500), final_event=make_event(i).to_final_json(
            keep_call=True) if n == 2 else "") for i in ids], n, retry_delay_s=0, **TTL)
    root = tmp_path / "archive"
    archiver = Archiver(client, root, "a1", claim_idle_s=600)
    archiver.open()
    drain(archiver, client)
    client.delete("cgrid:ev:gone-1", "cgrid:ev:gone-2")  # their CGRID_LEDGER_TTL_S has passed
    env = fleet_env(redis_url, CGRID_ARCHIVE_DIR=str(root))
    day = day_of(event.created_at_s)
    status = cli(env, "status", "gone-1")
    assert status.returncode == 1 and "CGRID_LEDGER_TTL_S" in status.stderr and "--day" in status.stderr
    status = cli(env, "status", "gone-1", "--day", day)
    assert status.returncode == 0, status.stderr
    found = json.loads(status.stdout)
    assert found["state"] == "failed" and found["archived"] is True and len(found["attempts"]) == 2
    path = str(file_for(root, day, "a1"))
    first = cli(env, "replay", "--archive", path, "--buyer", "b1")
    assert first.returncode == 0, first.stderr
    assert first.stdout.split() == ["gone-1:replay1"]
    replayed = ledger.record("gone-1:replay1")
    assert replayed is not None and replayed["state"] == "pending"
    assert replayed["event"]["url"] == event.url and replayed["event"]["macros"] == {"AUCTION_PRICE": "1.5"}
    assert not client.exists("cgrid:ev:gone-1")  # no stub record made for the original
    second = cli(env, "replay", "--archive", path)  # both failed lines; gone-1 was replayed already
    assert second.stdout.split() == ["gone-2:replay1"] and "already replayed as gone-1:replay1" in second.stderr


def test_a_late_success_of_a_lost_retry_corrects_the_archive_with_a_second_line(
        client: redis.Redis, redis_url: str, tmp_path: Path) -> None:
    """The archive got the event's `failed` line when the sweeper gave its retry up for lost;
    the retry's success arrives later: a second line, `delivered`, follows. Readers take the
    last line of an id: status shows both in order, replay from the archive skips it."""
    ledger = Ledger(client)
    ids = ["late", "dead"]
    ledger.accept([make_event(i) for i in ids], redeliver_after_s=30, **TTL)
    ledger.claim(ids, 1, lease_s=30, sent_at_s=0)
    ledger.finish([Finish(i, Outcome.FAIL, attempt(1, 500)) for i in ids], 1, retry_delay_s=0, **TTL)
    ledger.claim(ids, 2, lease_s=0.0, sent_at_s=0)
    ledger.sweep(limit=100, redeliver_after_s=30, retry_delay_s=0, report_ttl_s=3600, routing=Routing("q", "q.r"))
    root = tmp_path / "archive"
    archiver = Archiver(client, root, "a1", claim_idle_s=600)
    archiver.open()
    drain(archiver, client)
    assert ledger.finish([Finish("late", Outcome.OK, attempt(2))], 2, retry_delay_s=0, **TTL) == ["delivered"]
    drain(archiver, client)
    lines = [(r["id"], r["state"]) for r in archived(root)]
    assert sorted(lines[:2]) == [("dead", "failed"), ("late", "failed")] and lines[2] == ("late", "delivered")
    client.delete("cgrid:ev:late", "cgrid:ev:dead")  # past CGRID_LEDGER_TTL_S
    env = fleet_env(redis_url, CGRID_ARCHIVE_DIR=str(root))
    day = day_of(make_event("late").created_at_s)
    status = cli(env, "status", "late", "--day", day)
    assert status.returncode == 0, status.stderr
    shown = [json.loads(part) for part in status.stdout.replace("}\n{", "}\x00{").split("\x00")]
    assert [r["state"] for r in shown] == ["failed", "delivered"] and shown[1]["attempts"][1]["status"] == 204
    path = str(file_for(root, day, "a1"))
    replayed = cli(env, "replay", "--archive", path, "late", "dead")
    assert replayed.stdout.split() == ["dead:replay1"], replayed.stderr
    assert "late: not replayed: delivered" in replayed.stderr
    assert cli(env, "replay", "--archive", path).stdout.split() == []  # dead was replayed; late never


def test_an_open_record_never_expires_a_final_one_after_the_ledger_ttl(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    ledger = Ledger(client)
    ledger.accept([make_event("w1")], redeliver_after_s=30, ledger_ttl_s=120, report_ttl_s=3600)
    assert client.ttl("cgrid:ev:w1") == -1  # open: kept however long its wait (a fleet down for hours)
    ledger.claim(["w1"], 1, lease_s=30, sent_at_s=0)
    ledger.finish([Finish("w1", Outcome.OK, attempt(1))], 1, retry_delay_s=1, ledger_ttl_s=120, report_ttl_s=3600)
    assert 0 < client.ttl("cgrid:ev:w1") <= 120
    bookkeeping = {b"claim", b"claimed_at", b"claim_id", b"sent_at"}
    assert not bookkeeping & set(client.hkeys("cgrid:ev:w1"))  # final: bookkeeping gone


def test_the_line_check_decides_as_json_does() -> None:
    """A line the ledger made is written as it is when json reads it as an object (orjson
    checks first, json decides what orjson refuses: NaN, a lone surrogate); anything else
    becomes {"entry", "day", "unreadable"}; non-ASCII is escaped, numbers kept as written."""
    from archive.files import _made_line

    day = "2026-12-01"
    plain = f'"id":"e1","state":"delivered","day":"{day}","n":123456789012345678901234567890}}'.encode()
    assert _made_line("1-0/3", plain) == (day, b'{"entry":"1-0/3",' + plain + b"\n")
    nan = f'"id":"e2","day":"{day}","ms":NaN}}'.encode()  # json reads it (orjson does not)
    assert _made_line("1-0/4", nan) == (day, b'{"entry":"1-0/4",' + nan + b"\n")
    surrogate = f'"id":"e3","day":"{day}","x":"\\ud800"}}'.encode()
    assert _made_line("1-0/5", surrogate)[1].startswith(b'{"entry":"1-0/5","id":"e3"')
    broken_bodies = [f'"id":"e4","day":"{day}","x":', f'"id":"e5","day":"{day}"}}, {{"x":1',
                     f'"id":"e6","day":"{day}"] ']
    for broken in (body.encode() for body in broken_bodies):
        got_day, line = _made_line("1-0/6", broken)
        record = json.loads(line)
        assert set(record) == {"entry", "day", "unreadable"} and got_day == day == record["day"]
    wide = f'"id":"é","day":"{day}","n":123456789012345678901234567890}}'.encode()
    assert _made_line("1-0/7", wide)[1] == (
        b'{"entry":"1-0/7","id":"\\u00e9","day":"2026-12-01","n":123456789012345678901234567890}\n')
    assert json.loads(_made_line('odd"id', plain)[1])["entry"] == 'odd"id'
