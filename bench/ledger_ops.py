"""Redis's CPU per event for each ledger operation, without workers, HTTP or Celery: the
calls a fleet makes (accept in batches, claim, finish with the worker's final record, the
archiver's read, write and acknowledge), one phase after the other on a fresh Redis (AOF on,
``appendfsync always``, as ``make bench`` runs it). Per phase: Redis's CPU (its process's
user + system time) and the INFO commandstats calls and usec per event, and the archiver's
own CPU in its phase.

    python -m bench.ledger_ops [--events N] [--rounds R] [--finish-batch K] [--callgrind]

It drives the ledger's Python API only, so it runs against an older checkout too:
``PYTHONPATH=/path/to/other/checkout python bench/ledger_ops.py`` (the figures then are that
code's). ``--perf FILE`` records Redis with ``perf record`` (cpu-clock, call graphs).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

from archive.archiver import Archiver
from archive.files import ensure_group
from cgrid.event import Event, parse_event
from cgrid.ledger import Finish, Ledger, Outcome
from cgrid.redis_server import RedisServer, find_redis_server
from cgrid.routing import DELIVER_QUEUE
from delivery.attempt import Attempt

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
BATCH = 100  # ids per trigger (CGRID_BATCH_SIZE)
FINISH_BATCH = 50  # outcomes per finish script (a worker's ledger thread writes what has ended): --finish-batch


def process_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def make_events(n: int, run: str) -> list[Event]:
    return [parse_event(
        {"id": f"{run}-{i}", "kind": "burl", "upstream": "u2s", "buyer": f"dsp{i % 4}",
         "url": f"http://127.0.0.1:9/win?e={run}-{i}&p=${{AUCTION_PRICE}}&a=${{AUCTION_ID}}",
         "macros": {"AUCTION_PRICE": 1.25 + i % 7, "AUCTION_ID": f"auction-{i}"},
         "user_agent": "Mozilla/5.0 (iPhone; CPU iPhone OS 17_2 like Mac OS X) AppleWebKit/605.1.15",
         "forwarded_for": ["77.16.215.3", "18.196.6.164"]}) for i in range(n)]


def commandstats(client: redis.Redis) -> dict[str, tuple[int, int]]:
    stats: dict[str, Any] = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): (int(f["calls"]), int(f["usec"])) for name, f in stats.items()}


def instruction_split(dump: Path) -> dict[str, int]:
    """Where a phase's instructions went (``callgrind_annotate``, inclusive counts): the
    commands the scripts called (or, outside scripts, the commands themselves), their
    propagation to the append-only file, the Lua interpreter and its bridge (the scripts'
    time less the commands they called), and the rest (reading and parsing requests,
    replies, the event loop). The floor of the ledger as it is: its commands and their
    AOF writes, with no Lua at all."""
    out = subprocess.run(["callgrind_annotate", "--inclusive=yes", str(dump)], check=True, capture_output=True,
                         text=True).stdout
    inclusive: dict[str, int] = {}
    for line in out.splitlines():
        match = re.match(r"\s*([\d,]+) \([\s\d.]+%\)\s+(?:\*\s+)?\S*?:(\S+) ", line)
        if match:
            inclusive.setdefault(match.group(2), int(match.group(1).replace(",", "")))
    total_match = re.search(r"([\d,]+) \(100.0%\)\s+PROGRAM TOTALS", out)
    total = int(total_match.group(1).replace(",", "")) if total_match else 0
    aof = inclusive.get("propagatePendingCommands", 0)
    if "lua_pcall" in inclusive:
        commands = inclusive.get("call'2", 0)
        lua = inclusive["lua_pcall"] - inclusive.get("scriptCall", 0)
    else:
        commands = inclusive.get("call", 0) - aof
        lua = 0
    return {"total": total, "commands": commands, "aof": aof, "lua": lua, "rest": total - commands - aof - lua}


def callgrind_instructions(pid: int, out_dir: Path, split: dict[str, int] | None = None) -> int:
    """Dump the running callgrind's counts since the last dump (or zeroing) and return the
    instructions executed (``--callgrind``: counts that do not depend on the machine's load);
    ``split`` receives :func:`instruction_split` of them."""
    before = set(out_dir.glob("callgrind.out.*"))
    subprocess.run(["callgrind_control", "-d", str(pid)], check=True, capture_output=True)
    for _ in range(200):
        new = set(out_dir.glob("callgrind.out.*")) - before
        if new:
            break
        time.sleep(0.05)
    [dump] = new
    keep = os.environ.get("LEDGER_OPS_KEEP_DUMPS")  # a folder to copy each phase's dump to
    for _ in range(200):
        for line in dump.read_text(errors="replace").splitlines():
            if line.startswith(("totals:", "summary:")):
                if keep:
                    Path(keep, dump.name).write_bytes(dump.read_bytes())
                if split is not None:
                    split.update(instruction_split(dump))
                return int(line.split()[1])
        time.sleep(0.05)
    raise RuntimeError(f"no totals in {dump}")


def one_round(client: redis.Redis, pid: int, n: int, run: str, root: Path, perf: str = "",
              perf_phase: str = "", callgrind_dir: Path | None = None, finish_batch: int = FINISH_BATCH
              ) -> dict[str, Any]:
    ledger = Ledger(client)
    events = make_events(n, run)
    by_id = {e.id: e for e in events}
    phases: dict[str, Any] = {}

    def measure(name: str, work: Any) -> None:
        client.config_resetstat()
        recorder = None
        if perf and name == perf_phase:
            recorder = subprocess.Popen(["perf", "record", "-e", "cpu-clock", "-p", str(pid), "-o", perf],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.5)
        if callgrind_dir is not None:
            callgrind_instructions(pid, callgrind_dir)  # the counts so far: not this phase's
        cpu0, own0, wall0 = process_cpu_s(pid), time.process_time(), time.perf_counter()
        work()
        split: dict[str, int] = {}
        instructions = callgrind_instructions(pid, callgrind_dir, split) if callgrind_dir is not None else None
        if recorder is not None:
            recorder.send_signal(2)
            recorder.wait()
        cpu, own = process_cpu_s(pid) - cpu0, time.process_time() - own0
        stats = commandstats(client)
        stats.pop("config|resetstat", None)
        stats.pop("info", None)
        phases[name] = {
            "redis_cpu_us_per_event": round(cpu / n * 1e6, 2),
            "redis_instructions_per_event": round(instructions / n) if instructions is not None else None,
            "redis_instructions_split_per_event": {part: round(count / n) for part, count in split.items()},
            "client_cpu_us_per_event": round(own / n * 1e6, 2),
            "wall_s": round(time.perf_counter() - wall0, 3),
            "usec_per_event": round(sum(u for _, u in stats.values()) / n, 2),
            "commands": {name: {"calls_per_event": round(c / n, 3), "usec_per_event": round(u / n, 3)}
                         for name, (c, u) in sorted(stats.items(), key=lambda item: -item[1][1])},
        }

    # Shared triggers where the checkout has them (the accept fills the queue's pending list,
    # the claim takes batches from it), as its publishers and workers do; else ids per trigger.
    shared = hasattr(ledger, "claim_shared")

    def accept() -> None:
        for start in range(0, n, BATCH):
            ledger.accept(events[start:start + BATCH], ledger_ttl_s=2700, report_ttl_s=86400 * 40,
                          redeliver_after_s=30.0, max_memory_share=0.9,
                          **({"shared_queue": DELIVER_QUEUE} if shared else {}))

    claimed: list[tuple[str, str]] = []  # (id, the claim's token)
    # A shared claim's attempts are known to the finish by their claim's token where the
    # checkout sends it (the record has no claim fields then).
    tokens = "claim_token" in inspect.signature(Attempt.to_finish).parameters
    stamps = "stamp" in inspect.signature(ledger.claim).parameters  # (an older checkout's claim has none)

    def claim() -> None:
        ids = [e.id for e in events]
        for start in range(0, n, BATCH):
            stamp: list[str] = []
            kw: dict[str, Any] = {"stamp": stamp} if stamps else {}
            if shared:
                got = ledger.claim_shared(DELIVER_QUEUE, 0, BATCH, lease_s=60.0, sent_at_s=time.time(), **kw)
            else:
                got = ledger.claim(ids[start:start + BATCH], 1, lease_s=60.0, sent_at_s=time.time(), **kw)
            claimed.extend((event_id, stamp[-1] if stamp else "") for event_id, _text in got)

    def finish() -> None:
        now_s = time.time()
        results: list[Finish] = []
        for event_id, token in claimed:
            attempt = Attempt(1, Outcome.OK, now_s, 12.5, status=204)
            own = {"claim_token": token} if tokens else {}
            results.append(attempt.to_finish(event_id, event=by_id[event_id], **own))
        for start in range(0, len(results), finish_batch):
            ledger.finish(results[start:start + finish_batch], 1, ledger_ttl_s=2700, report_ttl_s=86400 * 40,
                          retry_delay_s=60.0)

    archiver = Archiver(client, root, "ops", claim_idle_s=60.0, block_ms=None)
    archiver.open()

    def archive() -> None:
        archiver.recovering = False
        while archiver.step():
            pass

    try:
        measure("accept", accept)
        measure("claim", claim)
        measure("finish", finish)
        measure("archive", archive)
    finally:
        archiver.close()
    assert len(claimed) == n, f"claimed {len(claimed)} of {n}"
    assert archiver.written == n, f"archived {archiver.written} of {n}"
    return phases


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ledger_ops", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--finish-batch", type=int, default=FINISH_BATCH, help="outcomes per finish script")
    parser.add_argument("--perf", default="", help="perf record Redis into this file")
    parser.add_argument("--perf-phase", default="", help="perf record only this phase (accept, claim, finish, archive)")
    parser.add_argument("--json", default="", help="write the figures to this file")
    parser.add_argument("--callgrind", action="store_true",
                        help="run Redis under valgrind's callgrind and count its instructions per phase")
    args = parser.parse_args()
    rounds = []
    with tempfile.TemporaryDirectory(prefix="cgrid-ops-") as tmp:
        callgrind_dir = None
        binary = None
        if args.callgrind:
            callgrind_dir = Path(tmp) / "callgrind"
            callgrind_dir.mkdir()
            wrapper = Path(tmp) / "redis-under-callgrind"
            wrapper.write_text(f"#!/bin/sh\nexec valgrind --tool=callgrind --dump-instr=no "
                               f"--callgrind-out-file={callgrind_dir}/callgrind.out.%p {find_redis_server()} \"$@\"\n")
            wrapper.chmod(0o755)
            binary = str(wrapper)
        server = RedisServer(Path(tmp) / "redis", binary=binary).start(timeout_s=60)
        perf = None
        try:
            assert server.process is not None
            pid = server.process.pid
            client = redis.Redis.from_url(server.url)
            ensure_group(client)
            if args.perf and not args.perf_phase:
                perf = subprocess.Popen(["perf", "record", "-e", "cpu-clock", "-g", "-p", str(pid), "-o", args.perf],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(0.5)
            for index in range(args.rounds):
                rounds.append(one_round(client, pid, args.events, f"r{index}", Path(tmp) / f"archive-{index}",
                                        args.perf if index == 0 else "", args.perf_phase, callgrind_dir,
                                        args.finish_batch))
        finally:
            if perf is not None:
                perf.send_signal(2)
                perf.wait()
            server.stop()
    summary: dict[str, Any] = {}
    for phase in rounds[0]:
        values = sorted(r[phase]["redis_cpu_us_per_event"] for r in rounds)
        usec = sorted(r[phase]["usec_per_event"] for r in rounds)
        own = sorted(r[phase]["client_cpu_us_per_event"] for r in rounds)
        instructions = sorted(r[phase]["redis_instructions_per_event"] or 0 for r in rounds)
        parts = rounds[0][phase]["redis_instructions_split_per_event"]
        split_medians = {
            part: sorted(r[phase]["redis_instructions_split_per_event"][part] for r in rounds)[len(rounds) // 2]
            for part in parts}
        summary[phase] = {"redis_instructions_per_event_median": instructions[len(instructions) // 2],
                          "redis_instructions_split_median": split_medians,
                          "redis_cpu_us_per_event_median": values[len(values) // 2],
                          "commandstats_usec_per_event_median": usec[len(usec) // 2],
                          "client_cpu_us_per_event_median": own[len(own) // 2]}
    total = sum(s["redis_cpu_us_per_event_median"] for s in summary.values())
    for phase, figures in summary.items():
        print(f"{phase:8} Redis CPU {figures['redis_cpu_us_per_event_median']:6.2f} µs/event  "
              f"commandstats {figures['commandstats_usec_per_event_median']:6.2f} µs/event  "
              f"client CPU {figures['client_cpu_us_per_event_median']:6.2f} µs/event  "
              f"Redis instructions {figures['redis_instructions_per_event_median']}/event")
    print(f"total    Redis CPU {total:6.2f} µs/event, Redis instructions "
          f"{sum(s['redis_instructions_per_event_median'] for s in summary.values())}/event")
    if args.callgrind:
        # The floor of these commands: what is left with no Lua interpreter at all.
        for phase, figures in summary.items():
            print(f"  {phase:8} instructions/event: " + ", ".join(
                f"{part} {count}" for part, count in figures["redis_instructions_split_median"].items()))
        sums = {part: sum(f["redis_instructions_split_median"][part] for f in summary.values())
                for part in ("total", "commands", "aof", "lua", "rest")}
        print("  all      instructions/event: " + ", ".join(f"{part} {count}" for part, count in sums.items()))
    last = rounds[-1]
    for phase, figures in last.items():
        top = ", ".join(f"{name} {c['calls_per_event']}x {c['usec_per_event']}µs"
                        for name, c in list(figures["commands"].items())[:12])
        print(f"  {phase}: {top}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": sys.argv[1:], "summary": summary, "rounds": rounds}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
