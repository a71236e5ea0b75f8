"""Reconcile with a buyer (``cgrid-s2s reconcile``): which notices differ between our count
and the buyer's, and the evidence for each (docs/operations.md#reconciling-with-a-buyer).

Ours: the buyer's events created on the day (UTC) that ended ``delivered`` (of one kind with
``--kind``). They are read from, in this order:

1. the events still open in the ledger (the queues' pending lists, the claims' leases, the
   due set and the buyer's parked set: every event accepted and not final is in one of them);
2. the archive stream ``P archive``: records that became final and that no archiver has
   written yet;
3. the day's archive files, ``<archive dir>/<day>/*.jsonl``.

An event moves only down that list, so reading in that order sees every one at least once;
a record read twice (it became final between two reads, an archiver wrote it and died before
acknowledging it, a takeover wrote it into two files) counts once, its final state winning.
Without an archive stream (no archiver ever ran) the final records are only in the ledger's
``ev:<id>`` hashes, for ``CGRID_LEDGER_TTL_S``: they are then found with a ``SCAN`` of the
ledger, and the result says so. docs/scaling.md counts what each costs.

Theirs: the buyer's own export, CSV with a header (:func:`read_theirs`): our event ids, or
auction (and impression) ids, matched to the ``AUCTION_ID`` (and ``AUCTION_IMP_ID``) macro
values that final records keep, or counts per UTC hour.

The matching is DuckDB's (one thread, a bounded memory with spilling to a temporary
directory): a buyer-day of 10 million notices on each side took 41–48 s of one core's CPU
and at most 1.36 GiB (``make bench``, docs/performance.md#reconcile).
"""

from __future__ import annotations

import bisect
import csv
import datetime
import json
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import IO, Any

import duckdb
import redis

from archive.files import archive_lines, as_text, stream_key
from cgrid.errors import CgridError
from cgrid.ledger import NO_BUYER, PREFIX, json_or_raw, leased_ids
from cgrid.routing import Routing

ACCEPTED_COLUMNS = "id | auction_id (optionally with imp_id) | hour,count"
DEFAULT_THRESHOLD_PCT = 10.0
DUCKDB_THREADS = 1  # one core: the host may be running workers
DUCKDB_MEMORY_LIMIT = "1200MB"  # DuckDB's own; it spills to a temporary directory beyond it
REDIS_CHUNK = 2000  # ids per pipelined HMGET, entries per XRANGE
_HOUR = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}\Z")
_RECORD_FIELDS = ("day", "buyer", "kind", "state", "accepted_at", "a1", "a2", "reason", "event")


class BadFile(CgridError):
    """The buyer's file cannot be read: the message names the line and what is wrong."""


class ReadFailed(CgridError):
    """The archive or the buyer's file could not be read or matched (a disk full for the
    spill, an unreadable file): the message says what, never a traceback."""


class Form(StrEnum):
    """What the buyer's file holds, told apart by its header."""

    IDS = "id"
    AUCTIONS = "auction_id"
    COUNTS = "hour,count"


@dataclass
class Theirs:
    """The buyer's file, checked (:func:`read_theirs`): where its rows are for DuckDB to read,
    and where their lines are; or, for counts, the counts per hour."""

    form: Form
    name: str
    path: Path
    columns: dict[str, int] = field(default_factory=dict)  # the columns used, by index
    width: int = 0  # columns in the header
    header_lines: int = 1  # lines up to the header's end (blank lines before it count)
    rows: int = 0
    # (row, offset) from which the n-th row (1-based) is on line n + offset: blank lines and
    # quoted line breaks move it; usually one entry.
    line_offsets: list[tuple[int, int]] = field(default_factory=list)
    hour_counts: dict[int, int] = field(default_factory=dict)

    @property
    def with_imp(self) -> bool:
        return "imp_id" in self.columns

    def line_of(self, row: int) -> int:
        """The line the n-th row (1-based, blank lines skipped) starts on."""
        at = bisect.bisect_right(self.line_offsets, (row, sys.maxsize)) - 1
        return row + (self.line_offsets[at][1] if at >= 0 else 0)


def _hour_index(text: str) -> int:
    moment = datetime.datetime.strptime(text, "%Y-%m-%dT%H").replace(tzinfo=datetime.UTC)
    return int(moment.timestamp()) // 3600


def hour_text(index: int | None) -> str:
    if index is None:
        return "unknown"
    return datetime.datetime.fromtimestamp(index * 3600, datetime.UTC).strftime("%Y-%m-%dT%H")


