"""A Redis broker transport that survives poisoned messages.

kombu's Redis transport pops a message with BRPOP and then decodes it; a message that is
not JSON, or JSON of the wrong shape, raises inside the worker's event loop and takes the
whole worker down ("Unrecoverable error"). Here such a message — already popped, so it is
never seen again — is logged, counted in the ledger's poison record, and dropped, and the
worker goes on with the messages behind it. Connection errors still propagate, so the
normal reconnect logic is untouched.
"""

from __future__ import annotations

from queue import Empty
from typing import Any

from kombu.transport import redis as kombu_redis

from worker.poison import record_poison


class _HardenedChannel:
    """What both channels (one Redis, or Redis behind Sentinel) add to kombu's."""

    _sync_client: Any = None
    connection_errors: Any

    def _create_client(self, asynchronous: bool = False) -> Any:
        """kombu builds a new redis-py client object for every command it sends (acks,
        unacked bookkeeping, task events): a sixth of a solo worker's consumer time went
        to building them. A client is only a handle on the channel's connection pool and is
        thread-safe, so the synchronous one is built once per channel."""
        if asynchronous:
            return super()._create_client(asynchronous=True)  # type: ignore[misc]
        if self._sync_client is None:
            self._sync_client = super()._create_client()  # type: ignore[misc]
        return self._sync_client

    def _brpop_read(self, **options: Any) -> Any:
        try:
            return super()._brpop_read(**options)  # type: ignore[misc]
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


class Channel(_HardenedChannel, kombu_redis.Channel):  # type: ignore[misc]
    pass


class SentinelChannel(_HardenedChannel, kombu_redis.SentinelChannel):  # type: ignore[misc]
    pass


class _HardenedTransport:
    def _deliver(self, message: Any, queue: Any) -> Any:
        problem = envelope_problem(message)
        if problem is not None:
            record_poison(problem, repr(message))
            return None
        return super()._deliver(message, queue)  # type: ignore[misc]


class Transport(_HardenedTransport, kombu_redis.Transport):  # type: ignore[misc]
    Channel = Channel


class SentinelTransport(_HardenedTransport, kombu_redis.SentinelTransport):  # type: ignore[misc]
    Channel = SentinelChannel


def use_hardened_transports() -> None:
    """Make the broker URL's own schemes (redis, rediss, sentinel) pick these transports, so
    the URL keeps saying what it is to everything that reads it (Flower's broker view)."""
    from kombu.transport import TRANSPORT_ALIASES

    TRANSPORT_ALIASES["redis"] = TRANSPORT_ALIASES["rediss"] = f"{__name__}:Transport"
    TRANSPORT_ALIASES["sentinel"] = f"{__name__}:SentinelTransport"
