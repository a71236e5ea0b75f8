"""``cgrid-s2s reconcile`` on a buyer-day of 10 million notices on each side: time and memory.

    .venv/bin/python -m bench.reconcile [--notices 10000000] [--diff-pct 1] [--others 1000000]

Makes a day of archive lines in the archive's format (archive/files.py; the line shape is
checked against ``archive_line``'s own), in two files as two archivers write them: the
buyer's ``--notices`` final records (win and billing notices of half as many auctions;
1% delivered on their retry, 0.5% failed after two calls) and ``--others`` of other buyers.
Then the buyer's own export in each form, made from the delivered notices with ``--diff-pct``
of them removed and as many rows added that we never sent. Runs the real command
(``python -m ops.cli reconcile … --json``, its output to a file) against a private Redis
holding an empty ledger and an archive stream, on one core (CPU affinity), and reads its
wall time and peak RSS (``wait4``). Checks the figures it prints against what it made;
asserts nothing else.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import duckdb
import redis

from archive.files import archive_line, ensure_group
from bench.common import ROOT, fleet_env
from cgrid.event import parse_event
from cgrid.redis_server import RedisServer
from ops.reconcile import hour_text

BUYER = "dsp-7"
DAY = "2026-11-25"
DAY_START_S = 1795564800  # 2026-11-25T00:00:00Z


def _ours_sql(n: int, others: int, part: int) -> str:
    """The buyer's n final records and ``others`` of other buyers, over the day, as archive
    lines: notice i is auction i // 2's win (even i) or billing notice (odd i)."""
    step = 86_399.0 / max(n + others, 1)
    return f"""
        SELECT '{int(DAY_START_S * 1000)}-' || i AS entry,
               printf('%024x', i) || CASE WHEN i % 2 = 0 THEN ':nurl' ELSE ':burl' END AS id,
               CASE WHEN i % 200 = 3 THEN 'failed' ELSE 'delivered' END AS state,
               '{DAY}' AS day,
               CASE WHEN i < {n} THEN '{BUYER}' ELSE 'dsp-' || (i % 40 + 100) END AS buyer,
               CASE WHEN i % 2 = 0 THEN 'nurl' ELSE 'burl' END AS kind,
               {DAY_START_S} + i * {step} + 0.002 AS accepted_at,
               {DAY_START_S} + i * {step} + 0.06 AS finished_at,
               CASE WHEN i % 200 = 3 THEN
                   [{{'n': 1, 'started_at': {DAY_START_S} + i * {step} + 0.01, 'ms': 2000.0, 'status': NULL::INTEGER,
                      'error': 'timeout'}},
                    {{'n': 2, 'started_at': {DAY_START_S} + i * {step} + 10.01, 'ms': 38.5, 'status': 500,
                      'error': NULL::VARCHAR}}]
                    WHEN i % 100 = 5 THEN
                   [{{'n': 1, 'started_at': {DAY_START_S} + i * {step} + 0.01, 'ms': 31.2, 'status': 503,
                      'error': NULL::VARCHAR}},
                    {{'n': 2, 'started_at': {DAY_START_S} + i * {step} + 10.01, 'ms': 38.5, 'status': 204,
                      'error': NULL::VARCHAR}}]
                    ELSE [{{'n': 1, 'started_at': {DAY_START_S} + i * {step} + 0.01, 'ms': 41.2, 'status': 204,
                            'error': NULL::VARCHAR}}] END AS attempts,
               {{'id': printf('%024x', i) || CASE WHEN i % 2 = 0 THEN ':nurl' ELSE ':burl' END,
                 'kind': CASE WHEN i % 2 = 0 THEN 'nurl' ELSE 'burl' END, 'upstream': 's2s',
                 'created_at': {DAY_START_S} + i * {step},
                 'buyer': CASE WHEN i < {n} THEN '{BUYER}' ELSE 'dsp-' || (i % 40 + 100) END,
                 'host': 'bid.dsp7.example', 'macros': {{'AUCTION_ID': 'auc-' || (i // 2), 'AUCTION_IMP_ID': '1'}}}}
                 AS event
        FROM range({n + others}) t(i) WHERE hash(i) % 2 = {part}
    """