def choose_form(header: list[str], name: str) -> tuple[Form, dict[str, int]]:
    """The file's form and the index of each column used, from its header (other columns
    are ignored); raises :class:`BadFile` naming the accepted columns."""
    columns = [c.strip().lower() for c in header]
    index = {c: i for i, c in reversed(list(enumerate(columns)))}
    if "id" in index:
        return Form.IDS, {"id": index["id"]}
    if "auction_id" in index:
        return Form.AUCTIONS, {k: index[k] for k in ("auction_id", "imp_id") if k in index}
    if "hour" in index and "count" in index:
        return Form.COUNTS, {"hour": index["hour"], "count": index["count"]}
    shown = ",".join(header)[:200]
    raise BadFile(f"{name}: line 1: the header ({shown!r}) has none of the accepted columns: {ACCEPTED_COLUMNS} "
                  "(a header line naming the columns comes first)")


def read_theirs(path: Path, name: str, day: str) -> Theirs:
    """Check the buyer's CSV file row by row: a bad row raises :class:`BadFile` naming its
    line. The rows are then read by DuckDB (:func:`reconcile`); this pass notes where each
    row's line is, and sums the counts of a file of counts."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            return _check(csv.reader(f, strict=True), path, name, day)
    except UnicodeDecodeError:
        raise BadFile(f"{name}: line {_undecodable_line(path)}: not UTF-8 text") from None


def _undecodable_line(path: Path) -> int:
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                raw.decode()
            except UnicodeDecodeError:
                return number
    return 0


def _check(reader: Any, path: Path, name: str, day: str) -> Theirs:
    try:
        header: list[str] = []
        for header in reader:
            if header:
                break
        if not header:
            raise BadFile(f"{name}: the file is empty: a header line comes first, with the columns {ACCEPTED_COLUMNS}")
        form, columns = choose_form(header, name)
        theirs = Theirs(form, name, path, columns, len(header), reader.line_num)
        if form is Form.COUNTS:
            _check_counts(reader, theirs, day)
        else:
            _check_rows(reader, theirs)
        return theirs
    except csv.Error as e:
        raise BadFile(f"{name}: line {reader.line_num}: not readable as CSV ({e})") from None


def _check_rows(reader: Any, theirs: Theirs) -> None:
    key = "id" if theirs.form is Form.IDS else "auction_id"
    key_at, width, name = theirs.columns[key], theirs.width, theirs.name
    start, rows, offset = reader.line_num + 1, 0, None
    for row in reader:
        line, start = start, reader.line_num + 1
        if not row:
            continue  # a blank line
        if len(row) != width:
            raise BadFile(f"{name}: line {line}: {len(row)} fields where the header has {width}")
        if not row[key_at].strip():
            raise BadFile(f"{name}: line {line}: {key} is empty")
        rows += 1
        if line - rows != offset:
            offset = line - rows
            theirs.line_offsets.append((rows, offset))
    theirs.rows = rows


def _check_counts(reader: Any, theirs: Theirs, day: str) -> None:
    name, start = theirs.name, reader.line_num + 1
    for row in reader:
        line, start = start, reader.line_num + 1
        if not row:
            continue
        if len(row) != theirs.width:
            raise BadFile(f"{name}: line {line}: {len(row)} fields where the header has {theirs.width}")
        hour, count = row[theirs.columns["hour"]].strip(), row[theirs.columns["count"]].strip()
        if not _HOUR.match(hour):
            raise BadFile(f"{name}: line {line}: hour {hour[:40]!r} is not YYYY-MM-DDTHH (UTC)")
        if not hour.startswith(day):
            raise BadFile(f"{name}: line {line}: hour {hour} is not on --date {day}")
        if not count.isdigit():
            raise BadFile(f"{name}: line {line}: count {count[:40]!r} is not a whole number")
        try:
            index = _hour_index(hour)
        except ValueError:
            raise BadFile(f"{name}: line {line}: hour {hour} is not a real hour") from None
        theirs.hour_counts[index] = theirs.hour_counts.get(index, 0) + int(count)  # repeated hours add up
        theirs.rows += 1


# -- ours: the ledger ------------------------------------------------------------------------------


@dataclass
class Sources:
    """What was read for our side: the archive files, and the records taken from Redis."""

    files: list[Path]
    hot_path: Path
    open_records: int = 0
    stream_records: int = 0
    scanned_records: int = 0
    archive_stream: bool = True


def _record_line(event_id: str, fields: dict[str, str]) -> bytes:
    """A ledger record as an archive line (archive/files.py), for the one reader."""
    record: dict[str, Any] = {
        "entry": "", "id": event_id, "state": fields.get("state") or "", "day": fields.get("day") or "",
        "buyer": fields.get("buyer") or "", "kind": fields.get("kind") or "",
        "accepted_at": None, "finished_at": None,
        "attempts": [json_or_raw(fields[k]) for k in ("a1", "a2") if fields.get(k)],
    }
    if fields.get("reason"):
        record["reason"] = fields["reason"]
    record["event"] = json_or_raw(fields["event"]) if fields.get("event") else None
    return (json.dumps(record, separators=(",", ":")) + "\n").encode()


def _write_records(client: redis.Redis, prefix: str, ids: list[str], day: str, buyer: str, out: IO[bytes]) -> int:
    """The ledger records of ``ids`` that are the buyer's and the day's, as archive lines."""
    written = 0
    for start in range(0, len(ids), REDIS_CHUNK):
        chunk = ids[start:start + REDIS_CHUNK]
        pipe = client.pipeline(transaction=False)
        for event_id in chunk:
            pipe.hmget(prefix + "ev:" + event_id, *_RECORD_FIELDS)
        for event_id, values in zip(chunk, pipe.execute(), strict=True):
            fields = {k: as_text(v) for k, v in zip(_RECORD_FIELDS, values, strict=True) if v is not None}
            if fields.get("day") == day and fields.get("buyer") == buyer:
                out.write(_record_line(event_id, fields))
                written += 1
    return written


def gather_ours(client: redis.Redis, root: Path, day: str, buyer: str, workdir: Path,
                keyspaces: Sequence[tuple[str, str]] = ((PREFIX, ""),),
                queues: Sequence[str] = Routing().queues) -> Sources:
    """Write the buyer's records of the day that only Redis holds into one file, beside the
    day's archive files (see the module's docstring for the order and why). ``keyspaces``:
    the ledger's key prefix and the archive's entry prefix of each partition (one, unless the
    ledger is on a Redis Cluster); ``queues``: the broker queues (routing), whose pending
    lists hold events waiting for a shared trigger."""
    stored_buyer = buyer or NO_BUYER
    sources = Sources(files=[], hot_path=workdir / "hot.jsonl", archive_stream=False)
    with open(sources.hot_path, "wb") as out:
        for prefix, entry_prefix in keyspaces:
            _gather_keyspace(client, prefix, entry_prefix, day, stored_buyer, sources, out, queues)
    # 3. The day's archive files, listed after Redis was read.
    sources.files = sorted((root / day).glob("*.jsonl")) if (root / day).is_dir() else []
    return sources


def _gather_keyspace(client: redis.Redis, prefix: str, entry_prefix: str, day: str, stored_buyer: str,
                     sources: Sources, out: IO[bytes], queues: Sequence[str]) -> None:
    # 1. Open events: the pending lists (waiting for a shared trigger: a claim moves them on
    # under its lease), the claims' leases (in flight), the due set (queued with their ids in
    # their trigger, retry waiting) and the parked set.
    open_ids: list[str] = []
    for queue in queues:
        open_ids += [as_text(i) for i in client.lrange(f"{prefix}pending:{queue}", 0, -1)]
    open_ids += leased_ids(client, prefix)
    open_ids += [as_text(i) for i in client.zrange(prefix + "due", 0, -1)]
    open_ids += [as_text(i) for i in client.zrange(prefix + "parked:" + stored_buyer, 0, -1)]
    sources.open_records += _write_records(client, prefix, open_ids, day, stored_buyer, out)
    # 2. Final records no archiver has written yet.
    key = stream_key(prefix)
    in_stream = bool(client.exists(key))
    sources.archive_stream = sources.archive_stream or in_stream
    if in_stream:
        after = "-"
        while True:
            entries: Any = client.xrange(key, min=after, max="+", count=REDIS_CHUNK)
            for entry_id, fields in entries:
                for _, _, line in archive_lines(entry_prefix + as_text(entry_id), fields):
                    record = json.loads(line)
                    if record.get("day") == day and record.get("buyer") == stored_buyer:
                        out.write(line)
                        sources.stream_records += 1
            if len(entries) < REDIS_CHUNK:
                break
            after = "(" + as_text(entries[-1][0])
    else:
        # No archive: the final records are only in the ledger, for CGRID_LEDGER_TTL_S.
        for ids in _scan_ids(client, prefix):
            sources.scanned_records += _write_records(client, prefix, ids, day, stored_buyer, out)


def _scan_ids(client: redis.Redis, prefix: str) -> Iterator[list[str]]:
    ids: list[str] = []
    skip = len(prefix) + 3
    for key in client.scan_iter(match=prefix + "ev:*", count=REDIS_CHUNK):
        ids.append(as_text(key)[skip:])
        if len(ids) >= REDIS_CHUNK:
            yield ids
            ids = []
    if ids:
        yield ids


# -- the matching ------------------------------------------------------------------------------------


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _connect(workdir: Path) -> duckdb.DuckDBPyConnection:
    spill = workdir / "spill"
    spill.mkdir()
    db = duckdb.connect(config={"threads": DUCKDB_THREADS, "memory_limit": DUCKDB_MEMORY_LIMIT,
                                "temp_directory": str(spill), "preserve_insertion_order": False})
    db.execute("SET enable_progress_bar = false")
    return db


def _json_source(sources: Sources, columns: str) -> str:
    files = ", ".join(_quote(str(p)) for p in [*sources.files, sources.hot_path])
    return (f"read_json([{files}], format='newline_delimited', ignore_errors=true, "
            f"maximum_object_size=16777216, columns={{{columns}}})")


@dataclass
class Result:
    """The reconciliation, in a DuckDB connection: summary figures and per-hour counts
    here, the differing rows in its tables ``ours_only`` and ``theirs_only``."""

    db: duckdb.DuckDBPyConnection
    their_file: Theirs
    ours: int
    theirs: int
    matched: int | None
    hours: list[dict[str, Any]]
    ours_only: int = 0
    theirs_only: int = 0

    @property
    def form(self) -> Form:
        return self.their_file.form

    @property
    def discrepancy_pct(self) -> float | None:
        return discrepancy_pct(self.ours, self.theirs)


def discrepancy_pct(ours: int, theirs: int) -> float | None:
    """100 × (ours − theirs) / ours; 0 when both are 0; None (no ratio) when ours is 0 alone."""
    if ours == 0:
        return 0.0 if theirs == 0 else None
    return round(100.0 * (ours - theirs) / ours, 4)


def above_threshold(pct: float | None, threshold_pct: float) -> bool:
    return pct is None or abs(pct) > threshold_pct


def reconcile(sources: Sources, theirs: Theirs, *, day: str, buyer: str, kind: str | None,
              workdir: Path) -> Result:
    """Match our records of the buyer's day with their rows (see :func:`_count_keys` and
    :func:`_differing_rows`); the evidence is in the result's tables."""
    db = _connect(workdir)
    ours_sql = _ours_sql(sources, theirs, day=day, buyer=buyer, kind=kind)
    if theirs.form is Form.COUNTS:
        db.execute(f"CREATE TEMP TABLE recs AS SELECT min(st) AS st, min(hour) AS hour FROM ({ours_sql}) "
                   "GROUP BY k1, k2")
        per_hour = dict(db.execute("SELECT hour, count(*) FROM recs WHERE st = 0 GROUP BY hour").fetchall())
        hours = sorted(set(per_hour) | set(theirs.hour_counts))
        return Result(db, theirs, sum(per_hour.values()), sum(theirs.hour_counts.values()), None,
                      [_hour_row(h, int(per_hour.get(h, 0)), theirs.hour_counts.get(h, 0)) for h in hours])
    ours_by_hour = _count_keys(db, theirs, ours_sql)
    _differing_rows(db, theirs, _ours_sql(sources, theirs, day=day, buyer=buyer, kind=kind, evidence=True))
    ours = sum(ours_by_hour.values())
    ours_only = dict(db.execute("SELECT hour, count(*) FROM ours_only GROUP BY hour").fetchall())
    theirs_only = dict(db.execute("SELECT hour, count(*) FROM theirs_only GROUP BY hour").fetchall())
    hours = sorted(set(ours_by_hour) | set(theirs_only), key=lambda h: (h is None, h or 0))
    result = Result(db, theirs, ours, theirs.rows, ours - sum(ours_only.values()), [
        _hour_row(h, ours_by_hour.get(h, 0), ours_by_hour.get(h, 0) - ours_only.get(h, 0) + theirs_only.get(h, 0))
        for h in hours])
    result.ours_only, result.theirs_only = sum(ours_only.values()), sum(theirs_only.values())
    return result


