"""The archive of final ledger records: daily JSON-lines files, and how to read them back.

The ledger scripts add every record that becomes final (``delivered``, ``failed``,
``rejected``, ``expired``) to the Redis stream ``P archive`` in the same script that makes
it final; the archiver (``archive/archiver.py``, ``cgrid-s2s archive``) appends them to

    <dir>/<YYYY-MM-DD>/<name>.jsonl

where the day is the UTC day of the event's ``created_at`` (the report's day) and the name
is the archiver's (its host name by default): one file per archiver and day, so archivers
never write the same file. One line per final record (``docs/archive.md``)::

    {"entry": "1764100000000-0/0", "id": "a1:imp1:burl", "state": "delivered", "day": "2026-11-25",
     "buyer": "dsp-7", "kind": "burl", "accepted_at": 1764099999.9, "finished_at": 1764100000.1,
     "attempts": [{"n": 1, "started_at": ..., "ms": 41.2, "status": 204, "error": null}],
     "event": {...the final record's event: no user agent, no IP chain; URL and macros
               only for failed events...}}

``entry`` is the stream entry's id and the record's place in it (``<id>/<n>``; an entry of
the earlier formats holds one record, ``<id>``): unique per final record, the key to
de-duplicate on.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import orjson
import redis

from cgrid.ledger import ARCHIVE_FORMAT_KEY, ARCHIVE_LINES_FORMAT, PREFIX, json_or_raw

STREAM = "archive"  # the stream's key is the ledger prefix + this
# A batch entry, a script's records in one entry: `lines` = the time they became final, then
# a field per record, its line (value '') or the worker's two parts of it (value: its
# accepted_at; cgrid/ledger/scripts/common.lua). The formats before: one field, `line`; a
# field per value (no mark). ``P archive:format`` (ARCHIVE_FORMAT_KEY) says which the scripts write.
GROUP = "archivers"  # the archivers' consumer group
UNKNOWN_DAY = "unknown-day"  # a record without a readable day (a corrupt one) goes here
_DAY = re.compile(r"\d{4}-\d{2}-\d{2}\Z")
_READ_CHUNK = 64 * 1024


def stream_key(prefix: str = PREFIX) -> str:
    return prefix + STREAM


def ensure_group(client: redis.Redis, prefix: str = PREFIX) -> None:
    """Make the stream and the archivers' group (from the stream's start) if missing, and
    say that this archiver reads batch entries (``P archive:format`` ``lines``). From then
    on the ledger scripts add every final record to the stream, a script's records in one
    entry (until an archiver has said so, in the previous formats: one-field ``line``
    entries, or a field per value)."""
    try:
        client.xgroup_create(stream_key(prefix), GROUP, id="0", mkstream=True)
    except redis.ResponseError as e:
        # (a full Redis refuses XGROUP CREATE even when there is nothing to make)
        full_with_group = isinstance(e, redis.exceptions.OutOfMemoryError) and _group_exists(client, prefix)
        if "BUSYGROUP" not in str(e) and not full_with_group:
            raise
    with contextlib.suppress(redis.exceptions.OutOfMemoryError):  # full: the entries keep the previous format
        client.set(prefix + ARCHIVE_FORMAT_KEY, ARCHIVE_LINES_FORMAT)


def _group_exists(client: redis.Redis, prefix: str) -> bool:
    try:
        groups: Any = client.xinfo_groups(stream_key(prefix))
    except redis.ResponseError:  # no such stream
        return False
    return any(as_text(group.get("name", b"")) == GROUP for group in groups)


def as_text(value: Any) -> str:
    """A stream entry's id or field as text (an undecodable byte is replaced, never fatal)."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _float_or_none(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


LINE_FIELD = b"line"  # an entry's one field: its line without the entry id (the ledger scripts make it)
LINES_FIELD = b"lines"  # a batch entry's first field (its value: when its records became final)
_ENTRY_ID = re.compile(r"[0-9]+-[0-9]+(/[0-9]+)?")
_LINE_DAY = re.compile(rb',"day":"(\d{4}-\d{2}-\d{2})"')


def batch_records(fields: Mapping[Any, Any]) -> int:
    """How many records an entry holds that count in ``P archive:records`` (those of a
    batch entry; 0 for an entry of the earlier formats)."""
    return len(fields) - 1 if next(iter(fields), None) in (LINES_FIELD, "lines") else 0


def _bytes(value: Any) -> bytes:
    return value.encode() if isinstance(value, str) else bytes(value)


def archive_lines(entry_id: str, fields: Mapping[Any, Any]) -> list[tuple[str, str, bytes]]:
    """(entry, day, JSON line) of each record of one stream entry. A batch entry's records
    are ``<entry id>/<n>`` (n from 0, in the entry's order: the same however often it is
    read); an entry of the earlier formats holds one, ``<entry id>``."""
    if next(iter(fields), None) not in (LINES_FIELD, "lines"):
        return [(entry_id, *archive_line(entry_id, fields))]
    items = iter(fields.items())
    _, finished_at = next(items)
    out = []
    for n, (line, accepted_at) in enumerate(items):
        entry = f"{entry_id}/{n}"
        body = _bytes(line)
        if accepted_at:
            # A line the worker made: its two parts, the times go between them (the format:
            # cgrid/ledger/scripts/common.lua).
            head, _, tail = body.partition(b"\n")
            body = (head + b',"accepted_at":' + _bytes(accepted_at) + b',"finished_at":' + _bytes(finished_at)
                    + b"," + tail)
        out.append((entry, *_made_line(entry, body)))
    return out


