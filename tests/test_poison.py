"""Poisoned messages on the queue are logged, recorded and dropped: the worker survives
and the events behind them are delivered."""

from __future__ import annotations

import base64
import copy
import json
import uuid
from pathlib import Path
from typing import Any, cast

import pytest
import redis

from cgrid.broker import DELIVER_TASK, make_celery, send_deliver
from cgrid.ledger import POISON_COUNT_KEY, POISON_LIST_KEY, Ledger
from cgrid.redis_server import RedisServer, free_port
from cgrid.routing import DELIVER_QUEUE
from cgrid.settings import Settings
from ops.mock_dsp import MockDspServer
from producer import Publisher
from tests.helpers import WorkerProcess, fleet_env, scrape, wait_for

pytestmark = pytest.mark.integration

RAW_POISONS = [
    b"not json at all",
    b'{"a": 1}',
    b"[1, 2]",
    json.dumps({"body": "!!!notbase64", "content-type": "application/json", "headers": {},
                "properties": {"delivery_tag": "x1", "body_encoding": "base64",
                               "delivery_info": {"exchange": "", "routing_key": "cgrid.deliver"}}}).encode(),
    b"x" * (8 * 1024 * 1024),  # giant
]


@pytest.mark.parametrize("pool", ["prefork", "solo"])
def test_poisoned_messages_do_not_wedge_the_worker(
    pool: str, redis_server: RedisServer, dsp: MockDspServer, tmp_path: Path
) -> None:
    metrics_port = free_port()
    env = fleet_env(redis_server.url, CGRID_METRICS_PORT=metrics_port)
    client = redis.Redis.from_url(redis_server.url)
    client.delete(POISON_COUNT_KEY, POISON_LIST_KEY)
    worker = WorkerProcess(env, tmp_path / "worker.log", pool=pool, name=f"poison-{pool}").start()
    try:
        settings = Settings.from_env(env)
        sender = make_celery(settings, name="test-sender")
        # A corrupt ledger record: the event JSON itself is garbage.
        ledger = Ledger(client)
        with Publisher(settings, linger_ms=0) as publisher:
            publisher.publish({"id": f"corrupt-{pool}", "kind": "burl", "upstream": "s2s",
                               "url": f"{dsp.url}/?e=corrupt"})
        client.hset(f"cgrid:ev:corrupt-{pool}", "event", "{broken")
        client.lpush("cgrid.deliver", f"stray-{pool}")  # a bare string pushed by mistake
        for item in RAW_POISONS:
            client.lpush("cgrid.deliver", item)
        sender.send_task(DELIVER_TASK, args=["not-a-list", 7, "x"])
        sender.send_task(DELIVER_TASK, args=[[f"corrupt-{pool}"], 1, 0.0])
        sender.send_task("cgrid.no_such_task", args=[])
        good = [f"good-{pool}-{i}" for i in range(5)]
        with Publisher(settings) as publisher:
            publisher.publish_many([{"id": i, "kind": "burl", "upstream": "s2s", "url": f"{dsp.url}/?e={i}"}
                                    for i in good])
        wait_for(lambda: all((ledger.record(i) or {}).get("state") == "delivered" for i in good), 30,
                 "the events behind the poison to be delivered")
        assert worker.process is not None and worker.process.poll() is None, "the worker died"
        corrupt = wait_for(lambda: (r := ledger.record(f"corrupt-{pool}")) and r["state"] == "rejected" and r,
                           30, "the corrupt record to be rejected")
        assert "event" in corrupt["reason"]
        # 5 raw poisons + the stray "poke" string + bad task arguments, each recorded.
        wait_for(lambda: ledger.poisoned() >= 7, 10, "poison to be recorded")
        reasons = [json.loads(e)["reason"] for e in client.lrange(POISON_LIST_KEY, 0, -1)]
        assert any(r.startswith("task arguments: ids") for r in reasons)
        assert "Unrecoverable error" not in worker.log_text()
        # The metric counts each one, from whichever process dropped it (prefork: the task's child too).
        wait_for(lambda: scrape(metrics_port)["cgrid_poisoned_messages_total"] == ledger.poisoned() >= 7, 10,
                 "cgrid_poisoned_messages_total to match the poison recorded in Redis")
    finally:
        worker.stop()


# -- messages kombu can read but Celery cannot (issue 16) -------------------------------------

def real_trigger(client: redis.Redis, settings: Settings) -> dict[str, Any]:
    """A trigger exactly as the fleet sends it (Celery's protocol 2 in kombu's envelope),
    taken back off its list before any worker runs: the template of the crafted ones."""
    send_deliver(make_celery(settings, name="test-template"), ["template-id"], 1, 0.0, DELIVER_QUEUE)
    raw = client.rpop(DELIVER_QUEUE)
    assert isinstance(raw, bytes)
    return cast(dict[str, Any], json.loads(raw))


def crafted(template: dict[str, Any], *, headers: dict[str, Any] | None = None, drop: tuple[str, ...] = (),
            body: Any = None, delivery_info: dict[str, Any] | None = None) -> bytes:
    """The template with a new id and delivery tag, some headers changed or dropped, its body
    or its delivery_info replaced."""
    message = copy.deepcopy(template)
    task_id = str(uuid.uuid4())
    message["headers"].update(id=task_id, root_id=task_id, **(headers or {}))
    for name in drop:
        del message["headers"][name]
    message["properties"]["delivery_tag"] = str(uuid.uuid4())
    if body is not None:
        message["body"] = base64.b64encode(json.dumps(body).encode()).decode()
    if delivery_info is not None:
        message["properties"]["delivery_info"] = delivery_info
    return json.dumps(message).encode()