# A state as a number that orders a record's copies: the final state first (a record read
# while open and again once final counts as final), delivered first of all.
_STATE_CODE = ("CASE state WHEN 'delivered' THEN 0 WHEN 'failed' THEN 1 WHEN 'expired' THEN 2 WHEN 'rejected' THEN 3 "
               "WHEN 'retry_scheduled' THEN 8 ELSE 9 END::UTINYINT")


def _hash128(text_sql: str, prefix: str) -> str:
    """Two 64-bit hashes of a text (``prefix``1, ``prefix``2): the keys that are grouped
    and joined on, 16 bytes however long the id. Two different ids share both with a chance
    of about n²/2¹²⁹ (10⁻²⁴ for 20 million); the differing rows are matched on the text."""
    return f"hash({text_sql}) AS {prefix}1, hash({text_sql} || chr(30)) AS {prefix}2"


def _key_text(theirs: Theirs) -> str:
    if theirs.form is not Form.AUCTIONS:
        return "id"
    return "auction_id || chr(31) || imp_id" if theirs.with_imp else "auction_id"


def _ours_sql(sources: Sources, theirs: Theirs, *, day: str, buyer: str, kind: str | None,
              evidence: bool = False) -> str:
    """Our records of the buyer's day (every copy read): id and key hashes, state code, hour;
    with ``evidence`` also the texts, the creation time, the attempts and the reason."""
    auctions = theirs.form is Form.AUCTIONS
    columns = ("'id': 'VARCHAR', 'state': 'VARCHAR', 'day': 'VARCHAR', 'buyer': 'VARCHAR', 'kind': 'VARCHAR', "
               "'event': 'STRUCT(created_at DOUBLE" +
               (', macros STRUCT("AUCTION_ID" VARCHAR, "AUCTION_IMP_ID" VARCHAR))' if auctions else ")") + "'" +
               (", 'attempts': 'JSON', 'reason': 'VARCHAR'" if evidence else ""))
    keys = ("coalesce(event.macros.\"AUCTION_ID\", '') AS auction_id, "
            "coalesce(event.macros.\"AUCTION_IMP_ID\", '') AS imp_id, " if auctions else "")
    extra = ", id, state, created_at, attempts, reason" + (", auction_id, imp_id" if auctions else "")
    if evidence:  # only the keys that differ are wanted: the first hash finds them, the texts match them
        hashes = f"hash({_key_text(theirs)}) AS k1"
    elif auctions:  # one record per event, then per key
        hashes = f"{_hash128('id', 'i')}, {_hash128(_key_text(theirs), 'k')}"
    else:
        hashes = _hash128("id", "k")
    return f"""
        SELECT {hashes}, st, hour {extra if evidence else ""}
        FROM (
            SELECT id, state, {keys} {_STATE_CODE} AS st, event.created_at AS created_at,
                   floor(event.created_at / 3600)::INTEGER AS hour {", attempts, reason" if evidence else ""}
            FROM {_json_source(sources, columns)}
            WHERE day = {_quote(day)} AND buyer = {_quote(buyer)} AND id IS NOT NULL
                  {f"AND kind = {_quote(kind)}" if kind else ""}
        )
    """