def make_archive(root: Path, n: int, others: int) -> dict[str, Any]:
    """The day's archive files; returns their size and lines."""
    day_dir = root / DAY
    day_dir.mkdir(parents=True)
    db = duckdb.connect(config={"threads": 2})
    # Two archivers' files, each with about half of the day (what two names share).
    for part, name in enumerate(("host-a", "host-b")):
        db.execute(f"COPY ({_ours_sql(n, others, part)}) TO '{day_dir / (name + '.jsonl')}' (FORMAT json)")
    check_line_shape(day_dir / "host-a.jsonl")
    files = sorted(day_dir.glob("*.jsonl"))
    return {"lines": n + others, "bytes": sum(p.stat().st_size for p in files)}


def check_line_shape(path: Path) -> None:
    """The generated line has the keys, in the order, of the archiver's own line."""
    with open(path, "rb") as f:
        made = json.loads(f.readline())
    event = parse_event({"id": "x", "kind": "burl", "upstream": "s2s", "buyer": BUYER, "created_at": DAY_START_S,
                         "url": "https://bid.dsp7.example/b?a=${AUCTION_ID}&i=${AUCTION_IMP_ID}",
                         "macros": {"AUCTION_ID": "auc-1", "AUCTION_IMP_ID": "1", "AUCTION_PRICE": 1.5}})
    _, line = archive_line("1-0", {"id": "x", "state": "delivered", "day": DAY, "buyer": BUYER, "kind": "burl",
                                   "accepted_at": "1.0", "finished_at": "2.0",
                                   "a1": '{"n":1,"started_at":1.0,"ms":41.2,"status":204,"error":null}',
                                   "event": event.to_final_json(keep_call=False)})
    real = json.loads(line)
    if list(made) != list(real) or list(made["event"]) != list(real["event"]) or \
            list(made["attempts"][0]) != list(real["attempts"][0]):
        raise SystemExit(f"bench lines differ in shape from the archiver's:\n{made}\n{real}")


def make_theirs(workdir: Path, n: int, others: int, diff_pct: float) -> dict[str, Any]:
    """The buyer's export in each form: our delivered notices less every k-th, plus as many
    rows we never sent (k = 100 / diff_pct)."""
    k = max(round(100 / diff_pct), 2) if diff_pct > 0 else 0
    db = duckdb.connect(config={"threads": 2})
    delivered = f"FROM range({n}) t(i) WHERE i % 200 <> 3"
    kept = f"{delivered}{f' AND i % {k} <> 1' if k else ''}"
    extra = n // k if k else 0
    db.execute(f"""COPY (SELECT id FROM (SELECT printf('%024x', i) || CASE WHEN i % 2 = 0 THEN ':nurl'
                   ELSE ':burl' END AS id {kept} UNION ALL SELECT 'never-sent-' || i FROM range({extra}) t(i)))
                   TO '{workdir / "ids.csv"}' (HEADER)""")
    db.execute(f"""COPY (SELECT auction_id, imp_id FROM (SELECT 'auc-' || (i // 2) AS auction_id, '1' AS imp_id
                   {kept} UNION ALL SELECT 'auc-never-' || i, '1' FROM range({extra}) t(i)))
                   TO '{workdir / "auctions.csv"}' (HEADER)""")
    step = 86_399.0 / max(n + others, 1)
    counts = db.execute(f"SELECT floor(({DAY_START_S} + i * {step}) / 3600)::BIGINT AS h, count(*) {kept} "
                        "GROUP BY h ORDER BY h").fetchall()
    (workdir / "counts.csv").write_text("hour,count\n" + "".join(f"{hour_text(h)},{c}\n" for h, c in counts))
    delivered_n = int(db.execute(f"SELECT count(*) {delivered}").fetchone()[0])  # type: ignore[index]
    removed = delivered_n - int(db.execute(f"SELECT count(*) {kept}").fetchone()[0])  # type: ignore[index]
    return {"delivered": delivered_n, "removed": removed, "added": extra}


