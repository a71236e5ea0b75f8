"""Named queues (docs/hosts.md): the routing settings, where the publisher and the sweeper
send triggers, and how the sweeper judges a trigger lost per queue. Real Redis."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from typing import Any

import pytest
import redis

from cgrid.broker import make_celery
from cgrid.errors import ConfigError
from cgrid.event import parse_event
from cgrid.ledger import Finish, Ledger, Outcome
from cgrid.routing import Routing
from cgrid.settings import Settings
from producer import Publisher
from tests.helpers import ROOT, fleet_env

GROUPS = "cgrid.big=dsp-a,dsp-b;cgrid.slow=dsp-c"
TTL = dict(ledger_ttl_s=3600, report_ttl_s=3600)


def test_buyer_queues_route_first_attempts_and_retries() -> None:
    routing = Settings.from_env({"CGRID_BUYER_QUEUES": GROUPS}).routing
    assert routing.queues == ("cgrid.deliver", "cgrid.retry", "cgrid.big", "cgrid.big.retry",
                              "cgrid.slow", "cgrid.slow.retry")
    assert [routing.queue_for("dsp-b", n) for n in (1, 2)] == ["cgrid.big", "cgrid.big.retry"]
    assert [routing.queue_for("dsp-c", n) for n in (1, 2)] == ["cgrid.slow", "cgrid.slow.retry"]
    assert [routing.queue_for("dsp-x", n) for n in (1, 2)] == ["cgrid.deliver", "cgrid.retry"]
    assert [routing.queue_for(None, n) for n in (1, 2)] == ["cgrid.deliver", "cgrid.retry"]
    plain = Settings.from_env({"CGRID_RETRY_QUEUE": "s2s.retries"}).routing
    assert plain.queues == ("cgrid.deliver", "s2s.retries") and plain.queue_for("dsp-a", 2) == "s2s.retries"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"CGRID_BUYER_QUEUES": "cgrid.big=dsp-a;cgrid.slow=dsp-a"},
         "CGRID_BUYER_QUEUES: buyer 'dsp-a' is in both 'cgrid.big' and 'cgrid.slow'"),
        ({"CGRID_BUYER_QUEUES": "cgrid.big=dsp-a,dsp-a"}, "buyer 'dsp-a' is twice in 'cgrid.big'"),
        ({"CGRID_BUYER_QUEUES": "big queue=dsp-a"}, "CGRID_BUYER_QUEUES: 'big queue' is not a queue name"),
        ({"CGRID_BUYER_QUEUES": "cgrid:big=dsp-a"}, "'cgrid:big' is not a queue name"),
        ({"CGRID_BUYER_QUEUES": "cgrid.big"}, "'cgrid.big' is not QUEUE=BUYER,BUYER"),
        ({"CGRID_BUYER_QUEUES": "cgrid.big="}, "queue 'cgrid.big' has no buyers"),
        ({"CGRID_BUYER_QUEUES": "cgrid.big=a;cgrid.big=b"}, "queue 'cgrid.big' is named twice"),
        ({"CGRID_BUYER_QUEUES": "cgrid.retry=dsp-a"}, "'cgrid.retry' would be both CGRID_RETRY_QUEUE"),
        ({"CGRID_BUYER_QUEUES": "cgrid.deliver=dsp-a"}, "'cgrid.deliver' would be both the deliver queue"),
        ({"CGRID_BUYER_QUEUES": "x=a;x.retry=b"}, "'x.retry' would be both the retry queue of group 'x'"),
        ({"CGRID_BUYER_QUEUES": "x=-"}, "'-' is not a buyer"),
        ({"CGRID_RETRY_QUEUE": "cgrid.deliver"}, "CGRID_RETRY_QUEUE: 'cgrid.deliver' is the deliver queue"),
        ({"CGRID_RETRY_QUEUE": "retry,other"}, "CGRID_RETRY_QUEUE: 'retry,other' is not a queue name"),
    ],
)
def test_bad_routing_settings_are_refused_naming_the_setting(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=r"^CGRID_") as refused:
        Settings.from_env(env)
    assert message in str(refused.value)


def test_bad_routing_stops_the_worker_and_the_command_line_with_one_line() -> None:
    env = fleet_env("redis://127.0.0.1:1/0", CGRID_BUYER_QUEUES="cgrid.big=dsp-a;cgrid.slow=dsp-a")
    worker = subprocess.run([sys.executable, "-m", "celery", "-A", "worker", "worker"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert worker.returncode == 2 and "Traceback" not in worker.stderr
    assert "cgrid-s2s: configuration error: CGRID_BUYER_QUEUES: buyer 'dsp-a'" in worker.stderr
    cli = subprocess.run([sys.executable, "-m", "ops.cli", "publish"], cwd=ROOT, env=env, input="",
                         capture_output=True, text=True, timeout=60)
    assert cli.returncode == 2 and "Traceback" not in cli.stderr and "CGRID_BUYER_QUEUES" in cli.stderr


def test_a_worker_without_q_consumes_every_queue_of_the_routing() -> None:
    settings = Settings.from_env({"CGRID_BUYER_QUEUES": GROUPS})
    app = make_celery(settings)
    assert tuple(app.amqp.queues.consume_from) == settings.routing.queues
    assert app.amqp.default_queue.name == "cgrid.deliver"
    app.amqp.queues.select(["cgrid.retry"])  # what -Q cgrid.retry does
    assert list(app.amqp.queues.consume_from) == ["cgrid.retry"]


def queued(client: redis.Redis, queue: str) -> list[tuple[int, list[str]]]:
    """(attempt, ids) of each trigger waiting on ``queue``, oldest first; a shared trigger's
    ids are those of the queue's pending list."""
    out = []
    for raw in reversed(client.lrange(queue, 0, -1)):
        message = json.loads(raw)
        args, kwargs, _ = json.loads(base64.b64decode(message["body"]))
        assert message["headers"]["task"] == "cgrid.deliver"
        if "shared" in kwargs:
            assert args[0] == []
            args[0] = [i.decode() for i in client.lrange(f"cgrid:pending:{queue}", 0, -1)]
        out.append((args[1], args[0]))
    return out