def _their_rows_sql(theirs: Theirs) -> str:
    """Their rows, numbered in file order (``rownum``, blank lines skipped, as
    :func:`read_theirs` counted them: ``Theirs.line_of`` gives the line), with the key hashes.
    Read with ``preserve_insertion_order`` on."""
    names = [f"c{i}" for i in range(theirs.width)]
    columns = ", ".join(f"'{n}': 'VARCHAR'" for n in names)
    if theirs.form is Form.IDS:
        values = f"trim(c{theirs.columns['id']}, ' \t') AS id"
    else:
        imp_at = theirs.columns.get("imp_id")
        values = (f"trim(c{theirs.columns['auction_id']}, ' \t') AS auction_id, "
                  + (f"coalesce(trim(c{imp_at}, ' \t'), '')" if imp_at is not None else "''") + " AS imp_id")
    return f"""
        SELECT *, {_hash128(_key_text(theirs), "k")} FROM (
            SELECT row_number() OVER () AS rownum, {values}
            FROM read_csv({_quote(str(theirs.path))}, header=false, skip={theirs.header_lines}, delim=',',
                          quote='"', escape='"', auto_detect=false, strict_mode=true, columns={{{columns}}})
            WHERE {" OR ".join(f"{n} IS NOT NULL" for n in names)}
        )
    """


