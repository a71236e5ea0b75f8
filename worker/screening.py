"""Screening broker messages: what one must be before kombu and Celery are handed it.

kombu's Redis transport pops a message with BRPOP, registers it as unacked (in the
worker's memory: its ack emulation is off) and hands it to Celery; both read its fields
without checks. A field of the wrong shape then fails in the worker's consumer, at the
worst moment:

- when kombu gives it back at a warm shutdown (``delivery_info`` without ``exchange``) or while
  Celery builds its request (a header without ``id``) as a ``KeyError``, which kombu's Redis
  transport counts as a *connection* error: the worker reconnects and takes the same message
  again, first in line, for good;
- after kombu registered it (``timelimit: 5``, a body that is not ``[args, kwargs, embed]``):
  the message is neither acked nor rejected and holds a prefetch slot (under prefork, a pool
  slot too) for good; a warm shutdown puts it back first in line.

So every message is checked here first (:func:`message_problem`); worker/transport.py drops
and records the ones refused. Plain functions, no I/O.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from typing import Any

from cgrid.broker import DELIVER_TASK

# What one trigger carries: cgrid.deliver(ids, attempt=1, sent_at=0.0, shared=None) (worker/celery_app.py).
TASK_PARAMS = ("ids", "attempt", "sent_at", "shared")
# Celery links a task to others through these; our senders never do, and a message that did
# would make the worker send tasks of its own.
EMBED_LINKS = ("callbacks", "errbacks", "chain", "chord")
BODY_ENCODINGS = (None, "base64")  # kombu's Redis channel writes base64
TASK_ID_MAX = 255


def is_internal_queue(queue: str) -> bool:
    """Celery's own queues, which carry no task messages: remote control (``<node>.celery.pidbox``,
    ``<id>.reply.celery.pidbox``) and event receivers (``celeryev.<id>``: Flower's)."""
    return queue.endswith(".pidbox") or queue.startswith("celeryev.")


def envelope_problem(message: Any) -> str | None:
    """What makes a decoded broker message unusable to kombu, or None."""
    if not isinstance(message, dict):
        return f"envelope is a {type(message).__name__}, not an object"
    properties = message.get("properties")
    if not isinstance(properties, dict):
        return "envelope has no properties object"
    tag = properties.get("delivery_tag")
    if not isinstance(tag, str) or not tag:
        return "envelope properties.delivery_tag is not a non-empty string"
    info = properties.get("delivery_info")
    if not isinstance(info, dict):
        return "envelope properties.delivery_info is not an object"
    # kombu's restore of a message a worker held (at a warm shutdown) reads both.
    if not isinstance(info.get("exchange"), str) or not isinstance(info.get("routing_key"), str):
        return "envelope properties.delivery_info lacks the exchange and routing_key strings"
    if properties.get("body_encoding") not in BODY_ENCODINGS:
        return "envelope properties.body_encoding is not base64"
    if not isinstance(message.get("headers") or {}, dict):
        return "envelope headers is not an object"
    if not isinstance(message.get("body", ""), str):
        return "envelope body is not a string"
    return None


def _time_limit_problem(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != 2:
        return "headers.timelimit is not [hard, soft]"
    for limit in value:
        if limit is None:
            continue
        if isinstance(limit, bool) or not isinstance(limit, int | float) or not math.isfinite(limit) or limit < 0:
            return "headers.timelimit holds something other than null or a number >= 0"
    return None


def _headers_problem(headers: dict[str, Any]) -> str | None:
    if headers.get("task") != DELIVER_TASK:
        return f"headers.task is not {DELIVER_TASK!r}"
    task_id = headers.get("id")
    if not isinstance(task_id, str) or not 0 < len(task_id) <= TASK_ID_MAX:
        return f"headers.id is not a task id (a string of 1 to {TASK_ID_MAX} characters)"
    if headers.get("shadow") is not None and not isinstance(headers["shadow"], str):
        return "headers.shadow is not a string"
    problem = _time_limit_problem(headers.get("timelimit"))
    if problem is not None:
        return problem
    # Our senders never set these: Celery would hold such a message in the worker's memory.
    if headers.get("eta") is not None:
        return "headers.eta is set (triggers are never delayed messages)"
    if headers.get("expires") is not None and not isinstance(headers["expires"], str):
        return "headers.expires is not an ISO 8601 string"
    if headers.get("compression") is not None:
        return "headers.compression is set (triggers are never compressed)"
    return None


def _body_problem(message: dict[str, Any]) -> str | None:
    if message.get("content-type") != "application/json":
        return "content-type is not application/json"
    if message.get("content-encoding") not in (None, "utf-8"):
        return "content-encoding is not utf-8"
    raw: str | bytes = message.get("body", "")
    try:
        if message["properties"].get("body_encoding") == "base64":
            raw = base64.b64decode(raw, validate=True)
        body = json.loads(raw)
    except (binascii.Error, ValueError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return "body is not base64-encoded JSON"
    if not isinstance(body, list) or len(body) != 3:
        return "body is not [args, kwargs, embed]"
    args, kwargs, embed = body
    if not isinstance(args, list) or not isinstance(kwargs, dict) or not (embed is None or isinstance(embed, dict)):
        return "body is not [list, object, object]"
    positional = set(TASK_PARAMS[:len(args)])
    if len(args) > len(TASK_PARAMS) or not set(kwargs) <= set(TASK_PARAMS) or positional & set(kwargs) \
            or "ids" not in positional | set(kwargs):
        return f"body does not fit {DELIVER_TASK}({', '.join(TASK_PARAMS)})"
    if embed and any(embed.get(link) for link in EMBED_LINKS):
        return "body links other tasks (callbacks, errbacks, chain or chord)"
    return None


def task_problem(message: dict[str, Any]) -> str | None:
    """What makes an envelope kombu can read unusable to Celery as a protocol-2
    ``cgrid.deliver`` message, or None. (The arguments' values are checked when the task
    runs: worker/batch.py.)"""
    return _headers_problem(message.get("headers") or {}) or _body_problem(message)


def message_problem(message: Any, queue: str) -> str | None:
    """Why a message popped from ``queue`` must not be delivered, or None."""
    problem = envelope_problem(message)
    if problem is None and not is_internal_queue(queue):
        problem = task_problem(message)
    return problem


def message_sample(message: Any) -> str:
    """What the poison record keeps of a message: its headers first, the body (long) last."""
    if isinstance(message, dict):
        return repr({k: message[k] for k in ("headers", "properties", "content-type", "body") if k in message})
    return repr(message)
