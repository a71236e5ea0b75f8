"""``Publisher``: how upstream auction code hands events to the fleet (SPEC §10).

``publish()`` validates the event and buffers it; a background thread sends the buffer
``linger_ms`` after the first event into it (or as soon as ``batch_size`` events wait),
like a Kafka producer.
Sending = one Lua script that records the new events in the ledger (idempotently, by id)
and adds them to their queue's pending list (a batch's events share a queue:
cgrid/routing.py), plus a Celery message, the shared trigger, when none of that queue is on
its way (docs/design.md, shared triggers; ``CGRID_SHARED_TRIGGERS=0``: a message per batch,
carrying its ids). An event is *accepted* once that script ran: ``flush()`` returns only when every event
published before it is accepted, and raises :class:`RedisUnavailable` if Redis cannot be
reached within ``CGRID_PUBLISH_TIMEOUT_S``.

Nothing is dropped silently: events that could not be sent stay buffered and are sent
when Redis answers again; while the buffer is full and Redis is down, ``publish()``
raises instead of accepting more. ``Publisher(linger_ms=0)`` sends on every call.

A full Redis refuses new events (at ``CGRID_PUBLISH_MAX_MEMORY_SHARE`` of its
``maxmemory``, before Redis itself would) while the workers go on with the accepted ones.
Every send that Redis refuses or cannot take is counted, by reason (:data:`REFUSED_REASONS`),
in ``Publisher.refused`` and in the Prometheus counter ``cgrid_publish_refused_total`` of
prometheus_client's default registry (an auction process that serves its metrics shows it).
The sender never dies: an error other than Redis being away (an event Redis cannot be
given, a bug) fails only the events that meet it — the batch is sent again one event at a
time — and those are reported to the caller, once, by the next ``publish()`` (which then
takes nothing) or ``flush()``, as :class:`PublishFailed`.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

import redis
from celery import Celery

from cgrid.broker import make_celery, send_deliver, send_shared
from cgrid.errors import CgridError, PublishFailed, RedisUnavailable
from cgrid.event import Event, parse_event
from cgrid.ledger import Ledger, NotReplicated
from cgrid.ledger.partitions import ledger_for
from cgrid.redis_conn import mask_url, redis_client
from cgrid.redis_replies import is_full
from cgrid.settings import Settings
from cgrid.threads import daemon_thread

MAX_BUFFERED_EVENTS = 100_000
# Why a send (one batch, one ledger script) was not accepted: Redis is full (its maxmemory,
# or past CGRID_PUBLISH_MAX_MEMORY_SHARE of it), refused it otherwise (an error reply such as
# READONLY), could not be reached, or did not replicate it in time.
REFUSED_REASONS = ("full", "error_reply", "unreachable", "not_replicated")


_log = logging.getLogger("cgrid.publisher")
_refused_metric: Any = None
_refused_metric_lock = threading.Lock()


def refused_metric() -> Any:
    """``cgrid_publish_refused_total{reason}`` in prometheus_client's default registry, made
    once per process; None when prometheus_client cannot be imported."""
    global _refused_metric
    with _refused_metric_lock:
        if _refused_metric is None:
            try:
                from prometheus_client import Counter as PromCounter
            except ImportError:
                return None
            _refused_metric = PromCounter(
                "cgrid_publish_refused", "Sends of new events (a batch each) that Redis refused or could not "
                "take, by reason: full, error_reply, unreachable, not_replicated. The events stay buffered and "
                "are tried again, so each try counts", ["reason"])
        return _refused_metric


class Publisher:
    def __init__(
        self,
        settings: Settings | None = None,
        *,
        redis_url: str | None = None,
        linger_ms: float | None = None,
        batch_size: int | None = None,
        max_buffered: int = MAX_BUFFERED_EVENTS,
    ) -> None:
        settings = settings or Settings.from_env()
        if redis_url:
            settings = dataclasses.replace(settings, redis_url=redis_url)
            settings.validate()
        self.settings = settings
        self.redis_url = settings.redis_url
        self.linger_s = (settings.linger_ms if linger_ms is None else linger_ms) / 1000
        self.batch_size = batch_size or settings.batch_size
        self.max_buffered = max_buffered
        self._routing = settings.routing
        self._client = redis_client(settings, socket_timeout_s=settings.publish_timeout_s,
                                    socket_connect_timeout_s=settings.publish_timeout_s)
        self._ledger = ledger_for(settings, self._client)
        self._celery: Celery = make_celery(settings, name="cgrid-producer")
        self._buffer: list[Event] = []
        self._cond = threading.Condition()
        self._send_lock = threading.Lock()
        self._last_error: RedisUnavailable | None = None
        # Sends Redis refused or could not take, by reason (REFUSED_REASONS); each try counts.
        self.refused: Counter[str] = Counter()
        self._refused_metric = refused_metric()
        self._failures: list[tuple[str, BaseException]] = []  # dropped events, not yet reported
        self._sender_error: Exception | None = None  # the sender thread's last unexpected error
        self._oldest_at = 0.0
        self._closed = False
        self._thread: threading.Thread | None = None
        if self.linger_s > 0:
            self._thread = daemon_thread(self._linger_loop, "cgrid-publisher")
            self._thread.start()
        atexit.register(self._close_at_exit)

    # -- public API --------------------------------------------------------------------

    def publish(self, event: Mapping[str, Any] | Event) -> str:
        """Validate and buffer one event; returns its id. Raises InvalidEvent naming the
        field, RedisUnavailable when Redis is down and the buffer is full, or PublishFailed
        reporting earlier events that could not be sent (this event is then not taken)."""
        parsed = event if isinstance(event, Event) else parse_event(event)
        self._enqueue([parsed])
        return parsed.id

    def publish_many(self, events: Iterable[Mapping[str, Any] | Event]) -> list[str]:
        """Validate all first (one bad event refuses the whole call), then buffer them."""
        parsed = [e if isinstance(e, Event) else parse_event(e) for e in events]
        self._enqueue(parsed)
        return [e.id for e in parsed]

    def flush(self, timeout_s: float | None = None) -> None:
        """Send everything buffered; returns once it is accepted in Redis. Raises
        PublishFailed for events that could not be sent (the others are accepted)."""
        budget_s = self.settings.publish_timeout_s if timeout_s is None else timeout_s
        give_up_at = time.monotonic() + budget_s
        while True:
            try:
                self._send_buffered()
                self._report_failures()
                return
            except RedisUnavailable:
                if time.monotonic() >= give_up_at:
                    raise
                time.sleep(0.05)

    def close(self) -> None:
        """Flush and stop. Raises RedisUnavailable if buffered events could not be sent;
        they stay buffered, and calling ``close()`` again tries again (PublishFailed, as
        for ``flush()``)."""
        if not self._closed:
            self._closed = True
            with self._cond:
                self._cond.notify_all()
            if self._thread is not None:
                self._thread.join(timeout=1)
        self.flush()
        atexit.unregister(self._close_at_exit)
        self._client.close()

    @property
    def ledger(self) -> Ledger:
        """The ledger this publisher writes to (for tools such as replay)."""
        return self._ledger

    def discard(self) -> int:
        """Drop the events buffered and not yet accepted (they will never be sent); returns
        how many. For a caller that has told its own caller they were not accepted."""
        with self._send_lock:
            return len(self._take())

    def _close_at_exit(self) -> None:
        try:
            self.close()
        except PublishFailed as e:
            print(f"cgrid-s2s: at exit: {e}", file=sys.stderr)
        except CgridError as e:
            print(f"cgrid-s2s: {len(self._buffer)} published events were NOT accepted at exit: {e}",
                  file=sys.stderr)

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------------

    def _enqueue(self, events: list[Event]) -> None:
        if self._closed:
            raise RedisUnavailable("publisher is closed")
        if not events:
            return
        self._report_failures()
        if self._sender_error is not None:
            raise CgridError(f"not accepted: the publisher's sender fails ({type(self._sender_error).__name__}: "
                             f"{self._sender_error}); {len(self._buffer)} events wait in its buffer")
        with self._cond:
            if len(self._buffer) + len(events) > self.max_buffered:
                error = self._last_error or RedisUnavailable("publish buffer is full")
                raise RedisUnavailable(
                    f"not accepted: {len(self._buffer)} events already wait to be sent ({error})"
                )
            first = not self._buffer
            if first:
                self._oldest_at = time.monotonic()
            self._buffer.extend(events)
            # Wake the sender for the first event (it starts the linger clock) and when a
            # batch is full.
            if self._thread is not None and (first or len(self._buffer) >= self.batch_size):
                self._cond.notify()
        if self._thread is None:
            self._send_buffered()
            self._report_failures()

    def _report_failures(self) -> None:
        """Raise PublishFailed for the events dropped since the last report, once."""
        with self._cond:
            failures, self._failures = self._failures, []
        if failures:
            raise PublishFailed(failures)

    def _take(self) -> list[Event]:
        with self._cond:
            taken, self._buffer = self._buffer, []
            return taken

    def _put_back(self, events: list[Event]) -> None:
        with self._cond:
            self._buffer[:0] = events

    def _batches(self, events: list[Event]) -> list[tuple[str, list[Event]]]:
        """The events in batches of at most ``batch_size``, each for one queue (the first
        attempts of a group of buyers have a queue of their own: cgrid/routing.py) and, on a
        Redis Cluster, one partition of the ledger (one accept script, one claim per trigger)."""
        size = self.batch_size
        partitioned = len(self._ledger.keyspaces) > 1
        if not self._routing.grouped and not partitioned:
            queue = self._routing.deliver_queue
            return [(queue, events[start:start + size]) for start in range(0, len(events), size)]
        groups: dict[tuple[str, int], list[Event]] = {}
        queue_for = self._routing.queue_for
        partition_of = self._ledger.partition_of
        for event in events:
            key = (queue_for(event.buyer, 1), partition_of(event.id) if partitioned else 0)
            group = groups.get(key)
            if group is None:
                groups[key] = [event]
            else:
                group.append(event)
        return [(queue, group[start:start + size])
                for (queue, _), group in groups.items() for start in range(0, len(group), size)]

    def _send_buffered(self) -> None:
        """Send the buffer. Whatever is raised, every event taken is sent, put back in
        the buffer, or recorded in ``_failures`` for the caller."""
        with self._send_lock:
            events = self._take()
            done: set[int] = set()  # id() of the events sent or recorded as failed
            try:
                for queue, batch in self._batches(events):
                    try:
                        self._send(batch, queue)
                    except RedisUnavailable:
                        raise
                    except Exception:
                        # Not Redis being away: something in these events (or a bug). One
                        # at a time, so that an event that cannot be sent holds back no other.
                        self._send_one_by_one(batch, queue, done)
                    done.update(map(id, batch))
            except BaseException as e:
                self._put_back([event for event in events if id(event) not in done])
                if isinstance(e, RedisUnavailable):
                    self._last_error = e
                raise
            self._last_error = None

    def _send_one_by_one(self, batch: list[Event], queue: str, done: set[int]) -> None:
        for event in batch:
            try:
                self._send([event], queue)
            except RedisUnavailable:
                raise
            except Exception as e:
                _log.error("cgrid-s2s: published event %s was NOT accepted and is dropped (%s: %s)",
                           event.id, type(e).__name__, e)
                with self._cond:
                    self._failures.append((event.id, e))
            done.add(id(event))

    def _send(self, batch: list[Event], queue: str) -> None:
        settings = self.settings
        trigger: list[bool] = []
        try:
            sent_at_s, accepted = self._ledger.accept(
                batch, ledger_ttl_s=settings.ledger_ttl_s, report_ttl_s=settings.report_ttl_s,
                redeliver_after_s=settings.redeliver_after_s, max_memory_share=settings.publish_max_memory_share,
                shared_queue=queue if settings.shared_triggers else "", trigger=trigger,
            )
        except NotReplicated as e:
            self._count_refused("not_replicated")
            # Not accepted: the ledger took them back (withdrawn), so none is called; they
            # stay buffered and are sent again with the same ids. Should the withdrawal fail,
            # the ledger holds them: sent again they are known (a no-op), and the sweeper
            # sends their trigger once overdue, so they may still be delivered, once.
            detail = ("withdrawn, not accepted" if e.withdrawn
                      else "could not be withdrawn: they may still be delivered; publish them again with the same ids")
            raise RedisUnavailable(
                f"Redis at {mask_url(self.redis_url)} did not replicate the events ({detail}): {e}") from e
        except redis.ResponseError as e:  # e.g. full (maxmemory, or our headroom below it), a replica
            self._count_refused("full" if is_full(e) else "error_reply")
            raise RedisUnavailable(f"Redis at {mask_url(self.redis_url)} refused the events: {e}") from e
        except redis.RedisError as e:
            self._count_refused("unreachable")
            raise RedisUnavailable(f"Redis at {mask_url(self.redis_url)} is unreachable: {e}") from e
        new_ids = [event.id for event, is_new in zip(batch, accepted, strict=True) if is_new]
        if not new_ids:
            return
        try:
            if not settings.shared_triggers:
                send_deliver(self._celery, new_ids, 1, sent_at_s, queue)
            elif trigger and trigger[0]:  # (else a shared trigger of this queue is on its way)
                send_shared(self._celery, queue, self._ledger.partition_of(new_ids[0]), sent_at_s)
        except Exception as e:
            # The events are in the ledger, so they are accepted: the next accept of this
            # queue asks for a trigger again (SHARED_TRIGGER_HOLD_MS), and the workers'
            # sweeper sends their trigger once it sees it was never delivered.
            _log.warning("cgrid-s2s: the trigger of %d accepted events was not sent (%s); the workers' sweeper "
                         "sends it within CGRID_REDELIVER_AFTER_S", len(new_ids), type(e).__name__)

    def _count_refused(self, reason: str) -> None:
        self.refused[reason] += 1
        if self._refused_metric is not None:
            self._refused_metric.labels(reason).inc()

    def _linger_loop(self) -> None:
        while True:
            with self._cond:
                if self._closed:
                    return
                if not self._buffer:
                    self._cond.wait()  # until the next first event, or close()
                    continue
                wait_s = self._oldest_at + self.linger_s - time.monotonic()
                if wait_s > 0 and len(self._buffer) < self.batch_size:
                    self._cond.wait(wait_s)
                    continue
            try:
                self._send_buffered()
                self._sender_error = None
            except RedisUnavailable:
                time.sleep(0.2)
            except Exception as e:  # a bug: the events stay buffered; publish() and flush() say so
                _log.exception("cgrid-s2s: the publisher's sender failed; its events stay buffered")
                self._sender_error = e
                time.sleep(0.2)
