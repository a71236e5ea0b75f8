"""worker/screening.py: every trigger the fleet sends passes the check before delivery, and
each field Celery or kombu would fail on is refused with a reason naming it."""

from __future__ import annotations

import base64
import copy
import json
from collections.abc import Callable
from typing import Any

import pytest
import redis

from cgrid.broker import DELIVER_TASK, make_celery, send_deliver
from cgrid.routing import DELIVER_QUEUE, RETRY_QUEUE
from cgrid.settings import Settings
from tests.helpers import fleet_env
from worker.screening import message_problem, message_sample

pytestmark = pytest.mark.integration


def sent(redis_url: str, send: Callable[[Any], None], queue: str = DELIVER_QUEUE) -> dict[str, Any]:
    """What a real Celery sender puts on the queue, as the worker's BRPOP gets it."""
    client = redis.Redis.from_url(redis_url)
    send(make_celery(Settings.from_env(fleet_env(redis_url)), name="test-envelope"))
    raw = client.rpop(queue)
    assert isinstance(raw, bytes)
    message: dict[str, Any] = json.loads(raw)
    return message


def with_body(message: dict[str, Any], body: Any) -> dict[str, Any]:
    changed = copy.deepcopy(message)
    changed["body"] = base64.b64encode(json.dumps(body).encode()).decode()
    return changed


def changed(message: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """``message`` with the field at ``path`` (dots) set to ``value``, or removed (``...``)."""
    result = copy.deepcopy(message)
    *parents, last = path.split(".")
    target = result
    for name in parents:
        target = target[name]
    if value is ...:
        del target[last]
    else:
        target[last] = value
    return result


def test_every_trigger_the_fleet_sends_passes(redis_url: str) -> None:
    triggers = [
        sent(redis_url, lambda app: send_deliver(app, ["e1", "e2"], 1, 1700000000.5, DELIVER_QUEUE)),
        sent(redis_url, lambda app: send_deliver(app, ["r1"], 2, 0.0, RETRY_QUEUE), RETRY_QUEUE),
        sent(redis_url, lambda app: send_deliver(app, [f"id-{i:06d}" for i in range(10_000)], 1, 0.0,
                                                 DELIVER_QUEUE)),
        sent(redis_url, lambda app: app.send_task(DELIVER_TASK, args=[["x" * 128]], kwargs={"attempt": 2},
                                                  queue=DELIVER_QUEUE, task_id="a-custom-task-id")),
        sent(redis_url, lambda app: app.send_task(DELIVER_TASK, kwargs={"ids": ["k"], "sent_at": 3.0},
                                                  queue=DELIVER_QUEUE)),
    ]
    for message in triggers:
        assert message_problem(message, DELIVER_QUEUE) is None, message_sample(message)
    # kombu marks a message restored from unacked as redelivered: still a trigger.
    restored = changed(triggers[0], "properties.delivery_info.redelivered", True)
    assert message_problem(restored, DELIVER_QUEUE) is None


@pytest.mark.parametrize(("path", "value", "named"), [
    ("headers.timelimit", 5, "headers.timelimit"),
    ("headers.timelimit", [1, 2, 3], "headers.timelimit"),
    ("headers.timelimit", ["a", None], "headers.timelimit"),
    ("headers.timelimit", [-1, None], "headers.timelimit"),
    ("headers.id", ..., "headers.id"),
    ("headers.id", 5, "headers.id"),
    ("headers.id", "", "headers.id"),
    ("headers.id", "x" * 256, "headers.id"),
    ("headers.task", ..., "headers.task"),
    ("headers.task", "cgrid.other", "headers.task"),
    ("headers.shadow", 7, "headers.shadow"),
    ("headers.eta", "2030-01-01T00:00:00", "headers.eta"),
    ("headers.expires", 5, "headers.expires"),
    ("headers.compression", "application/x-gzip", "headers.compression"),
    ("headers", [], "headers"),
    ("content-type", "application/x-python-serialize", "content-type"),
    ("content-encoding", "binary", "content-encoding"),
    ("body", "!!!not base64", "body"),
    ("body", 5, "body"),
    ("properties.delivery_info", {}, "delivery_info"),
    ("properties.delivery_info", {"exchange": ""}, "delivery_info"),
    ("properties.delivery_info", "x", "delivery_info"),
    ("properties.delivery_tag", ..., "delivery_tag"),
    ("properties.delivery_tag", 5, "delivery_tag"),
    ("properties.body_encoding", "rot13", "body_encoding"),
    ("properties", ..., "properties"),
])
def test_a_field_celery_or_kombu_would_fail_on_is_named(redis_url: str, path: str, value: Any, named: str) -> None:
    trigger = sent(redis_url, lambda app: send_deliver(app, ["e1"], 1, 0.0, DELIVER_QUEUE))
    problem = message_problem(changed(trigger, path, value), DELIVER_QUEUE)
    assert problem is not None and named in problem, problem


@pytest.mark.parametrize("body", [
    {"a": 1}, [1, 2], [1, 2, 3], [[["e"], 1, 0.0], [], {}], [[["e"]], {}, []],
    [[["e"], 1, 0.0, 0, "extra"], {}, None], [[["e"]], {"ids": ["f"]}, None], [[], {"attempt": 1}, None],
    [[["e"]], {"priority": 1}, None], [[["e"]], {}, {"callbacks": [{"task": "x"}]}],
    [[["e"]], {}, {"chain": [{"task": "x"}]}],
])
def test_a_body_that_is_not_a_trigger_is_refused(redis_url: str, body: Any) -> None:
    trigger = sent(redis_url, lambda app: send_deliver(app, ["e1"], 1, 0.0, DELIVER_QUEUE))
    problem = message_problem(with_body(trigger, body), DELIVER_QUEUE)
    assert problem is not None and problem.startswith("body"), problem


def test_not_an_envelope_at_all(redis_url: str) -> None:
    for message in (None, 5, "poke", [1, 2], {"a": 1}):
        problem = message_problem(message, DELIVER_QUEUE)
        assert problem is not None and problem.startswith("envelope"), problem


def test_celerys_own_queues_carry_other_messages(redis_url: str) -> None:
    """Remote control (Flower, ``celery inspect``) and event receivers: their messages are no
    triggers, so only the envelope kombu needs is checked."""
    trigger = sent(redis_url, lambda app: send_deliver(app, ["e1"], 1, 0.0, DELIVER_QUEUE))
    control = with_body(changed(trigger, "headers", {"clock": 1, "expires": 1700000000.0}), {"method": "stats"})
    for queue in ("worker1@host.celery.pidbox", "0b2e.reply.celery.pidbox", "celeryev.5f1c"):
        assert message_problem(control, queue) is None
        assert message_problem(changed(control, "properties.delivery_info", {}), queue) is not None
    assert message_problem(control, DELIVER_QUEUE) is not None