def archive_line(entry_id: str, fields: Mapping[Any, Any]) -> tuple[str, bytes]:
    """The day (the file it goes to) and the JSON line of one stream entry: the line the
    ledger script made (one field, ``line``), or made here from an entry of the previous
    format (a field per value, still read: entries left in the stream by an older fleet)."""
    if len(fields) == 1:
        body = fields.get(LINE_FIELD)
        if body is None:
            body = fields.get("line")
            body = body.encode() if isinstance(body, str) else body
        if isinstance(body, bytes):
            return _made_line(entry_id, body)
    return _line_of_fields(entry_id, fields)


def _made_line(entry_id: str, body: bytes) -> tuple[str, bytes]:
    """The line of a ``line`` entry: the entry id put in front; checked to be JSON (a record
    whose attempt was corrupt in Redis is written as {"entry", "day", "unreadable"}) and
    written with non-ASCII escaped, as every line is."""
    # (an entry id is a stream id, digits and '-', with '/<n>' for a batch's record)
    entry = entry_id.encode() if _ENTRY_ID.fullmatch(entry_id) else json.dumps(entry_id)[1:-1].encode()
    line = b'{"entry":"' + entry + b'",' + body + b"\n"
    record = _json_object(line)
    if not isinstance(record, dict):
        found = _LINE_DAY.search(body)
        day = found.group(1).decode() if found else UNKNOWN_DAY
        broken = {"entry": entry_id, "day": day, "unreadable": body[:2000].decode("utf-8", "replace")}
        return day, (json.dumps(broken, separators=(",", ":")) + "\n").encode()
    day = record.get("day")
    if not isinstance(day, str) or not _DAY.match(day):
        day = UNKNOWN_DAY
    if not line.isascii():
        line = (json.dumps(json.loads(line), separators=(",", ":")) + "\n").encode()
    return day, line


def _json_object(line: bytes) -> Any:
    """The line decoded, or None when it is not JSON. orjson accepts less than json (no NaN,
    no lone surrogates, RFC 8259 only) at a quarter of its CPU: what it refuses, json decides."""
    try:
        return orjson.loads(line)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(line)
    except ValueError:
        return None


def _line_of_fields(entry_id: str, fields: Mapping[Any, Any]) -> tuple[str, bytes]:
    text = {as_text(k): as_text(v) for k, v in fields.items()}
    day = text.get("day", "")
    if not _DAY.match(day):
        day = UNKNOWN_DAY
    record: dict[str, Any] = {
        "entry": entry_id,
        "id": text.get("id", ""),
        "state": text.get("state", ""),
        "day": text.get("day", ""),
        "buyer": text.get("buyer", ""),
        "kind": text.get("kind", ""),
        "accepted_at": _float_or_none(text.get("accepted_at", "")),
        "finished_at": _float_or_none(text.get("finished_at", "")),
        "attempts": [json_or_raw(text[key]) for key in ("a1", "a2") if text.get(key)],
    }
    if text.get("reason"):
        record["reason"] = text["reason"]
    record["event"] = json_or_raw(text["event"]) if text.get("event") else None
    return day, (json.dumps(record, separators=(",", ":")) + "\n").encode()


def file_for(root: Path, day: str, name: str) -> Path:
    return root / day / f"{name}.jsonl"


def recover_tail(path: Path, keep_lines: int) -> set[str]:
    """Cut a torn last line (an archiver killed mid-write) and return the entry ids of the
    last ``keep_lines`` complete lines: the only ones an unacknowledged batch can be in."""
    with open(path, "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        pos, buf = size, b""
        while pos > 0 and buf.count(b"\n") <= keep_lines:
            step = min(_READ_CHUNK, pos)
            pos -= step
            f.seek(pos)
            buf = f.read(step) + buf
        complete = buf.rfind(b"\n") + 1
        if pos + complete < size:
            f.truncate(pos + complete)
            f.flush()
            os.fsync(f.fileno())
    lines = buf[:complete].split(b"\n")[:-1]
    if pos > 0:
        lines = lines[1:]  # the first may have started before what was read
    ids: set[str] = set()
    for line in lines[-keep_lines:]:
        try:
            entry = json.loads(line).get("entry")
        except (ValueError, AttributeError):
            continue
        if isinstance(entry, str):
            ids.add(entry)
    return ids


def read_lines(path: Path, containing: bytes = b"") -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) of every complete, readable line of an archive file (only the
    lines ``containing`` those bytes, a cheap filter before the JSON is decoded)."""
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if not line.endswith(b"\n"):
                return  # a torn last line: the archiver writes it again
            if containing not in line:
                continue
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                yield number, record


def find_event(root: Path, day: str, event_id: str) -> list[dict[str, Any]]:
    """The archived records of ``event_id`` in the files of ``day``, oldest first: usually
    one; two when a later line corrects the first (a retry given up as lost whose success
    arrived after: ``failed``, then ``delivered``). A record an archiver wrote twice after a
    crash or a takeover appears once per entry id."""
    needle = json.dumps(event_id).encode()
    found: dict[str, dict[str, Any]] = {}
    for path in sorted((root / day).glob("*.jsonl")):
        for _, record in read_lines(path, needle):
            if record.get("id") == event_id:
                found.setdefault(str(record.get("entry")), record)
    return sorted(found.values(),
                  key=lambda r: r["finished_at"] if isinstance(r.get("finished_at"), int | float) else 0)