def _count_keys(db: duckdb.DuckDBPyConnection, theirs: Theirs, ours_sql: str) -> dict[int | None, int]:
    """Per match key (an id, or an auction and impression): how many delivered notices of
    ours and rows of theirs. The keys whose counts differ are the ``differing`` table; our
    delivered notices per hour are returned. Only hashes and numbers are held, for speed
    and memory: 10 million keys on each side."""
    db.execute("SET preserve_insertion_order = true")  # rownum is the file's order
    db.execute(f"CREATE TEMP TABLE their_keys AS SELECT rownum, k1, k2 FROM ({_their_rows_sql(theirs)})")
    db.execute("SET preserve_insertion_order = false")
    if theirs.form is Form.IDS:  # the key is the id: one grouping counts both sides
        db.execute(f"""
            CREATE TEMP TABLE keys AS
            SELECT k1, k2, coalesce(min(st) = 0, false)::INTEGER AS ours_n, count(rownum) AS their_n, min(hour) AS hour
            FROM (SELECT k1, k2, st, hour, NULL::BIGINT AS rownum FROM ({ours_sql})
                  UNION ALL SELECT k1, k2, NULL, NULL, rownum FROM their_keys)
            GROUP BY k1, k2
        """)
        per_hour = db.execute("SELECT hour, count(*) FROM keys WHERE ours_n = 1 GROUP BY hour").fetchall()
    else:  # one record per event first (its copies), then per key
        db.execute(f"""
            CREATE TEMP TABLE recs AS
            SELECT min(st) AS st, min(hour) AS hour, min(k1) AS k1, min(k2) AS k2 FROM ({ours_sql}) GROUP BY i1, i2
        """)
        db.execute("""
            CREATE TEMP TABLE keys AS
            SELECT k1, k2, count(*) FILTER (st = 0) AS ours_n, count(rownum) AS their_n
            FROM (SELECT k1, k2, st, NULL::BIGINT AS rownum FROM recs
                  UNION ALL SELECT k1, k2, NULL, rownum FROM their_keys)
            GROUP BY k1, k2
        """)
        per_hour = db.execute("SELECT hour, count(*) FROM recs WHERE st = 0 GROUP BY hour").fetchall()
        db.execute("DROP TABLE recs")
    db.execute("CREATE TEMP TABLE differing AS SELECT k1, k2 FROM keys WHERE ours_n <> their_n")
    db.execute("DROP TABLE keys")
    db.execute("DROP TABLE their_keys")
    return {hour: int(count) for hour, count in per_hour}


