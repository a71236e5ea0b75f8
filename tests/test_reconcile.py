"""``cgrid-s2s reconcile``: a real worker delivers to a mock buyer that logs what it received;
that log, with some notices removed and some added, gives exactly those back, in every form;
bad files are refused clearly. Our side is read from the real archiver's files, the archive
stream and the ledger, each event counted once."""

from __future__ import annotations

import csv
import datetime
import io
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import redis

from archive.archiver import Archiver
from archive.files import ensure_group, stream_key
from cgrid.event import parse_event
from cgrid.ledger import Finish, Ledger, Outcome
from cgrid.settings import Settings
from ops.mock_dsp import MockDspServer
from ops.reconcile import BadFile, Form, choose_form, discrepancy_pct, read_theirs
from producer import Publisher
from tests.helpers import ROOT, WorkerProcess, fleet_env, wait_for

TERMINAL = {"delivered", "failed", "rejected", "expired"}
TTL = dict(ledger_ttl_s=3600, report_ttl_s=3600)


def cli(env: dict[str, str], *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ops.cli", "reconcile", *args], cwd=ROOT, env=env, input=stdin,
                          capture_output=True, text=True, timeout=120)


def csv_text(header: list[str], rows: list[list[Any]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue()


# -- the buyer's file: forms and refusals ----------------------------------------------------------


def theirs_of(text: str | bytes, tmp_path: Path, day: str = "2026-11-25") -> Any:
    path = tmp_path / "buyer.csv"
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return read_theirs(path, "buyer.csv", day)


def test_the_header_tells_the_form_and_other_columns_are_ignored(tmp_path: Path) -> None:
    assert choose_form(["ID"], "f")[0] is Form.IDS
    assert choose_form(["time", "auction_id", "price"], "f") == (Form.AUCTIONS, {"auction_id": 1})
    assert choose_form(["auction_id", "imp_id"], "f") == (Form.AUCTIONS, {"auction_id": 0, "imp_id": 1})
    assert choose_form([" count", "hour "], "f") == (Form.COUNTS, {"hour": 1, "count": 0})
    # A BOM, a blank line before the header and after it, quoted commas and line breaks.
    theirs = theirs_of("\ufeff\nid,note\n\na1,x\n\"a,2\",y\na3,\"two\nlines\"\na4,z\n\n\na5,\n", tmp_path)
    assert (theirs.form, theirs.rows, theirs.header_lines) == (Form.IDS, 5, 2)
    assert [theirs.line_of(row) for row in range(1, 6)] == [4, 5, 6, 8, 11]
    counts = theirs_of("hour,count\n2026-11-25T03,10\n2026-11-25T03,5\n2026-11-25T04,0\n", tmp_path)
    assert sorted(counts.hour_counts.values()) == [0, 15]  # a repeated hour adds up


@pytest.mark.parametrize(("text", "message"), [
    ("", "the file is empty"),
    ("event,price\nx,1\n", "line 1: the header ('event,price') has none of the accepted columns: "
                           "id | auction_id (optionally with imp_id) | hour,count"),
    ("id\nx\ny,z\n", "line 3: 2 fields where the header has 1"),
    ("id,kind\nx,nurl\n ,burl\n", "line 3: id is empty"),
    ("auction_id,imp_id\na,1\n\n,2\n", "line 4: auction_id is empty"),
    ("hour,count\n2026-11-25T01,3\n2026-11-25 02:00,4\n", "line 3: hour '2026-11-25 02:00' is not YYYY-MM-DDTHH"),
    ("hour,count\n2026-11-26T01,3\n", "line 2: hour 2026-11-26T01 is not on --date 2026-11-25"),
    ("hour,count\n2026-11-25T01,-3\n", "line 2: count '-3' is not a whole number"),
    ("hour,count\n2026-11-25T25,3\n", "line 2: hour 2026-11-25T25 is not a real hour"),
    ("id\n\"x\ny\n", "line 3: not readable as CSV (unexpected end of data)"),
    ("id\n\"x\"y\n", "line 2: not readable as CSV"),
])
def test_a_bad_file_is_refused_naming_the_line(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(BadFile) as caught:
        theirs_of(text, tmp_path)
    assert str(caught.value).startswith("buyer.csv: ") and message in str(caught.value)


def test_bytes_that_are_not_utf8_are_refused_naming_the_line(tmp_path: Path) -> None:
    with pytest.raises(BadFile, match="line 3: not UTF-8"):
        theirs_of(b"id\nok\n\xff\xfe\n", tmp_path)
    with pytest.raises(BadFile, match="line 3: not UTF-8"):  # past the first block that is decoded
        theirs_of(b"id\n" + b"x" * 100_000 + b"\n\xff\n", tmp_path)


def test_discrepancy_is_relative_to_ours() -> None:
    assert discrepancy_pct(100, 90) == 10.0 and discrepancy_pct(100, 112) == -12.0
    assert discrepancy_pct(0, 0) == 0.0 and discrepancy_pct(0, 5) is None


# -- end to end ------------------------------------------------------------------------------------


def wait_out_an_hour_boundary() -> None:
    """The test's notices and the buyer's log of them must fall in one UTC hour."""
    now = datetime.datetime.now(datetime.UTC)
    if now.minute >= 57:
        time.sleep((60 - now.minute) * 60 - now.second + 1)


def wait_terminal(ledger: Ledger, ids: list[str], timeout_s: float = 60.0) -> None:
    wait_for(lambda: all((r := ledger.record(i)) is not None and r["state"] in TERMINAL for i in ids), timeout_s,
             "every event final")


def notice(buyer: str, event_id: str, kind: str, auction: str, path: str, dsp: MockDspServer) -> dict[str, Any]:
    return {"id": event_id, "kind": kind, "upstream": "s2s", "buyer": buyer,
            "url": f"{dsp.url}{path}?ev={event_id}&a=${{AUCTION_ID}}&i=${{AUCTION_IMP_ID}}",
            "macros": {"AUCTION_ID": auction, "AUCTION_IMP_ID": 1, "AUCTION_PRICE": 1.25},
            "user_agent": "Mozilla/5.0", "forwarded_for": ["77.16.215.3"]}


def batch(tag: str, auctions: range, dsp: MockDspServer, path: str = "/n") -> list[dict[str, Any]]:
    return [notice("b1", f"{tag}{a}:{kind}", kind, f"auc-{a}", path, dsp)
            for a in auctions for kind in ("nurl", "burl")]


def buyers_log(dsp: MockDspServer) -> list[dict[str, Any]]:
    """What the buyer received and answered with success: one row per notice, as its own log
    would list it (ev: our id; a, i: the auction and impression ids; t: when)."""
    rows: dict[str, dict[str, Any]] = {}
    for call in dsp.log.snapshot():
        split = urlsplit(call["target"])
        if split.path.startswith("/status/5"):
            continue  # it answered 500: not a notice it took
        query = {k: v[0] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
        if "ev" in query:
            rows[query["ev"]] = {**query, "t": call["t"]}
    return list(rows.values())


@pytest.fixture()
def day_of_notices(redis_url: str, dsp: MockDspServer, tmp_path: Path) -> dict[str, Any]:
    """A buyer's notices delivered by a real worker and archived three ways: by the real
    archiver (then stopped), by an archiver that wrote its batch and died before
    acknowledging it (in a file and still in the stream), and not yet (the stream only);
    and one archive file copied under a second name (a takeover writes such duplicates)."""
    wait_out_an_hour_boundary()
    root = tmp_path / "archive"
    env = fleet_env(redis_url, CGRID_ARCHIVE_DIR=str(root), CGRID_RETRY_DELAY_S="0.5")
    client = redis.Redis.from_url(redis_url)
    ledger = Ledger(client)
    worker = WorkerProcess(env, tmp_path / "worker.log", pool="solo", concurrency=1).start()
    archiver = subprocess.Popen([sys.executable, "-m", "ops.cli", "archive", "--dir", str(root), "--name", "arch1"],
                                cwd=ROOT, env=env, stdout=open(tmp_path / "archiver.log", "ab"),
                                stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: client.exists(stream_key()), 30, "the archiver's stream")
        settings = Settings.from_env(env)
        first = [*batch("a", range(12), dsp),
                 *batch("r", range(12, 14), dsp, "/sequence/503,204"),  # delivered on their retry
                 *batch("f", range(14, 15), dsp, "/status/500"),  # failed, after two calls
                 notice("b2", "other:burl", "burl", "auc-0", "/n", dsp)]  # another buyer's
        with Publisher(settings) as publisher:
            ids = publisher.publish_many(first)
        wait_terminal(ledger, ids)
        wait_for(lambda: client.xlen(stream_key()) == 0, 30, "the archiver to write every record")
        archiver.send_signal(signal.SIGTERM)
        assert archiver.wait(timeout=30) == 0
        with Publisher(settings) as publisher:
            second = publisher.publish_many(batch("d", range(15, 18), dsp))
        wait_terminal(ledger, second)
        died = Archiver(client, root, "arch2", claim_idle_s=3600)
        died.open()
        died._acknowledge = lambda entry_ids, records: None  # type: ignore[method-assign]  # killed before it
        assert died.step() == 0 and not died.recovering  # first its own pending entries: none
        assert died.step() == len(second)
        died.close()
        with Publisher(settings) as publisher:
            third = publisher.publish_many(batch("s", range(18, 20), dsp))
        wait_terminal(ledger, third)
    finally:
        if archiver.poll() is None:
            archiver.kill()
            archiver.wait()
        worker.stop()
    day = datetime.datetime.fromtimestamp(parse_event(first[0]).created_at_s, datetime.UTC).strftime("%Y-%m-%d")
    shutil.copy(root / day / "arch1.jsonl", root / day / "arch1-taken-over.jsonl")
    # The stream holds what arch2 wrote, and more.
    assert ledger.archive_backlog()[0] == len(second) + len(third)  # type: ignore[index]
    assert len((root / day / "arch2.jsonl").read_text().splitlines()) == len(second)
    return {"env": env, "day": day, "ledger": ledger, "log": buyers_log(dsp),
            "ids": [*ids, *second, *third]}


def ids_only(rows: list[dict[str, Any]], key: str = "id") -> set[Any]:
    return {row[key] for row in rows}


def test_the_buyers_log_less_some_plus_some_gives_exactly_those_back_in_every_form(
        day_of_notices: dict[str, Any], tmp_path: Path) -> None:
    env, day, log = day_of_notices["env"], day_of_notices["day"], day_of_notices["log"]
    ledger: Ledger = day_of_notices["ledger"]
    mine = [row for row in log if row["ev"] != "other:burl"]
    delivered = {i for i in day_of_notices["ids"] if ledger.record(i)["state"] == "delivered" and i != "other:burl"}
    assert {row["ev"] for row in mine} == delivered and len(delivered) == 38  # the buyer's log is complete
    # Removed: notices archived by arch1 (and copied), by arch2 (file and stream), the stream only.
    removed = {"a3:nurl", "a7:burl", "r12:burl", "d16:nurl", "s19:burl"}
    kept = [row for row in mine if row["ev"] not in removed]
    start = {"--buyer": "b1", "--date": day}
    common = [arg for pair in start.items() for arg in pair]

    # By our event ids, with two ids we never sent and one we failed to deliver.
    ids_file = tmp_path / "ids.csv"
    ids_file.write_text(csv_text(["id"], [[r["ev"]] for r in kept] + [["never-1"], ["f14:burl"], ["never-2"]]))
    result = cli(env, *common, str(ids_file), "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert (out["ours"], out["theirs"], out["matched"]) == (38, 36, 33)
    assert out["discrepancy_pct"] == round(100 * 2 / 38, 4)
    assert ids_only(out["ours_only"]) == removed
    assert all(r["state"] == "delivered" and r["attempts"][-1]["status"] == 204 for r in out["ours_only"])
    r12 = next(r for r in out["ours_only"] if r["id"] == "r12:burl")
    assert [a["status"] for a in r12["attempts"]] == [503, 204]  # the evidence: both calls, with their times
    assert all(a["started_at"].startswith(day) for a in r12["attempts"])
    theirs_only = {r["id"]: r for r in out["theirs_only"]}
    assert set(theirs_only) == {"never-1", "never-2", "f14:burl"}
    assert theirs_only["never-1"]["state"] is None and theirs_only["never-1"]["line"] == 35
    failed = theirs_only["f14:burl"]
    assert failed["state"] == "failed" and [a["status"] for a in failed["attempts"]] == [500, 500]
    assert out["sources"]["archive_stream"] == 10 and out["sources"]["archive_files"] == 3
    hour = datetime.datetime.fromtimestamp(log[0]["t"], datetime.UTC).strftime("%Y-%m-%dT%H")
    assert out["hours"] == [{"hour": hour, "ours": 38, "theirs": 34, "discrepancy_pct": round(100 * 4 / 38, 4)},
                            {"hour": "unknown", "ours": 0, "theirs": 2, "discrepancy_pct": None}]

    # The same from standard input; a threshold under the discrepancy exits 1.
    piped = cli(env, *common, "-", "--json", stdin=ids_file.read_text())
    assert piped.returncode == 0 and json.loads(piped.stdout) == json.loads(result.stdout)
    assert cli(env, *common, "-", "--threshold", "5.3", stdin=ids_file.read_text()).returncode == 0
    assert cli(env, *common, "-", "--threshold", "5.2", stdin=ids_file.read_text()).returncode == 1

    # By auction and impression id, one kind: the buyer's billing-notice log.
    burl = [r for r in kept if r["ev"].endswith(":burl")]
    auctions_file = tmp_path / "auctions.csv"
    auctions_file.write_text(csv_text(["auction_id", "imp_id"], [[r["a"], r["i"]] for r in burl]
                                      + [["auc-never", "1"], ["auc-14", "1"]]))
    result = cli(env, *common, str(auctions_file), "--kind", "burl", "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert (out["ours"], out["theirs"], out["matched"]) == (19, 18, 16)
    assert ids_only(out["ours_only"]) == {"a7:burl", "r12:burl", "s19:burl"}
    assert {(r["auction_id"], r["state"]) for r in out["theirs_only"]} == {("auc-never", None), ("auc-14", "failed")}
    assert next(r for r in out["theirs_only"] if r["state"])["our_id"] == "f14:burl"

    # By auction id alone, both kinds: a win and a billing notice are two notices of one key.
    both_file = tmp_path / "both.csv"
    both_file.write_text(csv_text(["auction_id"], [[r["a"]] for r in kept]))
    result = cli(env, *common, str(both_file), "--json")
    assert result.returncode == 1, result.stderr  # 5 of 38: above the default 10%
    out = json.loads(result.stdout)
    assert (out["ours"], out["theirs"], out["matched"]) == (38, 33, 33)
    assert sorted(r["auction_id"] for r in out["ours_only"]) == ["auc-12", "auc-16", "auc-19", "auc-3", "auc-7"]
    assert out["theirs_only"] == []

    # Counts per hour of receipt.
    counts_file = tmp_path / "counts.csv"
    counts_file.write_text(csv_text(["hour", "count"], [[hour, len(kept) + 2]]))
    result = cli(env, *common, str(counts_file), "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert (out["ours"], out["theirs"], out["matched"], out["ours_only"], out["theirs_only"]) == (38, 35, None, [], [])
    assert out["hours"] == [{"hour": hour, "ours": 38, "theirs": 35, "discrepancy_pct": round(100 * 3 / 38, 4)}]
    assert cli(env, *common, str(counts_file), "--threshold", "7").returncode == 1

    # --csv: the differing rows; the plain form: the summary and the hours.
    rows = list(csv.DictReader(io.StringIO(cli(env, *common, str(ids_file), "--csv").stdout)))
    assert {r["id"] for r in rows if r["side"] == "ours_only"} == removed
    assert {(r["id"], r["state"], r["line"]) for r in rows if r["side"] == "theirs_only"} == {
        ("never-1", "", "35"), ("f14:burl", "failed", "36"), ("never-2", "", "37")}
    assert next(r for r in rows if r["id"] == "r12:burl")["attempts"].startswith("1:503@")
    plain = cli(env, *common, str(ids_file)).stdout
    assert "ours 38  theirs 36  matched 33  discrepancy +5.26% (threshold 10%)" in plain
    assert "ours only 5  theirs only 3" in plain and f"{hour}          38         34" in plain


def test_an_open_event_shows_its_state_and_without_an_archive_the_ledger_is_read_once(
        redis_url: str, tmp_path: Path) -> None:
    """No archiver ever ran: final records are found in the ledger (a SCAN), those also in an
    archive file counted once; an event still open shows as such."""
    client = redis.Redis.from_url(redis_url)
    ledger = Ledger(client)
    root = tmp_path / "archive"
    env = fleet_env(redis_url, CGRID_ARCHIVE_DIR=str(root))
    events = [parse_event({"id": f"e{i}", "kind": "burl", "upstream": "s2s", "buyer": "b1",
                           "url": "https://d.example/b?a=${AUCTION_ID}", "macros": {"AUCTION_ID": f"auc-{i}"}})
              for i in range(6)]
    day = datetime.datetime.fromtimestamp(events[0].created_at_s, datetime.UTC).strftime("%Y-%m-%d")
    ledger.accept(events, redeliver_after_s=300, **TTL)
    ledger.claim([e.id for e in events[:5]], 1, lease_s=60, sent_at_s=0)
    attempt = json.dumps({"n": 1, "started_at": time.time(), "ms": 3.0, "status": 204, "error": None})
    # e0 and e1 end while an archiver's stream exists and are archived; then the archive is
    # switched off (the stream deleted), and e2..e4 end: the ledger alone holds them.
    ensure_group(client)
    ledger.finish([Finish(e.id, Outcome.OK, attempt, final_event=e.to_final_json(keep_call=False))
                   for e in events[:2]], 1, retry_delay_s=1, **TTL)
    archiver = Archiver(client, root, "arch1", claim_idle_s=3600)
    archiver.open()
    archiver.step()  # its own pending entries: none
    assert archiver.step() == 2
    archiver.close()
    client.delete(stream_key())
    ledger.finish([Finish(e.id, Outcome.OK, attempt) for e in events[2:5]], 1, retry_delay_s=1, **TTL)
    theirs = tmp_path / "theirs.csv"
    theirs.write_text("id\ne0\ne1\ne2\ne5\n")
    result = cli(env, "--buyer", "b1", "--date", day, str(theirs), "--json", "--threshold", "50")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert (out["ours"], out["theirs"], out["matched"]) == (5, 4, 3)  # e0, e1 once, though in both
    assert ids_only(out["ours_only"]) == {"e3", "e4"}
    assert out["theirs_only"] == [{"line": 5, "id": "e5", "state": "pending", "hour": out["hours"][0]["hour"],
                                   "attempts": []}]
    assert "no archive stream" in out["warning"] and out["sources"]["ledger_scan"] == 6
    # Matched on auction ids, which the final records kept (the Lua path made e2..e4's).
    auctions = tmp_path / "auctions.csv"
    auctions.write_text("auction_id\nauc-0\nauc-3\nauc-4\n")
    out = json.loads(cli(env, "--buyer", "b1", "--date", day, str(auctions), "--json").stdout)
    assert (out["matched"], ids_only(out["ours_only"])) == (3, {"e1", "e2"})


def test_bad_input_exits_2_with_a_message_and_no_traceback(redis_url: str, tmp_path: Path) -> None:
    env = fleet_env(redis_url, CGRID_ARCHIVE_DIR=str(tmp_path / "archive"))
    bad = tmp_path / "bad.csv"
    bad.write_text("event_id,price\nx,1\n")
    result = cli(env, "--buyer", "b1", "--date", "2026-11-25", str(bad))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "none of the accepted columns: id | auction_id (optionally with imp_id) | hour,count" in result.stderr
    result = cli(env, "--buyer", "b1", "--date", "2026-11-25", "-", stdin="id\nx\n\nx,y\n")
    assert result.returncode == 2 and "standard input: line 4: 2 fields where the header has 1" in result.stderr
    result = cli(env, "--buyer", "b1", "--date", "2026-11-25", str(tmp_path / "missing.csv"))
    assert result.returncode == 2 and "missing.csv: cannot be read" in result.stderr
    result = cli(env, "--buyer", "b1", "--date", "2026-11-25", str(bad), "--threshold", "ten")
    assert result.returncode == 2 and "is not a percentage" in result.stderr
    assert "Traceback" not in result.stderr


def test_duckdb_numbers_their_rows_as_the_check_counted_them(tmp_path: Path) -> None:
    """The lines a result names come from DuckDB's row numbers and the check's offsets:
    blank lines, quoted line breaks and a header after blank lines must not shift them."""
    from ops.reconcile import _connect, _their_rows_sql

    text = "\n\nauction_id,imp_id,x\n\na1,1,\n\"a\n2\",2,\n\n\na3,,\"q\"\"\"\n  a4 ,4,\n" + "".join(
        f"b{i},1,\n" + ("\n" if i % 7 == 0 else "") for i in range(50))
    theirs = theirs_of(text, tmp_path)
    db = _connect(tmp_path)
    db.execute("SET preserve_insertion_order = true")
    rows = db.execute(f"SELECT rownum, auction_id, imp_id FROM ({_their_rows_sql(theirs)}) ORDER BY rownum").fetchall()
    assert len(rows) == theirs.rows == 54
    lines = text.split("\n")
    for rownum, auction_id, _imp_id in rows:
        line = theirs.line_of(rownum)
        assert lines[line - 1].strip().strip('"').split(",")[0].strip() == auction_id.split("\n")[0], (rownum, line)
    assert rows[:4] == [(1, "a1", "1"), (2, "a\n2", "2"), (3, "a3", ""), (4, "a4", "4")]