def poison_reasons(client: redis.Redis) -> list[str]:
    return [json.loads(e)["reason"] for e in client.lrange(POISON_LIST_KEY, 0, -1)]


def push_then_deliver(client: redis.Redis, settings: Settings, dsp: MockDspServer, bad: list[bytes],
                      tag: str, worker: WorkerProcess) -> None:
    """Push the bad messages (first in line), then ten good events behind them: the good ones
    are delivered, each bad one is recorded once, none stays unacked, and a warm shutdown puts
    none of them back on the queue."""
    ledger = Ledger(client)
    for message in bad:
        client.lpush(DELIVER_QUEUE, message)
    good = [f"good-{tag}-{i}" for i in range(10)]
    with Publisher(settings) as publisher:
        publisher.publish_many([{"id": i, "kind": "burl", "upstream": "s2s", "url": f"{dsp.url}/?e={i}"}
                                for i in good])
    wait_for(lambda: all((ledger.record(i) or {}).get("state") == "delivered" for i in good), 40,
             "the events behind the bad messages to be delivered")
    wait_for(lambda: ledger.poisoned() >= len(bad), 10, "every bad message to be recorded")
    wait_for(lambda: client.hlen("unacked") == 0, 10, "no message left unacked")
    assert worker.process is not None and worker.process.poll() is None, "the worker died"
    worker.stop()  # warm shutdown: nothing goes back on the queue
    assert client.llen(DELIVER_QUEUE) == 0 and client.hlen("unacked") == 0
    assert ledger.poisoned() == len(bad), poison_reasons(client)
    log = worker.log_text()
    assert "Connection to broker lost" not in log
    assert "Unrecoverable error" not in log


@pytest.mark.parametrize("pool", ["solo", "prefork"])
def test_a_message_celery_cannot_read_is_rejected_not_held(
    pool: str, redis_url: str, dsp: MockDspServer, tmp_path: Path
) -> None:
    """A valid envelope whose Celery header or body is bad: checked before delivery, recorded,
    dropped. (Before: logged, then neither acked nor rejected, holding its prefetch slot, and
    under prefork its pool slot, for good: two of them stopped the worker.)"""
    env = fleet_env(redis_url)
    settings = Settings.from_env(env)
    client = redis.Redis.from_url(redis_url)
    template = real_trigger(client, settings)
    bad = [crafted(template, headers={"timelimit": 5}), crafted(template, headers={"timelimit": 5}),
           crafted(template, headers={"timelimit": ["a", None]}),
           crafted(template, body={"a": 1}), crafted(template, body=[1, 2])]
    worker = WorkerProcess(env, tmp_path / "worker.log", pool=pool, name=f"unreadable-{pool}").start()
    try:
        push_then_deliver(client, settings, dsp, bad, pool, worker)
    finally:
        worker.stop()
    reasons = poison_reasons(client)
    assert sum("headers.timelimit" in r for r in reasons) == 3, reasons
    assert sum(r.startswith("body") for r in reasons) == 2, reasons


def test_a_message_missing_a_field_is_poison_not_a_lost_connection(
    redis_url: str, dsp: MockDspServer, tmp_path: Path
) -> None:
    """kombu's Redis transport counts KeyError as a connection error: a header without ``id``
    made the worker reconnect once a second for good, the message first in line again each
    time; an empty ``delivery_info`` cost one reconnect and the message vanished unrecorded."""
    env = fleet_env(redis_url)
    settings = Settings.from_env(env)
    client = redis.Redis.from_url(redis_url)
    template = real_trigger(client, settings)
    bad = [crafted(template, drop=("id",)), crafted(template, delivery_info={}),
           crafted(template, delivery_info={"exchange": ""})]
    worker = WorkerProcess(env, tmp_path / "worker.log", pool="solo", name="missing-field").start()
    try:
        push_then_deliver(client, settings, dsp, bad, "missing", worker)
    finally:
        worker.stop()
    reasons = poison_reasons(client)
    assert sum("headers.id" in r for r in reasons) == 1, reasons
    assert sum("delivery_info" in r for r in reasons) == 2, reasons


@pytest.mark.parametrize("pool", ["solo", "prefork"])
def test_a_message_celery_fails_on_after_delivery_is_rejected(
    pool: str, redis_url: str, dsp: MockDspServer, tmp_path: Path
) -> None:
    """The second line of defence, for what the check before delivery does not foresee: the
    worker of ``tests/worker_unchecked.py`` has that check off, so Celery fails on these
    messages after kombu registered them as unacked. Each is rejected without requeue (its
    prefetch slot, and under prefork its pool slot, given back) and recorded; a KeyError from
    the message is no lost connection."""
    env = fleet_env(redis_url)
    settings = Settings.from_env(env)
    client = redis.Redis.from_url(redis_url)
    template = real_trigger(client, settings)
    bad = [crafted(template, headers={"timelimit": 5}), crafted(template, headers={"timelimit": 5}),
           crafted(template, body={"a": 1}), crafted(template, drop=("id",))]
    # (An empty delivery_info made kombu's ack emulation fail on it here; with emulation off
    # Celery takes it as a trigger. The check before delivery still refuses it: kombu's
    # restore at a warm shutdown reads it.)
    worker = WorkerProcess(env, tmp_path / "worker.log", pool=pool, name=f"unchecked-{pool}",
                           app="tests.worker_unchecked").start()
    try:
        assert "delivery checks: off" in worker.log_text()
        push_then_deliver(client, settings, dsp, bad, f"unchecked-{pool}", worker)
    finally:
        worker.stop()
    reasons = poison_reasons(client)
    assert all(r.startswith("celery could not take the message") for r in reasons), reasons
