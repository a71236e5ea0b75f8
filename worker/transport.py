"""A Redis broker transport that survives poisoned messages and keeps task slots fed.

kombu's Redis transport pops a message with BRPOP and then decodes it; a message that is
not JSON, or JSON of the wrong shape, raises inside the worker's event loop and takes the
whole worker down ("Unrecoverable error"). Here such a message — already popped, so it is
never seen again — is logged, counted in the ledger's poison record, and dropped, and the
worker goes on with the messages behind it. Connection errors still propagate, so the
normal reconnect logic is untouched.

Task slots: without an event loop (``-P gevent``), Celery's consumer waits in a 2-second
poll and only asks Redis for the next message when that poll ends. When every slot was
busy as the poll began (prefetch full), a slot that frees up stays empty for up to two
seconds: a worker with few slots then fetched about one message a second (measured: 277
deliveries/s instead of 4,000+). While prefetch is full, this transport polls in short
steps instead, so a free slot is refilled within ``QOS_FULL_POLL_S``.
"""

from __future__ import annotations

from queue import Empty
from typing import Any

from kombu.transport import redis as kombu_redis

from worker.poison import record_poison

QOS_FULL_POLL_S = 0.002


class Channel(kombu_redis.Channel):  # type: ignore[misc]
    def _brpop_read(self, **options: Any) -> Any:
        try:
            return super()._brpop_read(**options)  # type: ignore[no-untyped-call]
        except self.connection_errors:
            raise
        except Empty:
            raise
        except Exception as e:
            record_poison("broker message is not a valid kombu/Celery envelope", repr(e))
            return True


def envelope_problem(message: Any) -> str | None:
    """What makes a decoded broker message unusable, or None. kombu raises KeyError for a
    missing field, and its Redis transport counts KeyError as a *connection* error, so a
    bad shape must be caught here, before it reaches kombu."""
    if not isinstance(message, dict):
        return f"envelope is a {type(message).__name__}, not an object"
    properties = message.get("properties")
    if not isinstance(properties, dict) or "delivery_tag" not in properties:
        return "envelope has no properties.delivery_tag"
    if not isinstance(properties.get("delivery_info", {}), dict):
        return "envelope properties.delivery_info is not an object"
    if not isinstance(message.get("headers") or {}, dict):
        return "envelope headers is not an object"
    if not isinstance(message.get("body", ""), str):
        return "envelope body is not a string"
    return None


class Transport(kombu_redis.Transport):  # type: ignore[misc]
    Channel = Channel

    def drain_events(self, connection: Any, timeout: float | None = None) -> Any:  # type: ignore[override]
        if (timeout is None or timeout > QOS_FULL_POLL_S) and any(
            not channel.qos.can_consume() for channel in self.channels
        ):
            timeout = QOS_FULL_POLL_S
        return super().drain_events(connection, timeout=timeout)  # type: ignore[no-untyped-call]

    def _deliver(self, message: Any, queue: Any) -> Any:
        problem = envelope_problem(message)
        if problem is not None:
            record_poison(problem, repr(message))
            return None
        return super()._deliver(message, queue)  # type: ignore[no-untyped-call]
