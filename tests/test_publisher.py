"""The Publisher against a real Redis: idempotent ids, batching, flush, and clear errors."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis

from cgrid.event import Event, Kind, Upstream
from cgrid.ledger import Ledger
from cgrid.redis_server import RedisServer, free_port
from cgrid.settings import Settings
from producer import CgridError, InvalidEvent, Publisher, PublishFailed, RedisUnavailable
from tests.helpers import wait_for

EVENT = {"kind": "nurl", "url": "https://dsp.example/w", "upstream": "s2s"}


def settings_for(url: str, **extra: str) -> Settings:
    return Settings.from_env({"CGRID_REDIS_URL": url, "CGRID_PUBLISH_TIMEOUT_S": "0.5", **extra})


def queued_ids(client: redis.Redis, queue: str = "cgrid.deliver") -> list[str]:
    """The ids waiting for a worker on ``queue``: those its triggers carry, and those in its
    pending list for a shared trigger."""
    import base64
    import json

    ids: list[str] = []
    for raw in client.lrange(queue, 0, -1):
        body = json.loads(base64.b64decode(json.loads(raw)["body"]))
        ids += body[0][0]
    return ids + [i.decode() for i in client.lrange(f"cgrid:pending:{queue}", 0, -1)]


def test_publish_buffers_then_flush_accepts(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    publisher = Publisher(settings_for(redis_url), linger_ms=10_000, batch_size=1000)
    ids = [publisher.publish({**EVENT, "id": f"e{i}"}) for i in range(250)]
    assert Ledger(client).record("e0") is None  # buffered, not yet accepted
    publisher.flush()
    assert Ledger(client).record("e249")["state"] == "pending"  # type: ignore[index]
    assert sorted(queued_ids(client)) == sorted(ids)
    publisher.close()


def test_linger_sends_without_flush(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    with Publisher(settings_for(redis_url), linger_ms=20) as publisher:
        publisher.publish({**EVENT, "id": "lingered"})
        deadline = time.monotonic() + 5
        while Ledger(client).record("lingered") is None:
            assert time.monotonic() < deadline, "linger never sent the event"
            time.sleep(0.01)


def test_an_event_after_a_quiet_spell_waits_only_the_linger(redis_url: str) -> None:
    """The first event into an empty buffer starts the linger clock: it is accepted about
    CGRID_LINGER_MS later, not whenever the idle sender happens to look again."""
    ledger = Ledger(redis.Redis.from_url(redis_url))
    with Publisher(settings_for(redis_url), linger_ms=20) as publisher:
        publisher.publish({**EVENT, "id": "quiet-warm"})
        publisher.flush()  # connections made
        waits_s = []
        for n in range(8):
            time.sleep(0.05)  # the buffer is empty: the sender is idle
            published_at = time.monotonic()
            publisher.publish({**EVENT, "id": f"quiet-{n}"})
            while ledger.record(f"quiet-{n}") is None:
                assert time.monotonic() - published_at < 5, "the lingered event was never sent"
                time.sleep(0.002)
            waits_s.append(time.monotonic() - published_at)
    assert max(waits_s) < 0.2, waits_s  # 20 ms of linger, with ample slack


def test_same_id_twice_is_one_delivery(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    with Publisher(settings_for(redis_url), linger_ms=0) as publisher:
        assert publisher.publish({**EVENT, "id": "dup"}) == "dup"
        assert publisher.publish({**EVENT, "id": "dup"}) == "dup"
        assert publisher.publish_many([{**EVENT, "id": "dup"}, {**EVENT, "id": "dup"}]) == ["dup", "dup"]
    assert queued_ids(client) == ["dup"]


def test_batches_are_split_by_batch_size(redis_url: str) -> None:
    """Three batches: one shared trigger for all (the others find it on its way); with shared
    triggers off, a trigger per batch."""
    client = redis.Redis.from_url(redis_url)
    with Publisher(settings_for(redis_url), linger_ms=10_000, batch_size=40) as publisher:
        publisher.publish_many([dict(EVENT) for _ in range(100)])
    assert client.llen("cgrid.deliver") == 1 and len(queued_ids(client)) == 100
    client.flushall()
    with Publisher(settings_for(redis_url, CGRID_SHARED_TRIGGERS="0"), linger_ms=10_000, batch_size=40) as publisher:
        publisher.publish_many([dict(EVENT) for _ in range(100)])
    assert client.llen("cgrid.deliver") == 3 and len(queued_ids(client)) == 100
    assert not client.exists("cgrid:pending:cgrid.deliver")


def test_invalid_event_names_the_field_and_sends_nothing(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    with Publisher(settings_for(redis_url), linger_ms=0) as publisher:
        with pytest.raises(InvalidEvent, match=r"^upstream: "):
            publisher.publish({**EVENT, "upstream": "x"})
        with pytest.raises(InvalidEvent, match=r"^kind: "):
            publisher.publish_many([dict(EVENT), {**EVENT, "kind": "x"}])
    assert client.llen("cgrid.deliver") == 0


def test_redis_unreachable_is_a_clear_error_and_keeps_the_event() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    publisher = Publisher(settings_for(url), linger_ms=0)
    started = time.monotonic()
    with pytest.raises(RedisUnavailable, match="unreachable"):
        publisher.publish(dict(EVENT))
    assert time.monotonic() - started < 5  # fails fast, within the publish timeout
    with pytest.raises(RedisUnavailable):
        publisher.flush(timeout_s=0.2)  # still buffered, still not accepted
    with pytest.raises(RedisUnavailable):
        publisher.close()


def test_redis_out_of_memory_is_a_clear_error_and_keeps_the_event(tmp_path: Path) -> None:
    server = RedisServer(tmp_path, free_port()).start()
    try:
        client = redis.Redis.from_url(server.url)
        client.config_set("maxmemory", 1)  # below what it uses: every write is refused
        publisher = Publisher(settings_for(server.url), linger_ms=0)
        with pytest.raises(RedisUnavailable, match=r"refused the events: .*maxmemory"):
            publisher.publish({**EVENT, "id": "oom-1"})
        client.config_set("maxmemory", 0)
        publisher.close()  # the buffered event goes out once Redis has room
        assert Ledger(client).record("oom-1") is not None
    finally:
        server.stop()


def test_full_buffer_refuses_more_while_redis_is_down() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    publisher = Publisher(settings_for(url), linger_ms=60_000, batch_size=1000, max_buffered=5)
    publisher.publish_many([dict(EVENT) for _ in range(5)])
    with pytest.raises(RedisUnavailable, match="not accepted"):
        publisher.publish(dict(EVENT))
    with pytest.raises(RedisUnavailable):
        publisher.close()


def test_close_that_failed_can_be_retried_and_loses_nothing(tmp_path: Path) -> None:
    server = RedisServer(tmp_path, free_port()).start()
    try:
        publisher = Publisher(settings_for(server.url), linger_ms=60_000, batch_size=1000)
        ids = publisher.publish_many([dict(EVENT) for _ in range(10)])
        server.stop(kill=True)
        with pytest.raises(RedisUnavailable):
            publisher.close()
        server.start()
        publisher.close()  # again, now that Redis is back
        ledger = Ledger(redis.Redis.from_url(server.url))
        assert all(ledger.record(i) is not None for i in ids)
    finally:
        server.stop()


def test_an_event_the_sender_cannot_write_is_reported_and_holds_back_no_other(redis_url: str) -> None:
    """The sender never dies silently: an event it cannot send (here one built as an Event,
    which skips validation, with a lone surrogate that is not UTF-8) is reported to the
    caller of flush() and publish(), and the events around it are accepted."""
    ledger = Ledger(redis.Redis.from_url(redis_url))
    publisher = Publisher(settings_for(redis_url), linger_ms=20, batch_size=1000)
    good = [publisher.publish({**EVENT, "id": f"good-{i}"}) for i in range(5)]
    unsendable = Event(kind=Kind.NURL, url="https://dsp.example/w", upstream=Upstream.S2S, id="unsendable",
                       forwarded_for=("1.2.3.4\udc80",))
    publisher.publish(unsendable)
    good.append(publisher.publish({**EVENT, "id": "good-after"}))
    with pytest.raises(PublishFailed, match=r"unsendable .*UnicodeEncodeError") as info:
        publisher.flush()
    assert info.value.event_ids == ["unsendable"]
    assert all(ledger.record(i) is not None for i in good)
    assert ledger.record("unsendable") is None
    # Reported once; the sender lives on: later events go out by themselves (linger).
    publisher.publish({**EVENT, "id": "later"})
    wait_for(lambda: ledger.record("later"), 10, "the sender to send a later event")
    publisher.close()


def test_with_linger_0_an_unsendable_event_raises_at_publish(redis_url: str) -> None:
    ledger = Ledger(redis.Redis.from_url(redis_url))
    with Publisher(settings_for(redis_url), linger_ms=0) as publisher:
        unsendable = Event(kind=Kind.NURL, url="https://dsp.example/w", upstream=Upstream.S2S, id="bad-ua",
                           user_agent="Mozilla \ud800")
        with pytest.raises(PublishFailed, match="bad-ua"):
            publisher.publish_many([{**EVENT, "id": "fine-1"}, unsendable, {**EVENT, "id": "fine-2"}])
        assert ledger.record("fine-1") is not None and ledger.record("fine-2") is not None
        publisher.publish({**EVENT, "id": "fine-3"})  # the failure was reported once
    assert ledger.record("fine-3") is not None


def test_a_lone_surrogate_is_refused_at_publish_naming_the_field(redis_url: str) -> None:
    with Publisher(settings_for(redis_url), linger_ms=20) as publisher:
        for event, field in [({**EVENT, "forwarded_for": ["1.2.3.4\udc80"]}, "forwarded_for[0]"),
                             ({**EVENT, "user_agent": "Mozilla \ud800"}, "user_agent"),
                             ({**EVENT, "macros": {"AUCTION_PRICE": "1\udfff"}}, "macros.AUCTION_PRICE")]:
            with pytest.raises(InvalidEvent) as info:
                publisher.publish(event)
            assert info.value.field == field


def test_a_failing_sender_keeps_the_events_and_says_so(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Should the sender itself break (a bug outside any one event), its events stay
    buffered and publish() and flush() raise instead of buffering in silence."""
    ledger = Ledger(redis.Redis.from_url(redis_url))
    publisher = Publisher(settings_for(redis_url), linger_ms=10, batch_size=1000)

    def broken(events: list[Event]) -> list[tuple[str, list[Event]]]:
        raise RuntimeError("a bug in batching")

    monkeypatch.setattr(publisher, "_batches", broken)
    ids = publisher.publish_many([{**EVENT, "id": f"kept-{i}"} for i in range(3)])
    with pytest.raises(CgridError, match=r"sender fails .*a bug in batching.*[34] events wait"):
        wait_for(lambda: publisher.publish(dict(EVENT)) and False, 10, "publish() to raise")
    with pytest.raises(RuntimeError, match="a bug in batching"):
        publisher.flush()
    monkeypatch.undo()
    publisher.close()
    assert all(ledger.record(i) is not None for i in ids)
