"""The call loop's epoll bookkeeping (delivery/engine.py): a keep-alive connection stays
registered between its calls; one the buyer closes while idle is unregistered (the loop does
not spin on it); one libcurl closes is forgotten, so a new socket that gets its number is
watched again. Real calls, a real Redis, a buyer on loopback."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from cgrid.ledger import Ledger
from cgrid.settings import Settings
from delivery.engine import DeliveryEngine
from tests.helpers import fleet_env, wait_for
from tests.test_engine import accept_and_claim

pytestmark = pytest.mark.integration

ANSWER = b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n"
CLOSE_ANSWER = b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class Buyer:
    """Answers every request 204 on keep-alive connections, which it closes after ``idle_s``
    without a request; or closes each one after its answer (``close``)."""

    def __init__(self, idle_s: float = 0.3, close: bool = False) -> None:
        self.idle_s, self.close = idle_s, close
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        self.requests = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(self.idle_s)
        buffer = b""
        with conn:
            while True:
                try:
                    data = conn.recv(65536)
                except (TimeoutError, OSError):
                    return  # idle too long: the buyer closes the keep-alive connection
                if not data:
                    return
                buffer += data
                while b"\r\n\r\n" in buffer:
                    _, buffer = buffer.split(b"\r\n\r\n", 1)
                    self.requests += 1
                    conn.sendall(CLOSE_ANSWER if self.close else ANSWER)
                    if self.close:
                        return

    def stop(self) -> None:
        self.listener.close()


@pytest.fixture()
def engine(redis_url: str) -> Iterator[DeliveryEngine]:
    settings = Settings.from_env(fleet_env(redis_url, CGRID_TIMEOUT_S=2))
    engine = DeliveryEngine(settings, Ledger(redis.Redis.from_url(redis_url)))
    yield engine
    assert engine.drain(5)


def events(prefix: str, port: int, n: int) -> list[dict[str, Any]]:
    return [{"id": f"{prefix}-{i}", "kind": "burl", "upstream": "s2s", "buyer": "b",
             "url": f"http://127.0.0.1:{port}/?e={prefix}-{i}"} for i in range(n)]


def deliver(engine: DeliveryEngine, batch: list[dict[str, Any]], within_s: float = 10) -> None:
    ids = accept_and_claim(engine, batch)
    ledger = engine.ledger
    wait_for(lambda: all((ledger.record(i) or {}).get("state") == "delivered" for i in ids), within_s,
             "every event delivered")


def thread_cpu_s(native_id: int) -> float:
    import os

    fields = Path(f"/proc/self/task/{native_id}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def buyer_fds(fds: Any, port: int) -> set[int]:
    """Those of ``fds`` that are connections to the buyer on ``port`` (libcurl may watch
    sockets of its own too)."""
    import os

    found = set()
    for fd in list(fds):
        try:
            with socket.socket(fileno=os.dup(fd)) as sock:
                if sock.getpeername()[1] == port:
                    found.add(fd)
        except OSError:
            continue
    return found


def loop_thread_id() -> int:
    return next(t.native_id for t in threading.enumerate() if t.name == "cgrid-curl-loop" and t.native_id)


def test_connections_closed_by_the_buyer_while_idle_are_unwatched_and_replaced(engine: DeliveryEngine) -> None:
    buyer = Buyer(idle_s=0.3)
    try:
        for i in range(3):  # one call at a time: one keep-alive connection, reused
            deliver(engine, events(f"seq{i}", buyer.port, 1))
        assert buyer.connections == 1 and buyer.requests == 3
        loop = engine.call_loop
        assert loop is not None
        # kept registered while idle, not watched
        assert len(buyer_fds(loop.registered, buyer.port)) == 1 and not buyer_fds(loop.wanted, buyer.port)
        deliver(engine, events("par", buyer.port, 20))  # some in parallel: more connections
        opened = buyer.connections
        # The buyer closes them all while they are idle: each stirs once and is unregistered.
        wait_for(lambda: not buyer_fds(loop.registered, buyer.port), 5, "the closed idle connections unregistered")
        tid = loop_thread_id()
        cpu0 = thread_cpu_s(tid)
        time.sleep(1.0)
        assert thread_cpu_s(tid) - cpu0 < 0.2  # the loop does not spin on a closed socket
        # libcurl finds them dead, closes them (their numbers come free) and opens new ones:
        # each is watched again, so every call is answered, none waits for its deadline.
        started = time.monotonic()
        deliver(engine, events("again", buyer.port, 20))
        assert time.monotonic() - started < 1.5
        assert buyer.connections > opened
    finally:
        buyer.stop()


def test_a_buyer_closing_after_every_answer_gets_every_call(engine: DeliveryEngine) -> None:
    """Every call on a new connection: libcurl closes each socket after its answer, and the
    next socket usually gets the same number; it must be watched anew each time."""
    buyer = Buyer(close=True)
    try:
        started = time.monotonic()
        for i in range(10):
            deliver(engine, events(f"close{i}", buyer.port, 1))
        deliver(engine, events("close-par", buyer.port, 30))
        assert time.monotonic() - started < 5  # none waited for its 2 s deadline
        assert buyer.connections == buyer.requests == 40
        loop = engine.call_loop
        assert loop is not None
        wait_for(lambda: not buyer_fds(loop.registered, buyer.port), 2, "closed sockets forgotten")
    finally:
        buyer.stop()
