"""The guarded call over real HTTP on loopback: no redirects, no hidden retries, a
wall-clock deadline that a trickling server cannot stretch, error classes."""

from __future__ import annotations

import ipaddress
import socket
import threading
import time

import pytest
import urllib3

from cgrid.errors import ForbiddenDestination
from cgrid.event import parse_event
from producer.mock_dsp import MockDspServer
from worker.classify import ErrorClass
from worker.delivery import deliver
from worker.http_client import AttemptError, call, make_pool

LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"),)


@pytest.fixture()
def session() -> urllib3.PoolManager:
    return make_pool(LOOPBACK, maxsize=4)


def test_redirect_is_success_and_not_followed(session, dsp: MockDspServer) -> None:  # type: ignore[no-untyped-def]
    assert call(session, dsp.url + "/status/302", {}, 2.0) == 302
    assert [c["target"] for c in dsp.log.snapshot()] == ["/status/302"]


def test_only_our_headers_are_sent(session, dsp: MockDspServer) -> None:  # type: ignore[no-untyped-def]
    call(session, dsp.url + "/", {"User-Agent": "CGRID/1.0", "X-CGRID-ServerUpstream": "1"}, 2.0)
    sent = dsp.log.snapshot()[0]["headers"]
    assert sent["User-Agent"] == "CGRID/1.0" and sent["X-CGRID-ServerUpstream"] == "1"
    assert "X-Forwarded-For" not in sent and "X-User-Agent" not in sent


def test_reset_is_one_call_and_a_transport_error(session, dsp: MockDspServer) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(AttemptError) as info:
        call(session, dsp.url + "/reset", {}, 2.0)
    assert info.value.error_class in (ErrorClass.CONNECTION_RESET, ErrorClass.PROTOCOL)
    assert len(dsp.log.snapshot()) == 1  # no hidden urllib3 retry


def test_refused_connection(session) -> None:  # type: ignore[no-untyped-def]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(AttemptError) as info:
        call(session, f"http://127.0.0.1:{port}/", {}, 2.0)
    assert info.value.error_class is ErrorClass.CONNECT_REFUSED


def test_slow_answer_hits_the_deadline(session, dsp: MockDspServer) -> None:  # type: ignore[no-untyped-def]
    started = time.monotonic()
    with pytest.raises(AttemptError) as info:
        call(session, dsp.url + "/sleep/3000", {}, 0.5)
    assert info.value.error_class is ErrorClass.TIMEOUT
    assert time.monotonic() - started < 2.0


def test_trickling_answer_cannot_hold_past_the_deadline(session, dsp: MockDspServer) -> None:  # type: ignore[no-untyped-def]
    # One byte every 100 ms: each read is quick, so only a wall-clock deadline stops it.
    started = time.monotonic()
    with pytest.raises(AttemptError) as info:
        call(session, dsp.url + "/trickle/100", {}, 0.7)
    elapsed = time.monotonic() - started
    assert info.value.error_class is ErrorClass.TIMEOUT
    assert 0.6 < elapsed < 2.0, elapsed


def test_deadline_holds_across_threads(session, dsp: MockDspServer) -> None:  # type: ignore[no-untyped-def]
    results: list[float] = []

    def one() -> None:
        started = time.monotonic()
        with pytest.raises(AttemptError):
            call(session, dsp.url + "/trickle/50", {}, 0.5)
        results.append(time.monotonic() - started)

    threads = [threading.Thread(target=one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and max(results) < 2.0


def test_keep_alive_connection_is_reused_after_a_small_body(session, dsp: MockDspServer) -> None:  # type: ignore[no-untyped-def]
    for _ in range(3):
        assert call(session, dsp.url + "/status/200", {}, 2.0) == 200
    assert len(dsp.log.snapshot()) == 3


def test_guard_refuses_loopback_outside_the_allow_list(dsp: MockDspServer) -> None:
    # Allow only 127.0.0.1; 127.0.0.2 is loopback too, so nothing leaves the machine.
    session = make_pool((ipaddress.ip_network("127.0.0.1/32"),))
    with pytest.raises(ForbiddenDestination, match="loopback"):
        call(session, "http://127.0.0.2:9/", {}, 1.0)
    assert call(session, dsp.url + "/", {}, 2.0) == 204


def test_deliver_turns_a_forbidden_host_into_rejected(dsp: MockDspServer) -> None:
    session = make_pool(())
    event = parse_event({"kind": "burl", "url": dsp.url + "/", "upstream": "s2s"})
    attempt = deliver(event, session, attempt_n=1, timeout_s=1.0)
    assert attempt.outcome.value == "rejected" and "loopback" in attempt.reason
    assert dsp.log.snapshot() == []