def _differing_rows(db: duckdb.DuckDBPyConnection, theirs: Theirs, evidence_sql: str) -> None:
    """For the keys whose counts differ, our records (with their evidence: attempts, reason)
    and their rows, read again with their texts; within a key the n-th row of theirs
    (file order) matches our n-th delivered notice (oldest first): a win and a billing
    notice of one impression are two notices. What is left over is ``ours_only`` and
    ``theirs_only``; a row of theirs left over shows our record of that key that was not
    delivered, if any (else a delivered one: the buyer counted it more often than we called)."""
    text = ["id"] if theirs.form is Form.IDS else ["auction_id", "imp_id"] if theirs.with_imp else ["auction_id"]
    key = ", ".join(text)
    db.execute(f"""
        CREATE TEMP TABLE ev AS
        SELECT id, arg_min(state, st) AS state, min(st) AS st, min(hour) AS hour, min(created_at) AS created_at,
               {"".join(f"any_value({c}) AS {c}, " for c in text if c != "id")}
               arg_min(attempts, st) AS attempts, arg_min(reason, st) AS reason
        FROM ({evidence_sql}) j SEMI JOIN differing USING (k1)
        GROUP BY id
    """)
    db.execute("SET preserve_insertion_order = true")
    db.execute(f"CREATE TEMP TABLE their_diff AS SELECT * FROM ({_their_rows_sql(theirs)}) t "
               "SEMI JOIN differing USING (k1)")
    db.execute("SET preserve_insertion_order = false")
    on = " AND ".join(f"o.{c} = t.{c}" for c in text)
    db.execute(f"""
        CREATE TEMP TABLE matched AS
        SELECT o.id, t.rownum FROM
            (SELECT id, {key}, row_number() OVER (PARTITION BY {key} ORDER BY created_at, id) AS n
             FROM ev WHERE st = 0) o
        JOIN (SELECT rownum, {key}, row_number() OVER (PARTITION BY {key} ORDER BY rownum) AS n FROM their_diff) t
        ON {on} AND o.n = t.n
    """)
    db.execute("CREATE TEMP TABLE ours_only AS SELECT * FROM ev WHERE st = 0 AND id NOT IN (SELECT id FROM matched)")
    db.execute(f"""
        CREATE TEMP TABLE theirs_only AS
        SELECT t.rownum, {", ".join(f"t.{c}" for c in text)}, b.r.id AS our_id, b.r.state AS state, b.r.hour AS hour,
               b.r.attempts AS attempts, b.r.reason AS reason
        FROM their_diff t
        LEFT JOIN (SELECT {key}, arg_min({{'id': id, 'state': state, 'hour': hour, 'attempts': attempts,
                                          'reason': reason}}, (st = 0, created_at)) AS r
                   FROM ev GROUP BY {key}) b ON {on.replace("o.", "b.")}
        WHERE t.rownum NOT IN (SELECT rownum FROM matched)
    """)


def _hour_row(hour: int | None, ours: int, theirs: int) -> dict[str, Any]:
    return {"hour": hour_text(hour), "ours": int(ours), "theirs": int(theirs),
            "discrepancy_pct": discrepancy_pct(int(ours), int(theirs))}


