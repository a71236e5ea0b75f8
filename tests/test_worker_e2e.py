"""End to end over real parts: a private redis-server, a real ``celery worker`` process
(prefork, threads and solo pools) and a recording buyer server on loopback."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from cgrid.ledger import Ledger
from cgrid.redis_server import RedisServer
from cgrid.settings import Settings
from ops.mock_dsp import MockDspServer
from producer import Publisher
from tests.helpers import ROOT, WorkerProcess, fleet_env, wait_final, wait_for

pytestmark = pytest.mark.integration

RETRY_DELAY_S = 1.0
TERMINAL = {"delivered", "failed", "rejected", "expired"}

# path -> (final state, number of calls, statuses of the attempts)
SCENARIOS: dict[str, tuple[str, int, list[Any]]] = {
    "/status/200": ("delivered", 1, [200]),
    "/status/204": ("delivered", 1, [204]),
    "/status/302": ("delivered", 1, [302]),
    "/status/201": ("delivered", 1, [201]),
    "/status/404": ("failed", 2, [404, 404]),
    "/status/500": ("failed", 2, [500, 500]),
    "/status/503": ("failed", 2, [503, 503]),
    "/reset": ("failed", 2, [None, None]),
    "/sleep/1500": ("failed", 2, [None, None]),
    "/trickle/100": ("failed", 2, [None, None]),
    "/sequence/500,204": ("delivered", 2, [500, 204]),
}


@pytest.fixture(scope="module", params=["prefork", "threads", "solo"])
def fleet(request: pytest.FixtureRequest, redis_server: RedisServer, dsp_server: MockDspServer,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    pool = request.param
    # Only 127.0.0.1 is allowed, so a call to 127.0.0.2 shows the guard without leaving loopback.
    env = fleet_env(redis_server.url, CGRID_RETRY_DELAY_S=RETRY_DELAY_S,
                    CGRID_ALLOWED_NETWORKS="127.0.0.1/32")
    log = tmp_path_factory.mktemp(f"worker-{pool}") / "worker.log"
    worker = WorkerProcess(env, log, pool=pool, concurrency=4 if pool != "prefork" else 2).start()
    settings = Settings.from_env(env)
    yield {"env": env, "settings": settings, "worker": worker, "pool": pool}
    worker.stop()


def calls_by_event(dsp: MockDspServer) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for call in dsp.log.snapshot():
        if "e=" in call["target"]:
            event_id = call["target"].split("e=", 1)[1].split("&")[0]
            out.setdefault(event_id, []).append(call)
    return out




def test_every_status_class_over_real_http(fleet: dict[str, Any], dsp: MockDspServer) -> None:
    run = uuid.uuid4().hex[:8]
    buyer = f"buyer-{fleet['pool']}-{run}"
    events = {
        f"{run}-{i}": {"id": f"{run}-{i}", "kind": "burl", "upstream": "u2s", "buyer": buyer,
                       "url": f"{dsp.url}{path}?e={run}-{i}"}
        for i, path in enumerate(SCENARIOS)
    }
    paths = dict(zip(events, SCENARIOS, strict=True))
    rejected_id = f"{run}-forbidden"
    events[rejected_id] = {"id": rejected_id, "kind": "nurl", "upstream": "u2s", "buyer": buyer,
                           "url": f"http://127.0.0.2:{dsp.server_address[1]}/?e={rejected_id}"}
    with Publisher(fleet["settings"]) as publisher:
        ids = publisher.publish_many(list(events.values()))
        # The same ids again (a replayed upstream batch): delivered once.
        assert publisher.publish_many(list(events.values())[:3]) == ids[:3]
    ledger = Ledger(redis.Redis.from_url(fleet["settings"].redis_url))
    records = wait_final(ledger, ids)
    calls = calls_by_event(dsp)

    for event_id, path in paths.items():
        state, n_calls, statuses = SCENARIOS[path]
        record = records[event_id]
        assert record["state"] == state, (path, record)
        assert len(calls.get(event_id, [])) == n_calls, (path, calls.get(event_id))
        assert [a["status"] for a in record["attempts"]] == statuses, (path, record)
        # A 201 is delivered but flagged, in status as in the report; nothing else is.
        assert record.get("unexpected_status", False) == (path == "/status/201"), (path, record)
        if n_calls == 2:
            first, second = (c["t"] for c in calls[event_id])
            assert RETRY_DELAY_S - 0.05 <= second - first <= RETRY_DELAY_S + 5, (path, second - first)
    assert records[rejected_id]["state"] == "rejected"
    assert "loopback" in records[rejected_id]["reason"]
    assert rejected_id not in calls
    timeouts = [records[i]["attempts"][0]["error"] for i, p in paths.items() if p.startswith(("/sleep", "/trickle"))]
    assert timeouts == ["timeout", "timeout"]
    # The redirect's target was never called.
    assert not any(c["target"].startswith("/redirected") for c in dsp.log.snapshot())

    row = next(r for r in ledger.report() if r["buyer"] == buyer)
    assert row["events"] == len(events)
    assert (row["delivered_first"], row["delivered_retry"], row["failed"], row["rejected"], row["unexpected"]) == (
        4, 1, 6, 1, 1)


def test_headers_reach_the_buyer(fleet: dict[str, Any], dsp: MockDspServer) -> None:
    run = uuid.uuid4().hex[:8]
    hostile_ua = "Mozilla/5.0\r\nX-Evil: 1"
    base = {"user_agent": hostile_ua, "forwarded_for": ["77.16.215.3", "garbage", "18.196.6.164"],
            "macros": {"AUCTION_PRICE": 0.0000125, "AUCTION_ID": "a 1"}}
    events = [
        {**base, "id": f"{run}-{kind}-{up}", "kind": kind, "upstream": up,
         "url": f"{dsp.url}/?e={run}-{kind}-{up}&p=${{AUCTION_PRICE}}&a=${{AUCTION_ID}}&x=${{OTHER}}"}
        for kind in ("nurl", "burl") for up in ("s2s", "u2s")
    ]
    with Publisher(fleet["settings"]) as publisher:
        ids = publisher.publish_many(events)
    wait_final(Ledger(redis.Redis.from_url(fleet["settings"].redis_url)), ids)
    calls = calls_by_event(dsp)
    for event_id in ids:
        [call] = calls[event_id]
        headers = call["headers"]
        kind, upstream = event_id.split("-")[1:]
        assert headers["User-Agent"] == "CGRID/1.0"
        assert ("X-CGRID-ServerUpstream" in headers) == (upstream == "s2s")
        with_user = not (kind == "nurl" and upstream == "s2s")
        assert headers.get("X-User-Agent") == ("Mozilla/5.0X-Evil: 1" if with_user else None)
        assert headers.get("X-Forwarded-For") == ("77.16.215.3, 18.196.6.164" if with_user else None)
        assert "X-Evil" not in headers
        # Exactly the header table of SPEC §3, plus Host: libcurl's default Accept is removed.
        expected = {"Host", "User-Agent"} | ({"X-CGRID-ServerUpstream"} if upstream == "s2s" else set())
        if with_user:
            expected |= {"X-User-Agent", "X-Forwarded-For"}
        assert set(headers) == expected, headers
        # Unknown tokens are not substituted and go out as they are.
        assert call["target"].endswith("&p=0.0000125&a=a%201&x=${OTHER}")


def test_cli_publish_status_report(fleet: dict[str, Any], dsp: MockDspServer, tmp_path: Path) -> None:
    if fleet["pool"] != "prefork":
        pytest.skip("the command line does not depend on the pool")
    run = uuid.uuid4().hex[:8]
    lines = [
        json.dumps({"id": f"{run}-ok", "kind": "burl", "upstream": "s2s", "buyer": f"cli-{run}",
                    "url": f"{dsp.url}/status/204?e={run}-ok"}),
        json.dumps({"kind": "burl", "upstream": "s2s", "url": "ftp://nope"}),
    ]
    cli = [sys.executable, "-m", "ops.cli"]
    env = fleet["env"]
    published = subprocess.run([*cli, "publish"], input="\n".join(lines), capture_output=True, text=True,
                               env=env, cwd=ROOT, timeout=60)
    assert published.returncode == 1  # one line was refused...
    assert published.stdout.split() == [f"{run}-ok"]  # ...the other accepted
    assert "line 2: url: must be an absolute http:// or https:// URL" in published.stderr
    assert "Traceback" not in published.stderr

    def status() -> dict[str, Any] | None:
        out = subprocess.run([*cli, "status", f"{run}-ok"], capture_output=True, text=True, env=env, cwd=ROOT)
        record = json.loads(out.stdout) if out.returncode == 0 else None
        return record if record and record["state"] == "delivered" else None

    record = wait_for(status, 30, "status to show delivered")
    assert record["attempts"][0]["n"] == 1 and record["attempts"][0]["status"] == 204
    assert "ms" in record["attempts"][0] and "error" in record["attempts"][0]

    unknown = subprocess.run([*cli, "status", "no-such-id"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert unknown.returncode == 1

    report = subprocess.run([*cli, "report", "--json", "--buyer", f"cli-{run}"], capture_output=True,
                            text=True, env=env, cwd=ROOT)
    [row] = json.loads(report.stdout)
    assert row["events"] == 1 and row["delivered_first"] == 1
    table = subprocess.run([*cli, "report"], capture_output=True, text=True, env=env, cwd=ROOT).stdout
    assert "first try" in table and f"cli-{run}" in table
