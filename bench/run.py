"""``make bench``: cgrid-s2s against bare loops (blocking urllib3, the previous engine's
client; the worker's own libcurl call on a bare multi loop) and the naive baseline, same
machine, same buyer server; then buyer isolation (a healthy buyer alone, then beside a
dead one). Prints a table and saves JSON under ``bench/results/``. It measures; it asserts
nothing (tests check behaviour, the benchmark reports figures).

The fleet under test runs as ``make run`` runs it: the workers and an archiver
(``cgrid-s2s archive``, writing into the bench's temporary directory), so Redis's CPU per
event includes the archive stream; ``--no-archiver`` measures without it.

    python -m bench.run [--scenario fast|realistic|isolation|buyers|reconcile|https|all] [--events N]
                        [--pool prefork|threads|solo] [--no-archiver] [--metrics] [--reconcile-notices N]
    python -m bench.run --cluster [--events N] [--rounds N]

``reconcile`` (in ``all``): ``cgrid-s2s reconcile`` on a buyer-day of 10 million notices on
each side (bench/reconcile.py). ``https`` (in ``all``): buyers over TLS, each its own origin,
Zipf traffic, new connections per 1,000 calls (bench/https.py). ``--cluster``: Redis CPU per
event with the ledger on a Redis Cluster against one Redis (bench/cluster.py).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

from archive.files import stream_key
from bench.cluster import print_cluster, run_cluster_bench
from bench.common import (
    ROOT,
    Buyer,
    bench_event,
    fleet_env,
    percentile,
    publish_paced,
    publishes_like,
    wait_until,
)
from bench.https import print_https, run_https
from bench.isolation import print_report, run_isolation
from bench.reconcile import run as run_reconcile_bench
from cgrid.event import parse_event
from cgrid.ledger import Ledger
from cgrid.redis_server import RedisServer, free_port
from cgrid.settings import Settings
from producer import Publisher
from tests.helpers import process_tree

RESULTS = ROOT / "bench" / "results"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
ARCHIVE_CATCH_UP_S = 60.0  # how long the bench waits for the archiver to write every final record


# -- processes and their costs ----------------------------------------------------------------


def code_commit(code: Path) -> str:
    """The short commit of the checkout ``code`` (the results file's name shows it)."""
    return subprocess.run(["git", "-C", str(code), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip() or "unknown"


def code_env(env: dict[str, str], code: Path) -> dict[str, str]:
    """``env`` for a fleet process run from the checkout ``code`` (``--code``: an older commit's
    worktree, to compare it with this one in the same run): its packages come first."""
    return env if code == ROOT else {**env, "PYTHONPATH": str(code)}


def _stat_cpu_s(stat: Path) -> float:
    """utime + stime, in seconds, of a /proc stat file (a process's or a thread's)."""
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            total += _stat_cpu_s(Path(f"/proc/{pid}/stat"))
        except OSError:
            continue
    return total


def cpu_seconds_by_thread(pids: list[int]) -> dict[str, float]:
    """CPU seconds of the processes' threads, summed by the threads' kernel names (the
    engine's threads name themselves: cgrid/threads.py); a process's first thread counts as
    ``main``. Threads that ended are not counted."""
    by_name: dict[str, float] = {}
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").glob("*"):
            try:
                seconds = _stat_cpu_s(task / "stat")
                name = "main" if task.name == str(pid) else (task / "comm").read_text().strip()
            except OSError:
                continue
            by_name[name] = by_name.get(name, 0.0) + seconds
    return by_name


def peak_rss_mib(pids: list[int]) -> list[float]:
    peaks = []
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peaks.append(round(int(line.split()[1]) / 1024, 1))
        except OSError:
            continue
    return peaks


def redis_cpu_s(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def command_stats(client: redis.Redis, events: int) -> dict[str, dict[str, float]]:
    """Redis's INFO commandstats since the last CONFIG RESETSTAT, per 1,000 events: calls and
    usec per command (a script's commands are counted under their own names and again in its
    EVALSHA's usec), most usec first."""
    stats: dict[str, Any] = client.info("commandstats")
    per: dict[str, dict[str, float]] = {}
    for name, figures in sorted(stats.items(), key=lambda item: -int(item[1]["usec"])):
        per[name.removeprefix("cmdstat_")] = {"calls": round(int(figures["calls"]) / events * 1000, 2),
                                              "usec": round(int(figures["usec"]) / events * 1000, 1)}
    return per




# -- the buyer ---------------------------------------------------------------------------------


def make_events(n: int, port: int, run: str, buyers: int = 4) -> list[dict[str, Any]]:
    return [bench_event(run, i, f"dsp{i % buyers}", f"http://127.0.0.1:{port}") for i in range(n)]


# -- 1. the ceiling: the same client, the same calls, a bare loop ------------------------------


def run_ceiling_loop(events: list[dict[str, Any]], processes: int, mode: str, concurrency: int,
                     workdir: Path, buyer: Buyer, ca_file: str = "") -> dict[str, Any]:
    """``processes`` bare-loop processes (bench/ceiling.py), each with its share of the calls."""
    as_json = [parse_event(e).to_json() for e in events]
    children = []
    buyer_cpu0 = cpu_seconds(buyer.pids())
    for index in range(processes):
        share = workdir / f"ceiling-{index}.jsonl"
        share.write_text("\n".join(as_json[index::processes]))
        children.append(subprocess.Popen(
            [sys.executable, "-m", "bench.ceiling", "--mode", mode, "--concurrency", str(concurrency),
             "--events", str(share), "--ca-file", ca_file], cwd=ROOT, stdout=subprocess.PIPE))
    results = [json.loads(child.communicate(timeout=900)[0]) for child in children]
    buyer_cpu = cpu_seconds(buyer.pids()) - buyer_cpu0
    slowest = max(r["seconds"] for r in results)
    cpu = sum(r["cpu_s"] for r in results)
    return {"mode": mode, "concurrency": concurrency, "processes": processes, "seconds": round(slowest, 3),
            "answered": sum(r["answered"] for r in results), "rate": round(len(events) / slowest),
            "cpu_s_per_1000": round(cpu / len(events) * 1000, 3),
            "buyer_cpu_s_per_1000": round(buyer_cpu / len(events) * 1000, 3)}


def run_ceiling(events: list[dict[str, Any]], processes: int, loops: list[tuple[str, int]],
                workdir: Path, buyer: Buyer) -> dict[str, Any]:
    """Every loop in ``loops``; the ceiling is the fastest of them."""
    tried = [run_ceiling_loop(events, processes, mode, concurrency, workdir, buyer) for mode, concurrency in loops]
    best = max(tried, key=lambda r: r["rate"])
    return {**best, "tried": tried}


# -- 2. the naive baseline ---------------------------------------------------------------------


def run_naive(events: list[dict[str, Any]], processes: int, redis_url: str, workdir: Path) -> dict[str, Any]:
    from delivery.headers import build_headers

    env = {**os.environ, "BENCH_REDIS_URL": redis_url}
    client = redis.Redis.from_url(redis_url)
    client.delete("naive:done")
    from bench.naive import app as naive_app

    naive_app.conf.broker_url = redis_url
    calls = [(parse_event(e).target_url(), build_headers(parse_event(e))) for e in events]
    with naive_app.producer_or_acquire() as producer:
        for url, headers in calls:
            naive_app.send_task("naive.notify", args=[url, headers], producer=producer)
    log = open(workdir / "naive-worker.log", "wb")
    worker = subprocess.Popen([sys.executable, "-m", "celery", "-A", "bench.naive", "worker", "-c", str(processes),
                               "--loglevel", "WARNING", "--without-mingle", "--without-gossip"],
                              cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until(lambda: int(client.get("naive:done") or 0) >= 1, 60, 0.01)
        first = time.time()
        tree = process_tree(worker.pid)
        cpu0 = cpu_seconds(tree)
        done = wait_until(lambda: int(client.get("naive:done") or 0) >= len(events), 600, 0.01)
        seconds = time.time() - first
        cpu = cpu_seconds(process_tree(worker.pid)) - cpu0
        return {"deliveries": int(client.get("naive:done") or 0), "complete": done, "seconds": round(seconds, 3),
                "rate": round(len(events) / seconds), "cpu_s_per_1000": round(cpu / len(events) * 1000, 3),
                "processes": processes}
    finally:
        worker.terminate()
        worker.wait(timeout=30)
        log.close()


# -- 3. cgrid-s2s --------------------------------------------------------------------------------


class Fleet:
    """The worker fleet under test: one prefork worker with a process per core (Celery's
    default -c), or, for the threads and solo pools (one core each), one worker per core."""

    def __init__(self, env: dict[str, str], pool: str, processes: int, workdir: Path, slots: int | None = None,
                 metrics: bool = False, code: Path = ROOT):
        instances = 1 if pool == "prefork" else processes
        self.logs = [open(workdir / f"cgrid-worker-{time.time():.0f}-{i}.log", "wb") for i in range(instances)]
        self.processes = []
        for index, log in enumerate(self.logs):
            # -c is Celery's default (the number of CPUs). The calls are made by each process's
            # libcurl loop (CGRID_CALL_CONCURRENCY in flight), whatever the pool.
            args = [sys.executable, "-m", "celery", "-A", "worker", "worker", "-P", pool, "--loglevel", "INFO",
                    "--without-mingle", "--without-gossip", "-n", f"bench{index}@%h"]
            if slots:
                args += ["-c", str(slots)]
            # --metrics: Prometheus metrics on, each worker on a port of its own (nobody scrapes them)
            own_env = {**env, "CGRID_METRICS_PORT": str(free_port())} if metrics else env
            self.processes.append(subprocess.Popen(args, cwd=code, env=code_env(own_env, code), stdout=log,
                                                   stderr=subprocess.STDOUT, start_new_session=True))
        for log in self.logs:
            log_path = Path(log.name)
            if not wait_until(lambda p=log_path: b" ready." in p.read_bytes(), 60):
                raise RuntimeError(f"worker did not start: {log_path.read_text()[-2000:]}")

    def tree(self) -> list[int]:
        return [pid for process in self.processes for pid in process_tree(process.pid)]

    def stop(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
        for log in self.logs:
            log.close()


class Archiver:
    """The archiver as ``make run`` starts it (``cgrid-s2s archive``, its own session), writing
    into ``root`` under the name ``bench``. Ready once it has made the stream and its group:
    from then on the ledger scripts add every final record to the stream."""

    NAME = "bench"

    def __init__(self, env: dict[str, str], root: Path, client: redis.Redis, code: Path = ROOT):
        self.root = root
        self.client = client
        self.log = open(root.with_name(root.name + ".log"), "wb")
        # INFO: its start, its minute's progress and its stop (with the lines written) in the log.
        self.process = subprocess.Popen(
            [sys.executable, "-m", "ops.cli", "archive", "--dir", str(root), "--name", self.NAME],
            cwd=code, env=code_env({**env, "CGRID_LOG_LEVEL": "INFO"}, code), stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True)
        key = stream_key()
        if not wait_until(lambda: self.process.poll() is not None or client.exists(key) == 1, 60):
            self.stop()
            raise RuntimeError("the archiver did not make its stream within 60 s")
        if self.process.poll() is not None:
            self.stop()
            raise RuntimeError(f"the archiver exited with {self.process.returncode}: "
                               f"{Path(self.log.name).read_text()[-2000:]}")

    def cpu(self) -> float:
        return cpu_seconds(process_tree(self.process.pid))

    def backlog(self) -> tuple[int, float] | None:
        """Final records not yet written (and the age of the oldest), as the metrics show it."""
        return Ledger(self.client).archive_backlog()

    def caught_up(self) -> bool:
        backlog = self.backlog()
        return backlog is not None and backlog[0] == 0

    def lines(self) -> tuple[int, int]:
        """Lines in its files, and distinct event ids among them."""
        lines, ids = 0, set()
        for path in self.root.glob(f"*/{self.NAME}.jsonl"):
            with open(path, "rb") as f:
                for line in f:
                    lines += 1
                    ids.add(json.loads(line)["id"])
        return lines, len(ids)

    def stop(self) -> int | None:
        """SIGTERM (it finishes the batch in hand), as make run stops it: after the workers."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        return self.process.returncode


def terminal_count(client: redis.Redis) -> int:
    total = 0
    for day in client.zrange("cgrid:report:days", 0, -1):
        for field, count in client.hgetall(b"cgrid:report:" + day).items():
            if field.rsplit(b"\t", 1)[1] in (b"delivered_first", b"delivered_retry", b"failed", b"rejected",
                                             b"expired"):
                total += int(count)
    return total


def read_records(client: redis.Redis, ids: list[str]) -> list[dict[str, Any]]:
    records = []
    for start in range(0, len(ids), 1000):
        pipe = client.pipeline(transaction=False)
        for event_id in ids[start:start + 1000]:
            pipe.hmget(f"cgrid:ev:{event_id}", "state", "a1", "a2")
        for state, a1, a2 in pipe.execute():
            records.append({"state": state.decode() if state else None,
                            "attempts": [json.loads(a) for a in (a1, a2) if a]})
    return records


def attempt_end_s(attempt: dict[str, Any]) -> float:
    """When a recorded attempt ended (a lost one has no duration)."""
    return float(attempt["started_at"]) + float(attempt["ms"] or 0) / 1000


def run_cgrid(events: list[dict[str, Any]], settings_env: dict[str, str], pool: str, processes: int,
              workdir: Path, client: redis.Redis, buyer: Buyer, latency: bool = True,
              archiver: bool = True, metrics: bool = False, arrival_rate: float = 0.0,
              code: Path = ROOT) -> dict[str, Any]:
    """Publish ``events``, then deliver them with a fleet as ``make run`` starts it: one worker
    per core and, unless ``archiver`` is false, an archiver (started first: the stream must
    exist before the first record becomes final, or that record is not archived).
    ``arrival_rate``: the fleet runs first and the events arrive while it does, published by
    another process at that rate (:func:`run_arriving`). ``code``: the checkout the fleet's
    processes run from."""
    settings = Settings.from_env(settings_env)
    client.flushall()
    used0 = int(client.info("memory")["used_memory"])
    archive = Archiver(settings_env, workdir / f"archive-{time.time():.0f}", client, code) if archiver else None
    if arrival_rate:
        try:
            return run_arriving(events, settings, settings_env, pool, processes, workdir, client, buyer, archive,
                                used0, arrival_rate, code, metrics)
        finally:
            if archive:
                archive.stop()
    try:
        redis_cpu_publish0 = redis_cpu_s(client)
        client.config_resetstat()
        with Publisher(settings) as publisher:
            published = time.perf_counter()
            for start in range(0, len(events), 1000):
                publisher.publish_many(events[start:start + 1000])
            publisher.flush()
            publish_s = time.perf_counter() - published
        in_flight_bytes = (int(client.info("memory")["used_memory"]) - used0) / len(events)
        redis_cpu0 = redis_cpu_s(client)
        redis_cpu_publish = redis_cpu0 - redis_cpu_publish0
        publish_commands = command_stats(client, len(events))
        client.config_resetstat()  # the delivery phase's commands (measure_fleet)
        archiver_cpu0 = archive.cpu() if archive else 0.0
        fleet = Fleet(settings_env, pool, processes, workdir, metrics=metrics, code=code)
        try:
            result = measure_fleet(events, settings, fleet, client, buyer, archive, used0, redis_cpu0,
                                   archiver_cpu0, latency)
            result.update(redis_bytes_per_in_flight_event=round(in_flight_bytes),
                          # Publishing's share (accept script, triggers), not in redis_cpu_s_per_1000:
                          redis_cpu_s_per_1000_publish=round(redis_cpu_publish / len(events) * 1000, 3),
                          publish_preload_rate=round(len(events) / publish_s), pool=pool, processes=processes,
                          redis_commands_per_1000_publish=publish_commands)
        finally:
            fleet.stop()
        if archive:
            stop_archiver(archive, client, result)
        return result
    finally:
        if archive:
            archive.stop()


def stop_archiver(archive: Archiver, client: redis.Redis, result: dict[str, Any]) -> None:
    """Stop the archiver after a fleet run, once it has written everything published (60 s at
    most), and add to ``result["archive"]`` whether its files hold every finished event, once."""
    wait_until(archive.caught_up, ARCHIVE_CATCH_UP_S, 0.1)
    finished = terminal_count(client)
    backlog = archive.backlog()
    exit_code = archive.stop()
    lines, distinct = archive.lines()
    result["archive"].update(
        finished=finished, lines=lines, distinct_ids=distinct, exit_code=exit_code,
        backlog_at_stop=backlog[0] if backlog else None,
        oldest_unwritten_s=round(backlog[1], 1) if backlog else None,
        caught_up=bool(backlog and backlog[0] == 0 and lines == finished == distinct))


def start_arrivals(events: list[dict[str, Any]], path: Path, rate: float, env: dict[str, str], code: Path,
                   chunk: int | None = None) -> subprocess.Popen[bytes]:
    """A publisher process (``bench/arrivals.py``: this checkout's script, ``code``'s packages,
    so an older commit publishes with its own ledger scripts) publishing ``events``, written
    to ``path``, at ``rate`` per second; ``chunk`` events at a time (None: the script's
    default). Its JSON line of figures comes on its stdout."""
    path.write_text("\n".join(json.dumps(e) for e in events))
    args = [sys.executable, str(ROOT / "bench" / "arrivals.py"), "--events", str(path), "--rate", str(rate)]
    if chunk is not None:
        args += ["--chunk", str(chunk)]
    return subprocess.Popen(args, cwd=code, env={**env, "PYTHONPATH": str(code)}, stdout=subprocess.PIPE)


def run_arriving(events: list[dict[str, Any]], settings: Settings, settings_env: dict[str, str], pool: str,
                 processes: int, workdir: Path, client: redis.Redis, buyer: Buyer, archive: Archiver | None,
                 used0: int, arrival_rate: float, code: Path, metrics: bool) -> dict[str, Any]:
    """The fleet as it runs in production: workers (and archiver) up first, the events
    published while they run, by another process (``bench/arrivals.py``, from ``code``) at
    ``arrival_rate`` per second. Redis's CPU then includes publishing (the accept script,
    the triggers); the publisher's own CPU is reported apart (it is the auction server's)."""
    fleet = Fleet(settings_env, pool, processes, workdir, metrics=metrics, code=code)
    try:
        redis_cpu0 = redis_cpu_s(client)
        client.config_resetstat()  # measure_fleet's commands: publishing's and delivering's, from here
        archiver_cpu0 = archive.cpu() if archive else 0.0
        publisher = start_arrivals(events, workdir / f"arrivals-{time.time():.0f}.jsonl", arrival_rate,
                                   settings_env, code)
        result = measure_fleet(events, settings, fleet, client, buyer, archive, used0, redis_cpu0, archiver_cpu0,
                               latency=False)
        published = json.loads(publisher.communicate(timeout=600)[0])
        result.update(arrivals=published, arrival_rate=arrival_rate, pool=pool, processes=processes,
                      redis_includes_publishing=True,
                      publisher_cpu_s_per_1000=round(published["cpu_s"] / len(events) * 1000, 3))
    finally:
        fleet.stop()
    if archive:
        stop_archiver(archive, client, result)
    return result


def measure_fleet(events: list[dict[str, Any]], settings: Settings, fleet: Fleet, client: redis.Redis,
                  buyer: Buyer, archive: Archiver | None, used0: int, redis_cpu0: float, archiver_cpu0: float,
                  latency: bool) -> dict[str, Any]:
    tree = fleet.tree()
    cpu0, buyer_cpu0 = cpu_seconds(tree), cpu_seconds(buyer.pids())
    done = wait_until(lambda: terminal_count(client) >= len(events), 900, 0.1)
    delivered_at = time.monotonic()
    tree = fleet.tree()
    cpu = cpu_seconds(tree) - cpu0
    buyer_cpu = cpu_seconds(buyer.pids()) - buyer_cpu0
    redis_cpu_delivered = redis_cpu_s(client) - redis_cpu0
    archive_figures: dict[str, Any] | None = None
    redis_cpu = redis_cpu_delivered
    if archive:
        # The archive's cost of these events: the archiver's CPU and Redis's (XADD in the
        # ledger scripts, XREADGROUP, XACK, XDEL) until it has written all of them.
        backlog = archive.backlog()
        caught_up = wait_until(archive.caught_up, ARCHIVE_CATCH_UP_S, 0.05)
        redis_cpu = redis_cpu_s(client) - redis_cpu0
        archiver_cpu = archive.cpu() - archiver_cpu0
        archive_figures = {
            "cpu_s_per_1000": round(archiver_cpu / len(events) * 1000, 3),
            "backlog_at_delivered": backlog[0] if backlog else None,
            "caught_up_after_delivered_s": round(time.monotonic() - delivered_at, 2) if caught_up else None,
            "dir": str(archive.root)}
    # Calls and usec per command per 1,000 events, from the fleet's start until the archive
    # caught up (with an archiver) or the events were final.
    commands = command_stats(client, len(events))
    rss = peak_rss_mib(tree)
    records = read_records(client, [e["id"] for e in events])
    first_attempt_starts = [float(r["attempts"][0]["started_at"]) for r in records if r["attempts"]]
    first_attempt_ends = [attempt_end_s(r["attempts"][0]) for r in records if r["attempts"]]
    seconds = max(first_attempt_ends) - min(first_attempt_starts)
    finished_bytes = (int(client.info("memory")["used_memory"]) - used0) / len(events)
    states: dict[str, int] = {}
    for r in records:
        states[r["state"] or "missing"] = states.get(r["state"] or "missing", 0) + 1
    failed_first = sum(1 for r in records if r["attempts"] and (
        r["attempts"][0]["error"] is not None or (r["attempts"][0]["status"] or 0) >= 400))
    retried = sum(1 for r in records if len(r["attempts"]) == 2)
    latency_figures = None
    if latency:
        latency_figures = measure_latency(settings, client, events[0]["url"].split("/win")[0],
                                          rate=max(1, int(len(events) / seconds / 2)), duration_s=8)
    return {
        "deliveries": len(records), "complete": done, "seconds": round(seconds, 3),
        "rate": round(len(events) / seconds),
        "cpu_s_per_1000": round(cpu / len(events) * 1000, 3),
        # With an archiver: until it has written every final record of these events.
        "redis_cpu_s_per_1000": round(redis_cpu / len(events) * 1000, 3),
        "redis_cpu_s_per_1000_at_delivered": round(redis_cpu_delivered / len(events) * 1000, 3),
        "buyer_cpu_s_per_1000": round(buyer_cpu / len(events) * 1000, 3),
        "peak_rss_mib_per_process": rss,
        "redis_bytes_per_finished_event": round(finished_bytes),
        "states": states, "first_attempt_failed": failed_first, "retried": retried,
        "retried_exactly_once": failed_first == retried,
        "latency": latency_figures, "archiver": archive is not None, "archive": archive_figures,
        "redis_commands_per_1000": commands,
    }


def measure_latency(
    settings: Settings, client: redis.Redis, base_url: str, rate: int, duration_s: float
) -> dict[str, Any]:
    """p50/p99 from publish() to the end of the first attempt, at a steady ``rate``."""
    n = int(rate * duration_s)
    run = f"lat{time.time():.0f}"
    events = make_events(n, int(base_url.rsplit(":", 1)[1]), run)
    published_at: dict[str, float] = {}
    # This process holds the earlier runs' events and records: a full collection of that
    # heap stalls the publisher's sender thread (measured: p99 246 ms instead of ~86 ms).
    # An auction process does the same after start-up (docs/design.md "Publishing from Python").
    gc.collect()
    gc.freeze()
    with Publisher(settings) as publisher:
        published_at.update(publish_paced(publisher, events, rate))
    ids = list(published_at)

    def all_first_attempts_done() -> bool:
        records = read_records(client, ids)
        return all(r["attempts"] for r in records)

    wait_until(all_first_attempts_done, 120, 0.2)
    gc.unfreeze()
    records = read_records(client, ids)
    firsts = [(i, r["attempts"][0]) for i, r in zip(ids, records, strict=True) if r["attempts"]]
    firsts_ms = [((attempt_end_s(a) - published_at[i]) * 1000, a["status"] is not None) for i, a in firsts]
    lat_ms = sorted(ms for ms, _ in firsts_ms)
    # A buyer that hangs past the deadline (the realistic one, 1% of calls) puts its calls at
    # the deadline, right at the p99 boundary: report the p99 of the calls that got an HTTP
    # answer too, and how many did not (timeouts, connection errors).
    answered_ms = sorted(ms for ms, answered in firsts_ms if answered)
    return {"rate": rate, "events": n, "p50_ms": round(statistics.median(lat_ms), 1),
            "p99_ms": round(percentile(lat_ms, 0.99), 1),
            "p99_answered_ms": round(percentile(answered_ms, 0.99), 1) if answered_ms else None,
            "no_answer": len(firsts) - len(answered_ms)}


# -- the publisher on its own ------------------------------------------------------------------


def run_publish(settings: Settings, client: redis.Redis, n: int = 100_000, with_ids: bool = True) -> dict[str, Any]:
    client.flushall()
    events = make_events(n, 9, "pub")
    if not with_ids:  # the publisher makes the ids (cgrid.event.new_event_id)
        for event in events:
            del event["id"]
    durations = []
    publisher = Publisher(settings)
    perf = time.perf_counter_ns
    gc_pauses_ns: list[int] = []
    gc_started = [0]

    def on_gc(phase: str, _info: dict[str, Any]) -> None:
        if phase == "start":
            gc_started[0] = perf()
        else:
            gc_pauses_ns.append(perf() - gc_started[0])

    gc.callbacks.append(on_gc)
    try:
        started = perf()
        for event in events:
            t0 = perf()
            publisher.publish(event)
            durations.append(perf() - t0)
        loop_s = (perf() - started) / 1e9
    finally:
        gc.callbacks.remove(on_gc)
    flush_started = perf()
    publisher.close()
    flush_s = (perf() - flush_started) / 1e9
    durations.sort()
    accepted = int(client.zcard("cgrid:due"))
    client.flushall()
    return {"events": n, "with_ids": with_ids, "calls_per_s": round(n / loop_s),
            "p50_us": round(durations[n // 2] / 1000, 1),
            "p99_us": round(percentile(durations, 0.99) / 1000, 1), "max_us": round(durations[-1] / 1000),
            "longest_gc_pause_us": round(max(gc_pauses_ns, default=0) / 1000),
            "final_flush_s": round(flush_s, 3), "accepted_per_s_incl_flush": round(n / (loop_s + flush_s)),
            "accepted": accepted}


# -- the whole benchmark -----------------------------------------------------------------------


BARE_CALLS = 200_000  # a bare call's cost is measured over this many calls (a few seconds) ...
BARE_RUNS = 3  # ... this many times; the median is the unit


def bare_call(events: list[dict[str, Any]], workdir: Path, buyer: Buyer) -> dict[str, Any]:
    """The bare libcurl call (one process, 100 in flight): the median of BARE_RUNS runs of
    BARE_CALLS calls (the events' calls over and over): one short run's figure moved 2x
    from run to run on this machine."""
    calls = (events * (BARE_CALLS // len(events) + 1))[:BARE_CALLS]
    runs = sorted((run_ceiling_loop(calls, 1, "bare", 100, workdir, buyer) for _ in range(BARE_RUNS)),
                  key=lambda r: r["cpu_s_per_1000"])
    return {**runs[len(runs) // 2], "runs_cpu_s_per_1000": [r["cpu_s_per_1000"] for r in runs]}


def fleet_cost(g: dict[str, Any], bare: dict[str, Any]) -> dict[str, Any]:
    """The fleet's CPU per event in CPU ms (= CPU s per 1,000): workers, Redis (delivering,
    archiving and publishing) and archiver; and that over a bare libcurl call's."""
    redis_ms = g["redis_cpu_s_per_1000"] + (0.0 if g.get("redis_includes_publishing")
                                            else g["redis_cpu_s_per_1000_publish"])
    archiver_ms = g["archive"]["cpu_s_per_1000"] if g.get("archive") else 0.0
    total = g["cpu_s_per_1000"] + redis_ms + archiver_ms
    return {"workers_ms": g["cpu_s_per_1000"], "redis_ms": round(redis_ms, 3), "archiver_ms": archiver_ms,
            "fleet_ms": round(total, 3), "rate": g["rate"],
            "x_bare_call": round(total / bare["cpu_s_per_1000"], 2) if bare["cpu_s_per_1000"] else None}


def scenario(name: str, n: int, n_naive: int, pool: str, workdir: Path, server: RedisServer,
             settings_extra: dict[str, str], archiver: bool = True, metrics: bool = False,
             arrival_rate: float = 0.0, code: Path = ROOT) -> dict[str, Any]:
    processes = os.cpu_count() or 2
    arriving: dict[str, Any] | None = None
    cost: dict[str, Any] | None = None
    timeout_s = 2.0
    extra = {"CGRID_TIMEOUT_S": str(timeout_s), **publishes_like(code), **settings_extra}
    env = fleet_env(server.url, extra)
    settings = Settings.from_env(env)
    client = redis.Redis.from_url(server.url)
    buyer = Buyer.start(name, hang_s=timeout_s + 1)
    try:
        events = make_events(n, buyer.port, f"{name}{time.time():.0f}")
        print(f"[{name}] buyer: {buyer.kind}; {n} events; ceiling...", flush=True)
        # Fast buyer: one blocking urllib3 call at a time is its cheapest loop; slow buyer:
        # 500 threads. The libcurl multi loop keeps as many calls in flight as a worker
        # process may (CGRID_CALL_CONCURRENCY).
        loops = [("urllib3", 1 if name == "fast" else 500),
                 ("pycurl", 100 if name == "fast" else settings.call_concurrency)]
        ceiling = run_ceiling(events, processes, loops, workdir, buyer)
        print(f"[{name}] ceiling {ceiling['rate']}/s; naive baseline...", flush=True)
        client.flushall()
        naive = run_naive(make_events(n_naive, buyer.port, f"naive{time.time():.0f}"), processes, server.url,
                          workdir)
        print(f"[{name}] naive {naive['rate']}/s; cgrid-s2s...", flush=True)
        cgrid = run_cgrid(events, env, pool, processes, workdir, client, buyer, archiver=archiver, metrics=metrics,
                          code=code)
        print(f"[{name}] cgrid-s2s {cgrid['rate']}/s", flush=True)
        if name == "fast":
            # Issue 17's unit: a bare libcurl call, one process, 100 in flight; and the fleet
            # with the events arriving while it runs (publishing's Redis CPU included).
            bare = bare_call(events, workdir, buyer)
            print(f"[{name}] bare libcurl call {bare['cpu_s_per_1000']} CPU ms; events arriving at "
                  f"{arrival_rate}/s...", flush=True)
            arriving = run_cgrid(make_events(n, buyer.port, f"arr{time.time():.0f}"), env, pool, processes, workdir,
                                 client, buyer, latency=False, archiver=archiver, metrics=metrics,
                                 arrival_rate=arrival_rate, code=code)
            cost = {"bare_call_cpu_ms": bare["cpu_s_per_1000"], "bare_loop": bare,
                    "events_published_first": fleet_cost(cgrid, bare), "events_arriving": fleet_cost(arriving, bare)}
    finally:
        buyer.stop()
    # The bound holds where CPU limits the rate: the fast buyer.
    bound = cpu_bound(ceiling, cgrid, processes) if name == "fast" else None
    urllib3_loop = next(t for t in ceiling["tried"] if t["mode"] == "urllib3")
    return {"scenario": name, "buyer": buyer.kind, "ceiling": ceiling, "naive": naive, "cgrid": cgrid,
            "cgrid_arriving": arriving, "cost_per_event": cost, "code": str(code),
            "cpu_bound": bound, "ratio_to_ceiling": round(cgrid["rate"] / ceiling["rate"], 2),
            "ratio_to_urllib3_loop": round(cgrid["rate"] / urllib3_loop["rate"], 2),
            "ratio_to_naive": round(cgrid["rate"] / naive["rate"], 1)}


# Google's published sample keys: a quarter of the buyers in the buyers-file run encrypt.
SAMPLE_KEYS = ('price_encryption_key = "skU7Ax_NL5pPAFyKdkfZjZz2-VhIN8bjj1rVFOaJ_5o="\n'
               'price_integrity_key = "arO23ykdNqUQ5LEoQ0FVmPkBd7xB5CO89PDZlSjpFxo="\n')


def write_buyers_file(path: Path, buyers: int) -> None:
    tables = []
    for i in range(buyers):
        table = f"[buyers.dsp{i}]\ntimeout_s = 2.0\nmax_concurrency = 100\n"
        if i % 4 == 0:
            table += SAMPLE_KEYS
        tables.append(table)
    path.write_text("\n".join(tables))


def buyers_scenario(n: int, buyers: int, pool: str, workdir: Path, server: RedisServer,
                    archiver: bool = True) -> dict[str, Any]:
    """The fast buyer, events spread over ``buyers`` buyer ids: without a buyers file, then
    with one that lists them all, a quarter with price keys (issue 9: within 10%)."""
    processes = os.cpu_count() or 2
    buyers_file = workdir / "buyers.toml"
    write_buyers_file(buyers_file, buyers)
    client = redis.Redis.from_url(server.url)
    buyer = Buyer.start("fast", hang_s=3.0)
    runs = {}
    try:
        for label, extra in (("without", {}), ("with", {"CGRID_BUYERS_FILE": str(buyers_file)}),
                             ("without again", {}), ("with again", {"CGRID_BUYERS_FILE": str(buyers_file)})):
            env = fleet_env(server.url, {"CGRID_TIMEOUT_S": "2", **extra})
            events = make_events(n, buyer.port, f"b{label[:4]}{time.time():.0f}", buyers=buyers)
            print(f"[buyers] {buyers} buyers, {label} a buyers file...", flush=True)
            runs[label] = run_cgrid(events, env, pool, processes, workdir, client, buyer, latency=False,
                                    archiver=archiver)
    finally:
        buyer.stop()
    rate = {label: r["rate"] for label, r in runs.items()}
    cpu = {label: r["cpu_s_per_1000"] for label, r in runs.items()}
    archived = {label: r["archive"]["caught_up"] if r["archive"] else None for label, r in runs.items()}
    return {"buyers": buyers, "encrypting": (buyers + 3) // 4, "events": n, "rate": rate, "cpu_s_per_1000": cpu,
            "archived_all": archived, "runs": runs,
            "ratio": round((rate["with"] + rate["with again"]) / (rate["without"] + rate["without again"]), 3)}


def cpu_bound(ceiling: dict[str, Any], cgrid: dict[str, Any], cores: int) -> dict[str, Any]:
    """The most a fleet could deliver on these cores if its workers spent no CPU beyond
    their libcurl calls: the cores shared by those calls (the pycurl bare loop's CPU), the
    buyer's CPU for them and the ledger's Redis CPU (as measured for the fleet). Only a
    bound where the rate is limited by CPU (the fast buyer)."""
    loop = next(t for t in ceiling["tried"] if t["mode"] == "pycurl")
    per_1000_s = loop["cpu_s_per_1000"] + loop["buyer_cpu_s_per_1000"] + cgrid["redis_cpu_s_per_1000"]
    rate = cores * 1000 / per_1000_s
    return {"cores": cores, "cpu_s_per_1000": round(per_1000_s, 3), "rate": round(rate),
            "ratio_to_ceiling": round(rate / ceiling["rate"], 2)}


def archive_summary(g: dict[str, Any]) -> str:
    """One line on the archiver of a fleet run: its cost, and whether it wrote everything."""
    a = g.get("archive")
    if not a:
        return "archiver: off (--no-archiver); Redis CPU includes no archive stream"
    caught = (f"caught up {a['caught_up_after_delivered_s']} s after the last delivery"
              if a["caught_up_after_delivered_s"] is not None else
              f"NOT caught up {ARCHIVE_CATCH_UP_S:.0f} s after the last delivery")
    text = (f"archiver: {a['cpu_s_per_1000']} CPU s/1k ({caught}; backlog then {a['backlog_at_delivered']}); "
            f"Redis {g['redis_cpu_s_per_1000']} CPU s/1k with its writes read back "
            f"({g['redis_cpu_s_per_1000_at_delivered']} at the last delivery); "
            f"archived {a['lines']} lines ({a['distinct_ids']} ids) of {a['finished']} events finished")
    if not a["caught_up"]:
        text += (f" -- NOT ALL ARCHIVED: backlog at stop {a['backlog_at_stop']} "
                 f"(oldest {a['oldest_unwritten_s']} s), archiver exit code {a['exit_code']}")
    return text


def print_table(results: list[dict[str, Any]], publish: list[dict[str, Any]] | None) -> None:
    print()
    print(f"{'scenario':10} {'system':10} {'deliveries/s':>12} {'CPU s/1k':>9} {'vs ceiling':>10} "
          f"{'vs naive':>8}  notes")
    for r in results:
        c, n, g = r["ceiling"], r["naive"], r["cgrid"]
        for index, loop in enumerate(c["tried"]):
            label = "ceiling" if loop["rate"] == c["rate"] else "bare loop"
            print(f"{r['scenario'] if index == 0 else '':10} {label:10} {loop['rate']:>12} "
                  f"{loop['cpu_s_per_1000']:>9} {loop['rate'] / c['rate']:>10.2f} {'':>8}  bare loop, "
                  f"{loop['processes']} proc x {loop['concurrency']} "
                  f"{'in flight, libcurl multi' if loop['mode'] == 'pycurl' else 'threads, blocking urllib3'}")
        print(f"{'':10} {'naive':10} {n['rate']:>12} {n['cpu_s_per_1000']:>9} {'':>10} {'1.0':>8}  "
              f"{n['deliveries']} events, prefork -c {n['processes']}")
        print(f"{'':10} {'cgrid-s2s':10} {g['rate']:>12} {g['cpu_s_per_1000']:>9} {r['ratio_to_ceiling']:>10} "
              f"{r['ratio_to_naive']:>8}  + Redis {g['redis_cpu_s_per_1000']} CPU s/1k; {g['pool']}; "
              f"{r['ratio_to_urllib3_loop']}x the blocking urllib3 loop")
        print(f"{'':10} {'':10} buyer's CPU s per 1k events: ceiling {c['buyer_cpu_s_per_1000']}, "
              f"cgrid-s2s {g['buyer_cpu_s_per_1000']}; Redis CPU s per 1k for publishing them (not in the "
              f"+ Redis above): {g['redis_cpu_s_per_1000_publish']}")
        if r["cpu_bound"]:
            b = r["cpu_bound"]
            print(f"{'':10} {'':10} a fleet adding no CPU to its libcurl calls: at most {b['rate']}/s "
                  f"({b['ratio_to_ceiling']}x ceiling) = {b['cores']} cores / "
                  f"{b['cpu_s_per_1000']} CPU s/1k (pycurl loop + its buyer + Redis)")
        if r.get("cost_per_event"):
            k = r["cost_per_event"]
            for label, key in (("published first", "events_published_first"), ("arriving", "events_arriving")):
                f = k[key]
                print(f"{'':10} {'':10} CPU ms per event, {label}: workers {f['workers_ms']} + Redis {f['redis_ms']} "
                      f"(publishing included) + archiver {f['archiver_ms']} = {f['fleet_ms']} = "
                      f"{f['x_bare_call']}x a bare libcurl call ({k['bare_call_cpu_ms']} CPU ms, median of "
                      f"{k['bare_loop']['runs_cpu_s_per_1000']}; 1 proc x 100 in flight); {f['rate']}/s")
            a = r["cgrid_arriving"]
            print(f"{'':10} {'':10} arriving: {a['arrivals']['rate']}/s published (asked {a['arrival_rate']:.0f}/s; "
                  f"publisher CPU {a['publisher_cpu_s_per_1000']} ms/event, not in the fleet's), states {a['states']}, "
                  f"{archive_summary(a)}")
        lat = g["latency"]
        print(f"{'':10} {'':10} publish->first attempt done at {lat['rate']}/s: p50 {lat['p50_ms']} ms, "
              f"p99 {lat['p99_ms']} ms; calls with an answer: p99 {lat['p99_answered_ms'] or '-'} ms "
              f"({lat['no_answer']} of {lat['events']} had none)")
        print(f"{'':10} {'':10} peak RSS MiB/process {g['peak_rss_mib_per_process']}; Redis bytes per "
              f"in-flight event {g['redis_bytes_per_in_flight_event']}, "
              f"per finished {g['redis_bytes_per_finished_event']}")
        print(f"{'':10} {'':10} states {g['states']}; first attempts failed {g['first_attempt_failed']}, "
              f"retried {g['retried']} (exactly once: {g['retried_exactly_once']})")
        print(f"{'':10} {'':10} {archive_summary(g)}")
    for run in publish or []:
        print(f"\nPublisher.publish, one thread, events {'with' if run['with_ids'] else 'without'} ids: "
              f"{run['calls_per_s']} calls/s, p50 {run['p50_us']} µs, "
              f"p99 {run['p99_us']} µs, max {run['max_us']} µs (longest garbage collection in the loop: "
              f"{run['longest_gc_pause_us']} µs); {run['events']} events accepted "
              f"at {run['accepted_per_s_incl_flush']}/s including the final flush")


def main() -> int:

    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", choices=["fast", "realistic", "isolation", "buyers", "reconcile", "https", "all"],
                        default="all")
    parser.add_argument("--reconcile-notices", type=int, default=10_000_000,
                        help="the buyer's notices of the day in the reconcile scenario")
    parser.add_argument("--buyers", type=int, default=None,
                        help="buyer ids in the buyers-file scenario (default 1000); TLS buyers in https (100)")
    parser.add_argument("--events", type=int, default=None, help="events per run (default 40,000; https: 60,000)")
    parser.add_argument("--naive-events", type=int, default=5_000)
    parser.add_argument("--pool", choices=["solo", "prefork", "threads"], default="solo",
                        help="the fleet's pool: solo and threads run one worker per core, prefork one worker")
    parser.add_argument("--no-publish", action="store_true", help="skip the Publisher micro-benchmark")
    parser.add_argument("--set", action="append", default=[], metavar="CGRID_NAME=VALUE",
                        help="a setting for the fleet under test (repeatable)")
    parser.add_argument("--cluster", action="store_true",
                        help="only Redis CPU per event with the ledger on a Redis Cluster against one Redis, "
                             "alternating (--events per run, --rounds pairs; bench/cluster.py)")
    parser.add_argument("--rounds", type=int, default=2, help="pairs of runs with --cluster")
    parser.add_argument("--no-archiver", action="store_true",
                        help="run the fleet without its archiver (make run starts one): the archive stream is not "
                             "made, so the ledger scripts add nothing to it")
    parser.add_argument("--arrival-rate", type=float, default=6000.0,
                        help="fast scenario: events per second published while the fleet runs, for the CPU per event "
                             "with events arriving (one publisher process, bench/arrivals.py)")
    parser.add_argument("--code", type=Path, default=ROOT,
                        help="run the fleet (workers, archiver, publisher) from this checkout: an older commit's "
                             "worktree, to compare it with this one in one sitting")
    parser.add_argument("--metrics", action="store_true",
                        help="the fleet's workers record Prometheus metrics (CGRID_METRICS_PORT, a free port each)")
    args = parser.parse_args()
    https_buyers, https_events = args.buyers or 100, args.events or 60_000
    args.buyers, args.events = args.buyers or 1000, args.events or 40_000
    if args.cluster:
        cluster_result = run_cluster_bench(args.events, args.rounds, dict(item.split("=", 1) for item in args.set))
        print_cluster(cluster_result)
        RESULTS.mkdir(parents=True, exist_ok=True)
        out = RESULTS / f"{time.strftime('%Y%m%d-%H%M%S')}-cluster.json"
        out.write_text(json.dumps({"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
                                   "args": sys.argv[1:], "cluster": cluster_result}, indent=2))
        print(f"\nsaved {out.relative_to(ROOT)}")
        return 0
    results = []
    publish = None
    isolation = None
    buyers_run = None
    reconcile_run = None
    https_run = None
    with tempfile.TemporaryDirectory(prefix="cgrid-bench-") as tmp:
        workdir = Path(tmp)
        server = RedisServer(workdir / "redis").start()
        try:
            if not args.no_publish:
                publish_settings = Settings.from_env(fleet_env(server.url, {}))
                publish = [run_publish(publish_settings, redis.Redis.from_url(server.url), with_ids=with_ids)
                           for with_ids in (True, False)]
            names = {"all": ["fast", "realistic"], "isolation": [], "buyers": [],
                     "reconcile": [], "https": []}.get(args.scenario, [args.scenario])
            if args.scenario in ("reconcile", "all"):
                print(f"reconcile: a buyer-day of {args.reconcile_notices:,} notices on each side", flush=True)
                reconcile_run = run_reconcile_bench(args.reconcile_notices, 1.0, args.reconcile_notices // 10,
                                                    ["ids", "auctions", "counts"], workdir / "reconcile")
            if args.scenario in ("buyers", "all"):
                buyers_run = buyers_scenario(args.events, args.buyers, args.pool, workdir, server,
                                             archiver=not args.no_archiver)
            if args.scenario in ("https", "all"):
                https_run = run_https(https_events, https_buyers, workdir, server, run_ceiling_loop, run_cgrid,
                                      archiver=not args.no_archiver, code=args.code.resolve())
            if args.scenario in ("isolation", "all"):
                redis.Redis.from_url(server.url).flushall()
                isolation = run_isolation(server.url, workdir, progress=True)
            for name in names:
                n = args.events if name == "fast" else max(args.events // 2, 1000)
                n_naive = args.naive_events if name == "fast" else max(args.naive_events // 10, 200)
                results.append(scenario(name, n, n_naive, args.pool, workdir, server,
                                        dict(item.split("=", 1) for item in args.set),
                                        archiver=not args.no_archiver, metrics=args.metrics,
                                        arrival_rate=args.arrival_rate, code=args.code.resolve()))
        finally:
            server.stop()
    if results or publish:
        print_table(results, publish)
    if isolation is not None:
        print_report(isolation)
    if buyers_run is not None:
        b = buyers_run
        print(f"\nbuyers file: {b['events']} events over {b['buyers']} buyers, {b['encrypting']} encrypting the price: "
              + ", ".join(f"{label} {rate}/s ({b['cpu_s_per_1000'][label]} CPU s/1k)"
                          for label, rate in b["rate"].items())
              + f"; with/without {b['ratio']}")
        for label, run in b["runs"].items():
            print(f"  {label}: {archive_summary(run)}")
    if https_run is not None:
        print_https(https_run, archive_summary)
    RESULTS.mkdir(parents=True, exist_ok=True)
    tag = "" if args.code.resolve() == ROOT else "-" + code_commit(args.code.resolve())
    out = RESULTS / f"{time.strftime('%Y%m%d-%H%M%S')}{tag}.json"
    out.write_text(json.dumps({"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0],
                                           "load_average_1m_at_end": round(os.getloadavg()[0], 2)},
                               "args": sys.argv[1:], "archiver": not args.no_archiver, "metrics": args.metrics,
                               "publish": publish, "scenarios": results, "isolation": isolation,
                               "buyers_file": buyers_run, "reconcile": reconcile_run,
                               "https": https_run}, indent=2))
    print(f"\nsaved {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