def _attempts(text: str | None) -> list[dict[str, Any]]:
    """The attempts as the evidence shows them: n, status, error, started_at (ISO, UTC), ms."""
    if not text:
        return []
    out = []
    for item in json.loads(text):
        if not isinstance(item, dict):
            continue
        started = item.get("started_at")
        at = (datetime.datetime.fromtimestamp(started, datetime.UTC).isoformat(timespec="milliseconds")
              .replace("+00:00", "Z") if isinstance(started, int | float) else None)
        out.append({"n": item.get("n"), "status": item.get("status"), "error": item.get("error"),
                    "started_at": at, "ms": item.get("ms")})
    return out


def ours_only_rows(result: Result) -> Iterator[dict[str, Any]]:
    """Our delivered events the buyer's file lacks, oldest first, with their attempts."""
    if result.form is Form.COUNTS:
        return  # counts say which hours differ, not which notices
    auctions = result.form is Form.AUCTIONS
    imp = "imp_id" if result.their_file.with_imp else "NULL"
    cursor = result.db.execute(f"""
        SELECT id, state, hour, {f"auction_id, {imp}" if auctions else "NULL, NULL"}, attempts
        FROM ours_only ORDER BY created_at, id
    """)
    while batch := cursor.fetchmany(10_000):
        for event_id, state, hour, auction_id, imp_id, attempts in batch:
            row: dict[str, Any] = {"id": event_id, "state": state, "hour": hour_text(hour)}
            if auctions:
                row["auction_id"] = auction_id
                if result.their_file.with_imp:
                    row["imp_id"] = imp_id
            row["attempts"] = _attempts(attempts)
            yield row


def theirs_only_rows(result: Result) -> Iterator[dict[str, Any]]:
    """The buyer's rows with no delivered notice of ours, in file order; with our record of
    that id (or key) where we have one: its state and attempts."""
    if result.form is Form.COUNTS:
        return
    ids = result.form is Form.IDS
    with_imp = result.their_file.with_imp
    cursor = result.db.execute(f"""
        SELECT rownum, {"id" if ids else "auction_id"}, {"imp_id" if with_imp else "NULL"}, our_id, state, hour,
               attempts, reason
        FROM theirs_only ORDER BY rownum
    """)
    while batch := cursor.fetchmany(10_000):
        for rownum, key, imp_id, our_id, state, hour, attempts, reason in batch:
            row: dict[str, Any] = {"line": result.their_file.line_of(rownum)}
            if ids:
                row["id"] = key
            else:
                row["auction_id"] = key
                if with_imp:
                    row["imp_id"] = imp_id
            row["state"] = state  # None: no record of ours (of this buyer, day and kind)
            if our_id is not None:
                if not ids:
                    row["our_id"] = our_id
                row["hour"] = hour_text(hour)
                row["attempts"] = _attempts(attempts)
                if reason:
                    row["reason"] = reason
                if state == "delivered":
                    row["note"] = "counted again: our notice was matched by another row"
            yield row


# -- output -------------------------------------------------------------------------------------------


def summary(result: Result, *, buyer: str, day: str, kind: str | None, sources: Sources,
            threshold_pct: float) -> dict[str, Any]:
    out: dict[str, Any] = {
        "buyer": buyer, "date": day, "kind": kind, "form": result.form.value,
        "ours": result.ours, "theirs": result.theirs, "matched": result.matched,
        "discrepancy_pct": result.discrepancy_pct, "threshold_pct": threshold_pct,
        "above_threshold": above_threshold(result.discrepancy_pct, threshold_pct),
        "sources": {"archive_files": len(sources.files), "open_in_ledger": sources.open_records,
                    "archive_stream": sources.stream_records if sources.archive_stream else None,
                    "ledger_scan": sources.scanned_records if not sources.archive_stream else None},
    }
    if not sources.archive_stream:
        out["warning"] = ("no archive stream (no archiver has run): final records were read from the ledger, "
                          "which keeps them CGRID_LEDGER_TTL_S after they end")
    return out


def write_json(out: IO[str], result: Result, head: dict[str, Any]) -> None:
    """One JSON object, written as it goes (the differing rows can be millions)."""
    out.write("{\n")
    for key, value in head.items():
        out.write(f"  {json.dumps(key)}: {json.dumps(value)},\n")
    for name, rows in (("ours_only", ours_only_rows(result)), ("theirs_only", theirs_only_rows(result))):
        out.write(f"  {json.dumps(name)}: [")
        first = True
        for row in rows:
            out.write(("\n    " if first else ",\n    ") + json.dumps(row, separators=(",", ":")))
            first = False
        out.write("\n  ],\n" if not first else "],\n")
    out.write(f'  "hours": {json.dumps(result.hours)}\n}}\n')


