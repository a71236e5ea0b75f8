"""A Redis broker transport that survives poisoned messages and Redis's "not now" replies.

kombu's Redis transport pops a message with BRPOP and then decodes it; a message that is
not JSON, or JSON of the wrong shape, raises inside the worker's event loop and takes the
whole worker down ("Unrecoverable error"). Here such a message — already popped, so it is
never seen again — is logged, counted in the ledger's poison record, and dropped, and the
worker goes on with the messages behind it.

An error *reply* from Redis is never the message's fault: a full Redis (OOM), a replica
(READONLY, or UNBLOCKED for a BRPOP that was waiting when the server became one),
MASTERDOWN, LOADING, BUSY, MISCONF. Stock kombu lets most of them out of the event loop,
and Celery stops the worker. Here every error reply counts as a *connection* error: the
consumer reconnects with kombu's backoff (2 s, 4 s ... 30 s, for ever) and the worker stays
up. A channel checks that its Redis is a primary before it is used, so a worker started
against a replica, or one that was demoted, waits (with that backoff) instead of
restarting in a tight loop. And a full Redis (``maxmemory``, ``noeviction``) refuses none of
the broker's work on triggers already sent (issue 15): the triggers a worker sends (the
sweeper's retries and resends) are written by a ``#!lua flags=allow-oom`` script, so that the
accepted events' retries go on (Redis 7; on 6.2, which reads no script flags, kombu's own
LPUSH is used), and binding queues (housekeeping) logs and skips instead.

kombu's ack emulation is off (cgrid/broker.py): a message BRPOP took is held in the worker's
memory only, not also in Redis's ``unacked`` hash, so taking and acking a trigger costs no
Redis writes. What a worker holds and has not started goes back to its queue at a warm
shutdown (kombu restores it from memory); what a killed worker held is resent by the
sweeper (``CGRID_REDELIVER_AFTER_S``), as the ledger sees its events never claimed.
"""

from __future__ import annotations

from queue import Empty
from typing import Any

import redis
from kombu.transport import redis as kombu_redis
from kombu.utils.json import dumps

from cgrid.redis_conn import script_flags_supported
from cgrid.redis_replies import log_redis_error
from worker.poison import record_poison
from worker.screening import message_problem, message_sample

PUSH_MESSAGE = """#!lua flags=allow-oom
return redis.call('LPUSH', KEYS[1], ARGV[1])
"""
# Every error reply is Redis's state, not the message's, and so is a reply that cannot be
# parsed: the consumer reconnects.
REPLY_ERRORS: tuple[type[Exception], ...] = (redis.ResponseError, redis.exceptions.InvalidResponse)


class _HardenedChannel:
    """What both channels (one Redis, or Redis behind Sentinel) add to kombu's."""

    connection: Any
    qos: Any
    _sync_client: Any = None
    _script_flags: bool | None = None
    connection_errors: Any
    client: Any

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # connects and PINGs
        try:
            self._require_primary()
        except BaseException:
            self.close()  # type: ignore[attr-defined]
            raise

    def _require_primary(self) -> None:
        """A replica answers PING but refuses BRPOP, acks and bindings (READONLY): raise a
        connection error now, so that kombu backs off and tries again until it is a primary
        (a worker started against a replica would otherwise fail at every step at once)."""
        try:
            role = self.client.execute_command("ROLE")
        except redis.exceptions.NoPermissionError:
            return  # an ACL without ROLE: a replica then shows itself at the first write
        name = role[0].decode() if isinstance(role[0], bytes) else str(role[0])
        if name != "master":
            error = redis.exceptions.ReadOnlyError(f"the broker Redis is not a primary (ROLE: {name})")
            log_redis_error("broker_redis_error", error, where="connect", action="waiting for a primary")
            raise error

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

    @property
    def script_flags(self) -> bool:
        """Whether this Redis runs ``#!lua flags=allow-oom`` scripts (asked once)."""
        if self._script_flags is None:
            self._script_flags = script_flags_supported(self._create_client())
        return self._script_flags

    def allow_oom_script(self, name: str, source: str) -> Any:
        """One of this module's scripts, registered once per channel."""
        scripts: dict[str, Any] = self.__dict__.setdefault("_allow_oom_scripts", {})
        if name not in scripts:
            scripts[name] = self._create_client().register_script(source)
        return scripts[name]

    def _put(self, queue: Any, message: Any, **kwargs: Any) -> Any:
        """A message to a queue (our triggers): LPUSH, allowed past maxmemory."""
        expires: dict[str, Any] = self._expires  # type: ignore[attr-defined]
        if kwargs.get("_publish_batch") is not None or queue in expires or not self.script_flags:
            return super()._put(queue, message, **kwargs)  # type: ignore[misc]
        key = self._q_for_pri(queue, self._get_message_priority(message, reverse=False))  # type: ignore[attr-defined]
        return self.allow_oom_script("put", PUSH_MESSAGE)(keys=[key], args=[dumps(message)])  # type: ignore[no-untyped-call]

    def _queue_bind(self, *args: Any, **kwargs: Any) -> Any:
        # SADD at consumer start: a full Redis refuses it. The binding is there from earlier
        # starts, and our triggers go to their list by name anyway.
        try:
            return super()._queue_bind(*args, **kwargs)  # type: ignore[misc]
        except redis.exceptions.OutOfMemoryError as e:
            log_redis_error("broker_redis_error", e, where="bind_queue", action="skipped")
            return None

    def _brpop_read(self, **options: Any) -> Any:
        try:
            return super()._brpop_read(**options)  # type: ignore[misc]
        except self.connection_errors as e:
            if isinstance(e, REPLY_ERRORS):
                log_redis_error("broker_redis_error", e, where="consume", action="reconnecting")
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
    connection_errors = kombu_redis.Transport.connection_errors + REPLY_ERRORS


class SentinelTransport(_HardenedTransport, kombu_redis.SentinelTransport):  # type: ignore[misc]
    Channel = SentinelChannel
    connection_errors = kombu_redis.SentinelTransport.connection_errors + REPLY_ERRORS


def use_hardened_transports() -> None:
    """Make the broker URL's own schemes (redis, rediss, sentinel) pick these transports, so
    the URL keeps saying what it is to everything that reads it (Flower's broker view)."""
    from kombu.transport import TRANSPORT_ALIASES

    TRANSPORT_ALIASES["redis"] = TRANSPORT_ALIASES["rediss"] = f"{__name__}:Transport"
    TRANSPORT_ALIASES["sentinel"] = f"{__name__}:SentinelTransport"
