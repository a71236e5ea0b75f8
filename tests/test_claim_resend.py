"""A claim (or a pull) whose reply is lost after Redis ran it, then sent again, gets its own
claims back (issue 15): before, the second send found the events claimed by someone and
returned nothing, so the attempt was never made and ended `lost` after its lease.

The reply is lost for real: a TCP proxy on loopback between the worker's client and the
private redis-server passes everything through, except that it drops the reply to the next
request carrying a given script's SHA and closes that connection, after Redis ran it."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from cgrid.event import parse_event
from cgrid.ledger import Ledger, Park, WaitReason
from cgrid.ledger.ledger import SCRIPTS
from cgrid.redis_server import RedisServer
from cgrid.settings import Settings
from ops.mock_dsp import MockDspServer
from producer import Publisher
from tests.helpers import WorkerProcess, fleet_env, wait_for
from worker.batch import run_batch
from worker.runtime import Runtime

pytestmark = pytest.mark.integration

TTL = dict(ledger_ttl_s=3600, report_ttl_s=3600)


def sha(name: str) -> bytes:
    return hashlib.sha1(SCRIPTS[name].encode()).hexdigest().encode()


class ReplyCutter:
    """A loopback TCP proxy in front of Redis that loses chosen replies."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"redis://127.0.0.1:{self.listener.getsockname()[1]}/0"
        self._lock = threading.Lock()
        self._marker, self._to_cut = b"", 0
        self.cut_count = 0
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def cut(self, marker: bytes, times: int = 1) -> None:
        """Lose the replies to the next ``times`` requests that carry ``marker``."""
        with self._lock:
            self._marker, self._to_cut = marker, times

    def close(self) -> None:
        self.listener.close()
        for s in self._sockets:
            with contextlib.suppress(OSError):
                s.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.upstream_port))
            self._sockets += [client, server]
            flags = {"cut": False}
            threading.Thread(target=self._up, args=(client, server, flags), daemon=True).start()
            threading.Thread(target=self._down, args=(server, client, flags), daemon=True).start()

    def _up(self, client: socket.socket, server: socket.socket, flags: dict[str, bool]) -> None:
        with contextlib.suppress(OSError):
            while data := client.recv(65536):
                with self._lock:
                    if self._to_cut and self._marker in data:
                        self._to_cut -= 1
                        flags["cut"] = True  # set before Redis can see the request
                server.sendall(data)
        self._shut(client, server)

    def _down(self, server: socket.socket, client: socket.socket, flags: dict[str, bool]) -> None:
        with contextlib.suppress(OSError):
            while data := server.recv(65536):
                if flags["cut"]:  # Redis ran it; its reply is lost with the connection
                    with self._lock:
                        self.cut_count += 1
                    break
                client.sendall(data)
        self._shut(client, server)

    @staticmethod
    def _shut(*sockets: socket.socket) -> None:
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()


@pytest.fixture()
def proxy(redis_url: str, redis_server: RedisServer) -> Iterator[ReplyCutter]:
    direct = redis.Redis.from_url(redis_url)
    for name in SCRIPTS:  # loaded, so the cut request is the one that runs (not a NOSCRIPT)
        direct.script_load(SCRIPTS[name])
    cutter = ReplyCutter(int(redis_url.rsplit(":", 1)[1].split("/")[0]))
    yield cutter
    cutter.close()


def burl(event_id: str, dsp: MockDspServer, buyer: str = "b1") -> Any:
    return parse_event({"id": event_id, "kind": "burl", "upstream": "s2s", "buyer": buyer,
                        "url": f"{dsp.url}/status/204?e={event_id}"})


def calls_of(dsp: MockDspServer, event_id: str) -> int:
    return sum(1 for c in dsp.log.snapshot() if c["target"].endswith(f"e={event_id}"))


def test_the_same_claim_sent_again_gets_its_claims_a_new_one_nothing(redis_url: str) -> None:
    ledger = Ledger(redis.Redis.from_url(redis_url))
    events = [parse_event({"id": i, "kind": "burl", "upstream": "s2s", "url": "https://d.example/"})
              for i in ("a", "b")]
    ledger.accept(events, redeliver_after_s=30, **TTL)
    token = "00112233445566778899aabbccddeeff"
    stamps: list[str] = []
    first = ledger.claim(["a", "b"], 1, lease_s=30, sent_at_s=0, stamp=stamps, token=token)
    again = ledger.claim(["a", "b"], 1, lease_s=30, sent_at_s=0, stamp=stamps, token=token)
    assert sorted(i for i, _ in first) == ["a", "b"] and again == first
    assert stamps == [token, token]
    assert ledger.claim(["a", "b"], 1, lease_s=30, sent_at_s=0) == []  # a duplicate trigger: nothing
    assert ledger.claim(["a"], 2, lease_s=30, sent_at_s=0, token=token) == []  # not attempt 2
    assert ledger.park([Park("a", 1, time.time(), "-", WaitReason.LANE_FULL, "ffeeddccbbaa99887766554433221100")]) \
        == [False]  # another claim's token
    assert ledger.park([Park("a", 1, time.time(), "-", WaitReason.LANE_FULL, token)]) == [True]
    assert ledger.claim(["a"], 1, lease_s=30, sent_at_s=0, token=token) == []  # parked: no longer this claim's


