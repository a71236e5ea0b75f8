"""The command line's promises: an id on stdout means the event was accepted."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import redis

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
