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
from worker.screening import message_problem, message_sample


class _HardenedChannel:
    """What both channels (one Redis, or Redis behind Sentinel) add to kombu's."""

    connection: Any
    qos: Any
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

    def basic_consume(self, queue: str, no_ack: bool, callback: Any, consumer_tag: str, **kwargs: Any) -> Any:
        result = super().basic_consume(queue, no_ack, callback, consumer_tag, **kwargs)  # type: ignore[misc]
        callbacks = self.connection._callbacks
        callbacks[queue] = self._guard(callbacks[queue])
        return result

    def _guard(self, deliver: Any) -> Any:
        """kombu's per-queue callback (make the Message, register it as unacked, hand it to
        Celery), made safe: what fails there and is not a real connection error — a message
        worker/screening.py did not foresee — rejects the message without requeue and records
        it. A ``KeyError`` counts as the message's here, not as the lost connection kombu's
        Redis transport takes every ``KeyError`` for (it would take the message again, first
        in line, for good)."""

        def guarded(raw_message: Any) -> Any:
            try:
                return deliver(raw_message)
            except Exception as e:
                if isinstance(e, self.connection_errors) and not isinstance(e, KeyError):
                    raise  # Redis is gone: the message stays unacked and is restored
                self._reject_poison(raw_message, e)
                return None

        return guarded

    def _reject_poison(self, raw_message: Any, error: Exception) -> None:
        properties = raw_message.get("properties") if isinstance(raw_message, dict) else None
        tag = properties.get("delivery_tag") if isinstance(properties, dict) else None
        qos = self.qos
        # Registered as unacked and not yet acked or rejected by Celery: reject it (off the
        # unacked hash, so never restored; its prefetch slot given back). Not registered: BRPOP
        # has taken it off its list already.
        if tag is not None and tag in qos._delivered and tag not in qos._dirty:
            qos.reject(tag, requeue=False)
        record_poison(f"celery could not take the message: {error!r}"[:200], message_sample(raw_message))


class Channel(_HardenedChannel, kombu_redis.Channel):  # type: ignore[misc]
    pass


class SentinelChannel(_HardenedChannel, kombu_redis.SentinelChannel):  # type: ignore[misc]
    pass


class _HardenedTransport:
    def _deliver(self, message: Any, queue: Any) -> Any:
        """Every message is checked first (worker/screening.py): one kombu or Celery would
        fail on is dropped and recorded, like one that is not JSON."""
        problem = message_problem(message, queue if isinstance(queue, str) else "")
        if problem is not None:  # popped, never registered as unacked: dropping it rejects it
            record_poison(problem, message_sample(message))
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