def test_the_same_pull_sent_again_gets_its_claims_then_more(redis_url: str) -> None:
    ledger = Ledger(redis.Redis.from_url(redis_url))
    ids = [f"p{i}" for i in range(5)]
    ledger.accept([parse_event({"id": i, "kind": "burl", "upstream": "s2s", "url": "https://d.example/",
                                "buyer": "b1"}) for i in ids], redeliver_after_s=30, **TTL)
    stamp: list[str] = []
    ledger.claim(ids, 1, lease_s=30, sent_at_s=0, stamp=stamp)
    ledger.park([Park(i, 1, float(n + 1), "b1", WaitReason.LANE_FULL, stamp[0]) for n, i in enumerate(ids)])
    token = "0123456789abcdef"
    first = ledger.pull("b1", 2, lease_s=30, token=token)
    assert first[0] == 3 and [i for _, i, _ in first[1]] == ["p0", "p1"]
    assert sorted(ledger.pull("b1", 2, lease_s=30, token=token)[1]) == first[1]  # sent again: the same
    left, items = ledger.pull("b1", 3, lease_s=30, token=token)  # again, with room for one more
    assert left == 2 and sorted(i for _, i, _ in items) == ["p0", "p1", "p2"]
    left, items = ledger.pull("b1", 5, lease_s=30)  # another pull: only what is still parked
    assert left == 0 and sorted(i for _, i, _ in items) == ["p3", "p4"]


def test_a_claim_whose_reply_is_lost_is_ridden_out_and_the_call_made_once(
        redis_url: str, proxy: ReplyCutter, dsp: MockDspServer) -> None:
    """worker/batch.py's claim through ride_out_redis, on a client that does not retry by
    itself: the first send's reply is lost, ride_out_redis sends it again."""
    settings = Settings.from_env(fleet_env(proxy.url))
    client = redis.Redis.from_url(proxy.url, retry=Retry(NoBackoff(), 0), socket_timeout=5)
    rt = Runtime(settings=settings, ledger=Ledger(client), pid=os.getpid())
    direct = Ledger(redis.Redis.from_url(redis_url))
    direct.accept([burl("lost-reply", dsp)], redeliver_after_s=30, **TTL)
    proxy.cut(sha("claim"))
    assert run_batch(rt, ["lost-reply"], 1, time.time(), "cgrid.deliver") == {"ids": 1, "claimed": 1}
    assert proxy.cut_count == 1
    record = wait_for(lambda: (r := direct.record("lost-reply")) and r["state"] == "delivered" and r, 20,
                      "delivered")
    assert [a["status"] for a in record["attempts"]] == [204] and calls_of(dsp, "lost-reply") == 1
    assert rt.engine.drain(5)


def test_a_pull_whose_reply_is_lost_is_ridden_out_and_the_calls_made_once(
        redis_url: str, proxy: ReplyCutter, dsp: MockDspServer) -> None:
    """The engine's pull of parked events, its reply lost once: the events come back to it."""
    settings = Settings.from_env(fleet_env(proxy.url))
    client = redis.Redis.from_url(proxy.url, retry=Retry(NoBackoff(), 0), socket_timeout=5)
    rt = Runtime(settings=settings, ledger=Ledger(client), pid=os.getpid())
    direct = Ledger(redis.Redis.from_url(redis_url))
    ids = [f"parked-{i}" for i in range(3)]
    direct.accept([burl(i, dsp, buyer="b-pull") for i in ids], redeliver_after_s=30, **TTL)
    stamp: list[str] = []
    direct.claim(ids, 1, lease_s=60, sent_at_s=0, stamp=stamp)
    direct.park([Park(i, 1, float(n + 1), "b-pull", WaitReason.LANE_FULL, stamp[0]) for n, i in enumerate(ids)])
    proxy.cut(sha("pull"))
    # A new event of that buyer: its claim says the buyer has parked events, so the lane pulls.
    direct.accept([burl("trigger", dsp, buyer="b-pull")], redeliver_after_s=30, **TTL)
    assert run_batch(rt, ["trigger"], 1, time.time(), "cgrid.deliver")["claimed"] == 1
    wait_for(lambda: all((direct.record(i) or {}).get("state") == "delivered" for i in [*ids, "trigger"]), 20,
             "every event delivered")
    assert proxy.cut_count == 1
    for event_id in [*ids, "trigger"]:
        assert calls_of(dsp, event_id) == 1
        assert [a["status"] for a in direct.record(event_id)["attempts"]] == [204]  # type: ignore[index]
    assert rt.engine.drain(5)


def test_a_celery_worker_whose_claim_reply_is_lost_calls_once_on_the_first_attempt(
        redis_url: str, proxy: ReplyCutter, dsp: MockDspServer, tmp_path: Path) -> None:
    """A real worker with its own clients (redis-py sends a command again by itself after a
    lost connection) talks to Redis through the proxy; the first claim's reply is lost."""
    proxy.cut(sha("claim"))
    env = fleet_env(proxy.url)
    worker = WorkerProcess(env, tmp_path / "worker.log", pool="threads", concurrency=2).start()
    try:
        event_id = f"e2e-{uuid.uuid4().hex[:8]}"
        with Publisher(Settings.from_env(fleet_env(redis_url)), linger_ms=0) as publisher:
            publisher.publish(burl(event_id, dsp))
        direct = Ledger(redis.Redis.from_url(redis_url))
        record = wait_for(lambda: (r := direct.record(event_id)) and r["state"] == "delivered" and r, 30,
                          f"delivered ({tmp_path / 'worker.log'})")
        assert proxy.cut_count == 1
        assert [a["status"] for a in record["attempts"]] == [204] and calls_of(dsp, event_id) == 1
    finally:
        worker.stop()