def event(event_id: str, buyer: str | None) -> dict[str, object]:
    return {"id": event_id, "kind": "burl", "upstream": "s2s", "url": "https://d.example/", "buyer": buyer}


@pytest.mark.parametrize("shared", ["1", "0"])
def test_the_publisher_batches_each_queues_events_together(redis_url: str, shared: str) -> None:
    settings = Settings.from_env({"CGRID_REDIS_URL": redis_url, "CGRID_BUYER_QUEUES": GROUPS,
                                  "CGRID_BATCH_SIZE": "3", "CGRID_SHARED_TRIGGERS": shared})
    client = redis.Redis.from_url(redis_url)
    buyers = ["dsp-a", "dsp-x", "dsp-c", None, "dsp-b", "dsp-x", "dsp-a", "dsp-a"]
    with Publisher(settings, linger_ms=1000) as publisher:
        publisher.publish_many([event(f"e{i}", buyer) for i, buyer in enumerate(buyers)])
        publisher.flush()
    if shared == "1":  # one trigger per queue, its pending list in order
        assert queued(client, "cgrid.big") == [(1, ["e0", "e4", "e6", "e7"])]
    else:  # a trigger per batch
        assert queued(client, "cgrid.big") == [(1, ["e0", "e4", "e6"]), (1, ["e7"])]
    assert queued(client, "cgrid.deliver") == [(1, ["e1", "e3", "e5"])]
    assert queued(client, "cgrid.slow") == [(1, ["e2"])]
    assert client.llen("cgrid.retry") == 0 and client.llen("cgrid.big.retry") == 0


@pytest.mark.parametrize("shared", ["1", "0"])
def test_without_groups_the_publisher_sends_everything_to_the_deliver_queue(redis_url: str, shared: str) -> None:
    settings = Settings.from_env({"CGRID_REDIS_URL": redis_url, "CGRID_BATCH_SIZE": "4",
                                  "CGRID_SHARED_TRIGGERS": shared})
    client = redis.Redis.from_url(redis_url)
    with Publisher(settings, linger_ms=0) as publisher:
        publisher.publish_many([event(f"e{i}", f"dsp-{i}") for i in range(6)])
    expected = [["e0", "e1", "e2", "e3", "e4", "e5"]] if shared == "1" else [["e0", "e1", "e2", "e3"], ["e4", "e5"]]
    assert queued(client, "cgrid.deliver") == [(1, ids) for ids in expected]