CSV_FIELDS = ["side", "line", "id", "auction_id", "imp_id", "our_id", "state", "hour", "attempts"]


def _attempts_cell(attempts: list[dict[str, Any]]) -> str:
    """``1:503@2026-11-25T10:00:00.123Z;2:204@…`` (an error class in place of a status)."""
    return ";".join(f"{a['n']}:{a['status'] if a['status'] is not None else a['error']}@{a['started_at']}"
                    for a in attempts)


def write_csv(out: IO[str], result: Result) -> None:
    """The differing rows (the hours that differ, for a file of counts)."""
    writer = csv.writer(out, lineterminator="\n")
    if result.form is Form.COUNTS:
        writer.writerow(["hour", "ours", "theirs", "discrepancy_pct"])
        for hour in result.hours:
            if hour["ours"] != hour["theirs"]:
                writer.writerow([hour["hour"], hour["ours"], hour["theirs"], hour["discrepancy_pct"]])
        return
    writer.writerow(CSV_FIELDS)
    for row in ours_only_rows(result):
        writer.writerow(["ours_only", "", row["id"], row.get("auction_id", ""), row.get("imp_id", ""), row["id"],
                         row["state"], row["hour"], _attempts_cell(row["attempts"])])
    for row in theirs_only_rows(result):
        writer.writerow(["theirs_only", row["line"], row.get("id", ""), row.get("auction_id", ""),
                         row.get("imp_id", ""), row.get("our_id", row.get("id", "") if row["state"] else ""),
                         row["state"] or "", row.get("hour", ""), _attempts_cell(row.get("attempts", []))])


def _pct(value: float | None) -> str:
    return "n/a (none of ours)" if value is None else f"{value:+.2f}%"


def write_plain(out: IO[str], result: Result, head: dict[str, Any]) -> None:
    kind = head["kind"] or "nurl and burl"
    out.write(f"buyer {head['buyer']}, {head['date']} (UTC), {kind}: our delivered notices against the buyer's "
              f"file ({result.form.value})\n")
    out.write(f"ours {result.ours:,}  theirs {result.theirs:,}  "
              + (f"matched {result.matched:,}  " if result.matched is not None else "")
              + f"discrepancy {_pct(result.discrepancy_pct)} (threshold {head['threshold_pct']:g}%"
              + (", ABOVE)" if head["above_threshold"] else ")") + "\n")
    if result.form is not Form.COUNTS:
        out.write(f"ours only {result.ours_only:,}  theirs only {result.theirs_only:,}  "
                  "(--json or --csv lists them, with our attempts as evidence)\n")
    if "warning" in head:
        out.write(f"warning: {head['warning']}\n")
    out.write(f"\n{'hour (UTC)':14} {'ours':>10} {'theirs':>10} {'discrepancy':>12}\n")
    for hour in result.hours:
        out.write(f"{hour['hour']:14} {hour['ours']:>10,} {hour['theirs']:>10,} {_pct(hour['discrepancy_pct']):>12}\n")


# -- the command -----------------------------------------------------------------------------------


def run(client: redis.Redis, archive_root: Path, *, file: str, buyer: str, day: str, kind: str | None,
        output: str, threshold_pct: float, out: IO[str] | None = None,
        keyspaces: Sequence[tuple[str, str]] = ((PREFIX, ""),), queues: Sequence[str] = Routing().queues) -> int:
    """The whole command: 0, or 1 when |discrepancy_pct| is above the threshold. A bad file
    raises :class:`BadFile` (exit 2)."""
    out = out or sys.stdout
    with tempfile.TemporaryDirectory(prefix="cgrid-reconcile-") as tmp:
        workdir = Path(tmp)
        if file == "-":
            path, name = workdir / "stdin.csv", "standard input"
            with open(path, "wb") as copy:
                shutil.copyfileobj(sys.stdin.buffer, copy, 1 << 20)
        else:
            path, name = Path(file), file
        try:
            theirs = read_theirs(path, name, day)
        except OSError as e:
            raise BadFile(f"{file}: cannot be read: {e.strerror or e}") from None
        sources = gather_ours(client, archive_root, day, buyer, workdir, keyspaces, queues)
        try:
            result = reconcile(sources, theirs, day=day, buyer=buyer, kind=kind, workdir=workdir)
        except duckdb.Error as e:
            raise ReadFailed(f"reconcile: reading or matching failed: {str(e).splitlines()[0][:500]}") from None
        head = summary(result, buyer=buyer, day=day, kind=kind, sources=sources, threshold_pct=threshold_pct)
        if output == "json":
            write_json(out, result, head)
        elif output == "csv":
            write_csv(out, result)
        else:
            write_plain(out, result, head)
        result.db.close()
    return 1 if head["above_threshold"] else 0