def run_reconcile(env: dict[str, str], path: Path, out: Path) -> dict[str, Any]:
    """The real command, one core, output to a file; its wall time and peak RSS."""
    cpu = min(os.sched_getaffinity(0))
    started = time.perf_counter()
    with open(out, "w") as f:
        process = subprocess.Popen(
            [sys.executable, "-m", "ops.cli", "reconcile", "--buyer", BUYER, "--date", DAY, str(path), "--json"],
            cwd=ROOT, env=env, stdout=f, stderr=subprocess.PIPE, preexec_fn=lambda: os.sched_setaffinity(0, {cpu}))
        _, status, usage = os.wait4(process.pid, 0)
    wall_s = time.perf_counter() - started
    assert process.stderr is not None
    stderr = process.stderr.read().decode(errors="replace")
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode not in (0, 1) or stderr.strip():
        raise SystemExit(f"reconcile failed ({process.returncode}): {stderr[-2000:]}")
    return {"wall_s": round(wall_s, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
            "peak_rss_mib": round(usage.ru_maxrss / 1024), "exit": process.returncode,
            "output_mib": round(out.stat().st_size / 2**20, 1)}


def read_head(out: Path) -> dict[str, Any]:
    """The output's figures, without decoding its lists of rows."""
    db = duckdb.connect()
    row = db.execute(f"SELECT ours, theirs, matched, discrepancy_pct, len(ours_only), len(theirs_only) "
                     f"FROM read_json('{out}', maximum_object_size=2000000000)").fetchone()
    assert row is not None
    return dict(zip(["ours", "theirs", "matched", "discrepancy_pct", "ours_only", "theirs_only"], row, strict=True))


def run(notices: int, diff_pct: float, others: int, forms: list[str], workdir: Path) -> dict[str, Any]:
    workdir.mkdir(parents=True, exist_ok=True)
    root = workdir / "archive"
    made = time.perf_counter()
    archive = make_archive(root, notices, others)
    theirs = make_theirs(workdir, notices, others, diff_pct)
    print(f"made {archive['lines']:,} archive lines ({archive['bytes'] / 1e9:.2f} GB) and the buyer's files "
          f"in {time.perf_counter() - made:.0f} s", flush=True)
    server = RedisServer(workdir / "redis").start()
    results: dict[str, Any] = {"notices": notices, "others": others, "diff_pct": diff_pct, "archive": archive,
                               "made": theirs, "forms": {}}
    try:
        ensure_group(redis.Redis.from_url(server.url))  # an archive stream, as in a fleet with its archiver
        env = fleet_env(server.url, {"CGRID_ARCHIVE_DIR": str(root)})
        for form in forms:
            path = workdir / f"{form}.csv"
            run_ = run_reconcile(env, path, workdir / f"out-{form}.json")
            run_.update(read_head(workdir / f"out-{form}.json"))
            (workdir / f"out-{form}.json").unlink()
            results["forms"][form] = run_
            print(f"  {form:9} {run_['wall_s']:6.1f} s wall, {run_['cpu_s']:6.1f} s CPU, peak RSS "
                  f"{run_['peak_rss_mib']:,} MiB; ours {run_['ours']:,} theirs {run_['theirs']:,} matched "
                  f"{run_['matched'] if run_['matched'] is not None else '-'}; ours only {run_['ours_only']:,}, "
                  f"theirs only {run_['theirs_only']:,} (made: {theirs['removed']:,} removed, "
                  f"{theirs['added']:,} added)", flush=True)
    finally:
        server.stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--notices", type=int, default=10_000_000, help="the buyer's notices of the day")
    parser.add_argument("--others", type=int, default=1_000_000, help="other buyers' lines in the same files")
    parser.add_argument("--diff-pct", type=float, default=1.0, help="rows removed, and as many added, in %%")
    parser.add_argument("--form", choices=["ids", "auctions", "counts", "all"], default="all")
    parser.add_argument("--dir", default=None, help="where to make the files (default: a temporary directory)")
    args = parser.parse_args()
    forms = ["ids", "auctions", "counts"] if args.form == "all" else [args.form]
    with tempfile.TemporaryDirectory(prefix="cgrid-reconcile-bench-", dir=args.dir) as tmp:
        print(json.dumps(run(args.notices, args.diff_pct, args.others, forms, Path(tmp)), indent=2))


if __name__ == "__main__":
    main()
