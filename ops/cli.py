"""The ``cgrid-s2s`` command line: publish, status, report, reconcile, decrypt, replay, archive, mock-dsp
(SPEC §10)."""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import json
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, BinaryIO

from cgrid.buyers import BuyersFile
from cgrid.errors import CgridError, InvalidEvent, PublishFailed, RedisUnavailable
from cgrid.event import Event, parse_event
from cgrid.ledger import POISON_LIST_KEY, WAIT_DETAILS, Counter, Ledger, WaitReason
from cgrid.ledger.partitions import ledger_for
from cgrid.price_crypto import PriceCryptoError, decrypt
from cgrid.redis_conn import mask_url, redis_client
from cgrid.settings import Settings
from ops.reconcile import DEFAULT_THRESHOLD_PCT

if TYPE_CHECKING:
    from ops.replay import Replayed

REPORT_COLUMNS = [
    ("day", "day"),
    ("buyer", "buyer"),
    (Counter.EVENTS, "events"),
    (Counter.DELIVERED_FIRST, "first try"),
    (Counter.DELIVERED_RETRY, "on retry"),
    (Counter.FAILED, "failed"),
    (Counter.REJECTED, "rejected"),
    (Counter.EXPIRED, "expired"),
    (Counter.UNEXPECTED, "unexpected"),
    ("p50_ms", "p50 ms"),
    ("p99_ms", "p99 ms"),
]
# The machine-readable columns (--json, --csv): the table's, and how many calls were timed.
REPORT_FIELDS = [key for key, _ in REPORT_COLUMNS] + ["calls_timed"]


def _ledger(settings: Settings) -> Ledger:
    client = redis_client(settings, socket_timeout_s=settings.publish_timeout_s,
                          socket_connect_timeout_s=settings.publish_timeout_s)
    return ledger_for(settings, client)


def parse_line(raw: bytes) -> Event:
    """One line of a JSON-lines file as an event; raises InvalidEvent naming the field (or
    ``event`` for a line that is not UTF-8 or not JSON), never anything else."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidEvent("event", f"not UTF-8 (byte {e.start + 1} of the line)") from None
    try:
        data = json.loads(text)
    except RecursionError:
        raise InvalidEvent("event", "not valid JSON (nested too deeply)") from None
    except ValueError as e:
        raise InvalidEvent("event", f"not valid JSON ({e})") from None
    return parse_event(data)


def cmd_publish(args: argparse.Namespace, settings: Settings) -> int:
    """Publish JSON-lines events. An id is printed only once its event is accepted (in the
    ledger): lines are sent in batches, each flushed before its ids are printed; from
    standard input each line is sent as it comes, so a pipe sees its ids at once. Each line
    is refused or accepted on its own: a refused line is named by its number on stderr,
    and the exit code is 1. If Redis cannot take them, nothing of that batch is printed,
    the error says how many events were not accepted, and the exit code is 2."""
    from producer.publisher import Publisher

    source: BinaryIO = open(args.file, "rb") if args.file not in (None, "-") else sys.stdin.buffer
    chunk_max = 1 if args.file in (None, "-") or args.sync else settings.batch_size
    errors = 0
    chunk: list[tuple[int, Event]] = []  # (line number, event)
    publisher = Publisher(settings, linger_ms=0 if args.sync else None)

    def send_chunk() -> None:
        nonlocal errors
        failed: dict[str, BaseException] = {}
        try:
            publisher.publish_many([event for _, event in chunk])
            publisher.flush()
        except PublishFailed as e:  # the chunk's other events are accepted
            failed = dict(zip(e.event_ids, e.errors, strict=True))
        for number, event in chunk:
            if event.id in failed:
                error = failed[event.id]
                print(f"line {number}: not accepted ({type(error).__name__}: {error})", file=sys.stderr)
                errors += 1
            else:
                print(event.id, flush=chunk_max == 1)
        chunk.clear()

    try:
        with source:
            for number, line in enumerate(source, start=1):
                if not line.strip():
                    continue
                try:
                    chunk.append((number, parse_line(line)))
                except InvalidEvent as e:
                    print(f"line {number}: {e}", file=sys.stderr)
                    errors += 1
                    continue
                if len(chunk) >= chunk_max:
                    send_chunk()
            if chunk:
                send_chunk()
        publisher.close()
    except RedisUnavailable as e:
        dropped = publisher.discard()  # reported as not accepted: never sent later
        print(f"cgrid-s2s: {dropped} events were NOT accepted and their ids were not printed: {e}",
              file=sys.stderr)
        publisher.close()
        return 2
    return 1 if errors else 0


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    record = _ledger(settings).record(args.id)
    if record is None:
        return status_from_archive(args, settings)
    waiting = record.get("waiting")
    # Parked while its lane was full, and its buyer has been paused since.
    if (waiting and waiting["reason"] == WaitReason.LANE_FULL and settings.buyers_file
            and BuyersFile.for_settings(settings).config.get(waiting.get("buyer")).paused):
        waiting.update(reason=WaitReason.PAUSED.value, detail=WAIT_DETAILS[WaitReason.PAUSED])
    if waiting and waiting["reason"] == WaitReason.QUEUED:  # which queue needs a worker (docs/hosts.md)
        buyer = record["event"].get("buyer") if isinstance(record["event"], dict) else None
        waiting["queue"] = settings.routing.queue_for(buyer, 1 if record["state"] == "pending" else 2)
    print(json.dumps(record, indent=2))
    return 0


def status_from_archive(args: argparse.Namespace, settings: Settings) -> int:
    """An id not in the ledger: past its hot window (or never accepted). With --day, its
    archived final record is looked up in that day's archive files."""
    from pathlib import Path

    from archive.files import find_event

    root = Path(settings.archive_path)
    if args.day is None:
        print(f"unknown event id: {args.id}: not in the ledger, which keeps a record CGRID_LEDGER_TTL_S "
              f"({settings.ledger_ttl_s} s) after it became final (or it was never accepted). Final records are "
              f"archived in {root}/<day>/*.jsonl: cgrid-s2s status {args.id} --day YYYY-MM-DD looks there "
              "(the UTC day of its created_at)", file=sys.stderr)
        return 1
    found = find_event(root, args.day, args.id)
    if not found:
        print(f"unknown event id: {args.id}: not in the ledger, nor in {root / args.day}/*.jsonl", file=sys.stderr)
        return 1
    for record in found:
        print(json.dumps({**record, "archived": True}, indent=2))
    return 0