@pytest.fixture()
def ledger(redis_url: str) -> Ledger:
    return Ledger(redis.Redis.from_url(redis_url))


def accept(ledger: Ledger, *pairs: tuple[str, str]) -> None:
    ledger.accept([parse_event(event(i, buyer)) for i, buyer in pairs], redeliver_after_s=0.0, **TTL)


def fail_first_attempt(ledger: Ledger, *ids: str) -> None:
    ledger.claim(list(ids), 1, lease_s=10, sent_at_s=0)
    attempt = json.dumps({"n": 1, "started_at": time.time(), "ms": 1.0, "status": 500, "error": None})
    ledger.finish([Finish(i, Outcome.FAIL, attempt) for i in ids], 1, retry_delay_s=0.0, **TTL)


def test_the_sweeper_sends_each_retry_to_its_groups_retry_queue(ledger: Ledger) -> None:
    routing = Routing("q", "q.retry", (("g", ("grouped",)),))
    accept(ledger, ("a", "grouped"), ("b", "other"), ("c", "grouped"))
    fail_first_attempt(ledger, "a", "b", "c")
    sweep = dict(limit=100, redeliver_after_s=30, retry_delay_s=0, report_ttl_s=3600, routing=routing)
    _, first, second = ledger.sweep(**sweep)
    assert first == {} and {q: sorted(ids) for q, ids in second.items()} == {"g.retry": ["a", "c"], "q.retry": ["b"]}


def test_a_trigger_is_judged_lost_by_its_own_queue(ledger: Ledger) -> None:
    """Workers that drain one queue say nothing about a trigger waiting on another: with one
    watermark for all, a queue without consumers would get its triggers resent every
    CGRID_REDELIVER_AFTER_S, piling up copies."""
    routing = Routing("q", "q.retry", (("g", ("grouped",)),))
    client = ledger.client
    accept(ledger, ("grouped-1", "grouped"), ("plain-1", "other"))
    client.rpush("g", "the trigger of grouped-1")
    client.rpush("q", "the trigger of plain-1")
    sweep = dict(limit=100, redeliver_after_s=0.0, retry_delay_s=1, report_ttl_s=3600, routing=routing)
    time.sleep(0.01)
    def empty_queues() -> list[str]:  # as the sweeper reads them on the broker
        return [name for name in routing.queues if client.llen(name) == 0]

    assert ledger.sweep(**sweep, empty_queues=empty_queues())[1:] == ({}, {})  # both queues hold triggers: wait
    # Workers start a newer trigger from q: only q's older trigger counts as lost.
    ledger.claim(["unknown"], 1, lease_s=10, sent_at_s=time.time() + 0.001, queue="q")
    time.sleep(0.05)
    assert ledger.sweep(**sweep, empty_queues=empty_queues())[1:] == ({"q": ["plain-1"]}, {})
    assert client.exists("cgrid:watermark:q") and not client.exists("cgrid:watermark:g")
    # g empties (its trigger was lost with a Redis restart, say): resent to g.
    client.delete("g")
    time.sleep(0.01)
    assert ledger.sweep(**sweep, empty_queues=empty_queues())[1:] == ({"g": ["grouped-1"]}, {})


def test_status_names_the_queue_an_event_waits_on(ledger: Ledger, redis_url: str,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from ops.cli import main

    monkeypatch.setenv("CGRID_REDIS_URL", redis_url)
    monkeypatch.setenv("CGRID_BUYER_QUEUES", "cgrid.big=dsp-a")
    accept(ledger, ("first", "dsp-a"), ("again", "dsp-a"), ("plain", "dsp-x"))
    fail_first_attempt(ledger, "again")

    def waiting(event_id: str) -> dict[str, Any]:
        assert main(["status", event_id]) == 0
        return json.loads(capsys.readouterr().out)["waiting"]  # type: ignore[no-any-return]

    assert waiting("first")["queue"] == "cgrid.big" and waiting("first")["reason"] == "queued"
    assert waiting("again")["queue"] == "cgrid.big.retry"
    assert waiting("plain")["queue"] == "cgrid.deliver"