def cmd_decrypt(args: argparse.Namespace, settings: Settings) -> int:
    """Check an encrypted price with the buyer's keys from the buyers file."""
    if not settings.buyers_file:
        print("cgrid-s2s: decrypt needs CGRID_BUYERS_FILE (the buyer's price keys)", file=sys.stderr)
        return 2
    keys = BuyersFile.for_settings(settings).config.get(args.buyer).price_keys
    if keys is None:
        print(f"cgrid-s2s: buyer {args.buyer!r} has no price keys in {settings.buyers_file}", file=sys.stderr)
        return 1
    try:
        decrypted = decrypt(args.value, keys)
    except PriceCryptoError as e:
        print(f"cgrid-s2s: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"price": str(decrypted.price), "micros": decrypted.micros, "iv": decrypted.iv.hex(),
                      "signature": "valid"}, indent=2))
    return 0


def format_report(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no events in the ledger's report window"
    table = [[title for _, title in REPORT_COLUMNS]]
    table += [["-" if row[key] is None else f"{row[key]:g}" if isinstance(row[key], float) else str(row[key])
               for key, _ in REPORT_COLUMNS] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(REPORT_COLUMNS))]
    lines = []
    for index, line in enumerate(table):
        pairs = enumerate(zip(line, widths, strict=True))
        cells = [cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in pairs]
        lines.append("  ".join(cells).rstrip())
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def spreadsheet_safe(value: Any) -> Any:
    """A CSV cell a spreadsheet will not run: text starting with ``= + - @``, a tab or a CR
    (a buyer id ``=HYPERLINK(…)``) gets a leading ``'`` (OWASP's advice). ``-``, the row of
    events without a buyer, is left as it is; numbers are numbers."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r") and value != "-":
        return "'" + value
    return value


def cmd_report(args: argparse.Namespace, settings: Settings) -> int:
    ledger = _ledger(settings)
    rows = ledger.report(days=args.days, day=args.date, buyer=args.buyer)
    rows = [{key: row.get(key) for key in REPORT_FIELDS} for row in rows]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if args.csv:
        writer = csv.DictWriter(sys.stdout, fieldnames=REPORT_FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows({key: spreadsheet_safe(value) for key, value in row.items()} for row in rows)
        return 0
    print(format_report(rows))
    archive = ledger.archive_backlog()
    if archive is not None and archive[0]:
        print(f"\nfinal records not yet archived: {archive[0]} (the oldest {archive[1]:.0f} s old; "
              "is `cgrid-s2s archive` running?)")
    poisoned = ledger.poisoned()
    if poisoned:
        print(f"\npoisoned broker messages dropped: {poisoned} (the last ones: LRANGE {POISON_LIST_KEY} 0 -1)")
    return 0


def cmd_reconcile(args: argparse.Namespace, settings: Settings) -> int:
    """Compare a buyer's own export of a day's notices with our delivered ones: exit 1 when
    the discrepancy is above --threshold (docs/operations.md#reconciling-with-a-buyer)."""
    from pathlib import Path

    from ops.reconcile import run

    output = "json" if args.json else "csv" if args.csv else "plain"
    ledger = _ledger(settings)
    # The ledger's keyspaces: one, or a cluster's partitions (their archive entries carry the tag).
    keyspaces = [(prefix, f"{tag}/" if tag else "") for prefix, tag in ledger.keyspaces]
    return run(ledger.client, Path(settings.archive_path), file=args.file, buyer=args.buyer,
               day=args.date, kind=args.kind, output=output, threshold_pct=args.threshold, keyspaces=keyspaces,
               queues=settings.routing.queues)


def cmd_replay(args: argparse.Namespace, settings: Settings) -> int:
    """Publish the failed events of a buyer and day (or the ids given) again, as new events
    ``<id>:replay<n>``; prints each new id once it is accepted."""
    from ops.replay import replay
    from producer.publisher import Publisher

    if args.archive:
        return replay_from_archive(args, settings)
    if bool(args.ids) == bool(args.buyer or args.day):
        print("cgrid-s2s replay: give either ids, or --buyer B --day YYYY-MM-DD", file=sys.stderr)
        return 2
    if not args.ids and not (args.buyer and args.day):
        print("cgrid-s2s replay: --buyer and --day go together", file=sys.stderr)
        return 2
    with Publisher(settings, linger_ms=0) as publisher:
        ids = args.ids or publisher.ledger.failed_ids(args.day, args.buyer)
        if not ids:
            print(f"no failed events of buyer {args.buyer} on {args.day} in the ledger", file=sys.stderr)
            return 0
        results = replay(publisher, ids, again=args.again)
    return 1 if print_replays(results) and args.ids else 0


def print_replays(results: list[Replayed]) -> int:
    """Each new id on stdout, each event not replayed (and why) on stderr; returns how many
    were not replayed."""
    skipped = 0
    for item in results:
        if item.replay_id is not None:
            print(item.replay_id)
        else:
            skipped += 1
            print(f"{item.original}: not replayed: {item.note}", file=sys.stderr)
    return skipped


def replay_from_archive(args: argparse.Namespace, settings: Settings) -> int:
    """Replay the failed and expired events of an archive file (all of them, or those of
    --buyer, or the ids given): for events past the ledger's window."""
    from pathlib import Path

    from archive.files import read_lines
    from ops.replay import replay
    from producer.publisher import Publisher

    if args.day:
        print("cgrid-s2s replay: --archive names the file (its folder is the day); drop --day", file=sys.stderr)
        return 2
    archived: dict[str, dict[str, Any]] = {}
    delivered: set[str] = set()
    for _, line in read_lines(Path(args.archive)):
        if not isinstance(line.get("id"), str) or (args.buyer is not None and line.get("buyer") != args.buyer):
            continue
        if line.get("state") in ("failed", "expired"):
            archived.setdefault(line["id"], line)  # a line written twice (takeover) is one event
        elif line.get("state") == "delivered":
            delivered.add(line["id"])  # a later line corrects a failed one (a lost retry's late success)
    for event_id in delivered:
        archived.pop(event_id, None)
    ids = [i for i in args.ids if i in archived] if args.ids else sorted(archived)
    missing = [i for i in args.ids if i not in archived]
    for event_id in missing:
        why = ("delivered (a later line corrects its failed one)" if event_id in delivered
               else "no failed or expired line for it")
        print(f"{event_id}: not replayed: {why} in {args.archive}", file=sys.stderr)
    if not ids:
        print(f"no failed or expired events to replay in {args.archive}", file=sys.stderr)
        return 1 if missing else 0
    with Publisher(settings, linger_ms=0) as publisher:
        results = replay(publisher, ids, again=args.again, archived=archived)
    skipped = len(missing) + print_replays(results)
    return 1 if skipped and args.ids else 0


def cmd_archive(args: argparse.Namespace, settings: Settings) -> int:
    """Run the archiver: final ledger records into daily JSON-lines files (docs/archive.md)."""
    from pathlib import Path

    from archive.archiver import default_name, run_archiver

    return run_archiver(settings, Path(args.dir or settings.archive_path), args.name or default_name())


def cmd_mock_dsp(args: argparse.Namespace, settings: Settings) -> int:
    from ops.mock_dsp import MockDspServer

    server = MockDspServer(args.host, args.port, verbose=not args.quiet)
    print(f"mock DSP listening on {server.url} (GET {server.url}/_calls lists the calls)", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
    return 0


def day_arg(text: str) -> str:
    try:
        return datetime.date.fromisoformat(text).isoformat()
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date (YYYY-MM-DD)") from None


def percent_arg(text: str) -> float:
    try:
        value = float(text.rstrip("%"))
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a percentage (a number, 0 or more)")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cgrid-s2s", description="cgrid-s2s: s2s win and billing notices")
    sub = parser.add_subparsers(dest="command", required=True)
    publish = sub.add_parser("publish", help="publish JSON-lines events; prints one id per line")
    publish.add_argument("file", nargs="?", help="a JSON-lines file (default: standard input)")
    publish.add_argument("--sync", action="store_true", help="send every event at once, no batching")
    publish.set_defaults(run=cmd_publish)
    status = sub.add_parser("status", help="the ledger record of one event as JSON")
    status.add_argument("id")
    status.add_argument("--day", type=day_arg, default=None,
                        help="for an id past the ledger's window: look it up in this day's archive files")
    status.set_defaults(run=cmd_status)
    report = sub.add_parser("report", help="counts per buyer and day")
    output = report.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print JSON instead of a table")
    output.add_argument("--csv", action="store_true", help="print CSV (a header line, then one row per buyer and day)")
    report.add_argument("--days", type=int, default=None, help="only the newest N days")
    report.add_argument("--date", type=day_arg, default=None, help="only this UTC day, YYYY-MM-DD")
    report.add_argument("--buyer", default=None, help="only this buyer")
    report.set_defaults(run=cmd_report)
    rec = sub.add_parser("reconcile", help="compare a buyer's own export of a day's notices with our delivered "
                         "ones: which differ, and the evidence for each")
    rec.add_argument("file", metavar="FILE", help="the buyer's CSV export, '-' for standard input; its header names "
                     "the columns: id (our event ids), or auction_id (and imp_id), or hour,count (YYYY-MM-DDTHH, UTC)")
    rec.add_argument("--buyer", required=True, help="the buyer ('-' for events without one)")
    rec.add_argument("--date", type=day_arg, required=True, help="the UTC day of the events' created_at, YYYY-MM-DD")
    rec.add_argument("--kind", choices=["nurl", "burl"], default=None, help="only win (nurl) or billing (burl) notices")
    rec_output = rec.add_mutually_exclusive_group()
    rec_output.add_argument("--json", action="store_true", help="one JSON object: the figures, the differing rows "
                            "with their evidence, the hours")
    rec_output.add_argument("--csv", action="store_true", help="the differing rows as CSV")
    rec.add_argument("--threshold", type=percent_arg, default=DEFAULT_THRESHOLD_PCT, metavar="PCT",
                     help="exit 1 when |discrepancy| is above PCT percent (default 10)")
    rec.set_defaults(run=cmd_reconcile)
    dec = sub.add_parser("decrypt", help="check an encrypted price with a buyer's keys (CGRID_BUYERS_FILE)")
    dec.add_argument("value", help="the 38-character value the buyer received in place of ${AUCTION_PRICE}")
    dec.add_argument("--buyer", required=True, help="the buyer whose keys encrypted it")
    dec.set_defaults(run=cmd_decrypt)
    rep = sub.add_parser("replay", help="publish failed (and expired, uncalled) events again as <id>:replay<n> "
                         "(with the buyer's consent)")
    rep.add_argument("ids", nargs="*", help="failed or expired event ids (or --buyer and --day)")
    rep.add_argument("--buyer", default=None, help="the buyer whose failed and expired events to replay ('-' for none)")
    rep.add_argument("--day", type=day_arg, default=None, help="the UTC day of their created_at, YYYY-MM-DD")
    rep.add_argument("--archive", metavar="FILE", default=None,
                     help="replay the failed and expired events of this archive file (<dir>/<day>/<name>.jsonl; "
                          "with --buyer or ids: only those), for events past the ledger's window")
    rep.add_argument("--again", action="store_true", help="replay events that were replayed before, once more")
    rep.set_defaults(run=cmd_replay)
    arch = sub.add_parser("archive", help="write final ledger records into daily JSON-lines files (runs until stopped)")
    arch.add_argument("--dir", default=None, help="the archive directory (default: CGRID_ARCHIVE_DIR, else "
                      "<CGRID_DATA_DIR>/archive)")
    arch.add_argument("--name", default=None, help="this archiver's name, its file name in each day's folder; "
                      "keep it stable across restarts (default: the host name)")
    arch.set_defaults(run=cmd_archive)
    mock = sub.add_parser("mock-dsp", help="a local buyer endpoint for demos and tests")
    mock.add_argument("--host", default="127.0.0.1")
    mock.add_argument("--port", type=int, default=8099)
    mock.add_argument("--quiet", action="store_true", help="do not log each call")
    mock.set_defaults(run=cmd_mock_dsp)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_env()
        return int(args.run(args, settings))
    except CgridError as e:
        print(f"cgrid-s2s: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"cgrid-s2s: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # redis errors on status/report: say what, not a traceback
        import redis

        if isinstance(e, redis.RedisError):
            print(f"cgrid-s2s: Redis at {mask_url(Settings.from_env().redis_url)} is unreachable: {e}",
                  file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    raise SystemExit(main())
