"""The guarded libcurl call over real HTTP on loopback: no redirects, no hidden retries
(not even libcurl's own on a reused connection), a wall-clock deadline that a trickling
server cannot stretch, no proxy from the environment, error classes."""

from __future__ import annotations

import ipaddress
import socket
import threading
import time

import pycurl
import pytest

from cgrid.errors import ForbiddenDestination
from cgrid.event import parse_event
from delivery.attempt import deliver
from delivery.classify import ErrorClass
from delivery.http_client import (
    AttemptError,
    ClientConfig,
    Transfer,
    call,
    error_class,
    header_lines,
    make_client,
    read_header_lines,
)
from ops.mock_dsp import MockDspServer

LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"),)


@pytest.fixture()
def session() -> ClientConfig:
    return make_client(LOOPBACK)


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
    assert info.value.error_class is ErrorClass.CONNECTION_RESET
    assert len(dsp.log.snapshot()) == 1


def test_no_hidden_retry_on_a_reused_connection(session, dsp: MockDspServer) -> None:  # type: ignore[no-untyped-def]
    # libcurl sends a request again, on a new connection, when a reused keep-alive
    # connection dies without an answer: that would be a second call the buyer counts.
    transfer = Transfer(session)
    statuses = []
    for path in ("/status/204", "/reset", "/status/204"):
        transfer.prepare(dsp.url + path, header_lines({}), 2.0)
        errno = 0
        try:
            transfer.curl.perform()
        except pycurl.error as e:
            errno = e.args[0]
        statuses.append(transfer.result(errno).status or transfer.result(errno).error)
    transfer.curl.close()
    assert statuses == [204, ErrorClass.CONNECTION_RESET, 204]
    assert [c["target"] for c in dsp.log.snapshot()] == ["/status/204", "/reset", "/status/204"]


def test_a_timeout_on_a_reused_connection_is_a_timeout_not_a_connect_timeout(session, dsp: MockDspServer) -> None:  # type: ignore[no-untyped-def]
    transfer = Transfer(session)
    results = []
    for path, timeout_s in (("/status/204", 2.0), ("/sleep/2000", 0.3)):
        transfer.prepare(dsp.url + path, header_lines({}), timeout_s)
        errno = 0
        try:
            transfer.curl.perform()
        except pycurl.error as e:
            errno = e.args[0]
        results.append(transfer.result(errno))
    transfer.curl.close()
    assert results[0].status == 204 and results[1].error is ErrorClass.TIMEOUT


def test_only_the_spec_headers_and_host_are_sent(session, dsp: MockDspServer) -> None:  # type: ignore[no-untyped-def]
    headers = {"User-Agent": "CGRID/1.0", "X-CGRID-ServerUpstream": "1", "X-User-Agent": "ua",
               "X-Forwarded-For": "1.2.3.4"}
    call(session, dsp.url + "/", headers, 2.0)
    sent = dsp.log.snapshot()[0]["headers"]
    assert sent == {"Host": dsp.url.split("//")[1], **headers}  # no Accept, Expect, Accept-Encoding


def test_no_proxy_from_the_environment(session, dsp: MockDspServer, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")  # nothing listens there
    assert call(session, dsp.url + "/status/204", {}, 2.0) == 204


def test_the_path_goes_out_exactly_as_given(session, dsp: MockDspServer) -> None:  # type: ignore[no-untyped-def]
    call(session, dsp.url + "/a/../b/./c?x=${OTHER}", {}, 2.0)
    assert dsp.log.snapshot()[0]["target"] == "/a/../b/./c?x=${OTHER}"


def test_credentials_in_the_url_are_refused_not_sent(session, dsp: MockDspServer) -> None:  # type: ignore[no-untyped-def]
    from delivery.http_client import InvalidTarget

    with pytest.raises(InvalidTarget):
        call(session, dsp.url.replace("http://", "http://user:pw@") + "/", {}, 2.0)
    assert dsp.log.snapshot() == []


def test_a_large_body_is_cut_after_a_few_kib_and_the_answer_stands(session, dsp: MockDspServer) -> None:  # type: ignore[no-untyped-def]
    assert call(session, dsp.url + "/big/1000000", {}, 2.0) == 200


@pytest.mark.parametrize(("errno", "connected", "expected"), [
    (pycurl.E_OPERATION_TIMEDOUT, True, ErrorClass.TIMEOUT),
    (pycurl.E_OPERATION_TIMEDOUT, False, ErrorClass.CONNECT_TIMEOUT),
    (pycurl.E_COULDNT_CONNECT, False, ErrorClass.CONNECT_REFUSED),
    (pycurl.E_COULDNT_RESOLVE_HOST, False, ErrorClass.DNS),
    (pycurl.E_RECV_ERROR, True, ErrorClass.CONNECTION_RESET),
    (pycurl.E_SEND_ERROR, True, ErrorClass.CONNECTION_RESET),
    (pycurl.E_GOT_NOTHING, True, ErrorClass.CONNECTION_RESET),
    (pycurl.E_SSL_CONNECT_ERROR, True, ErrorClass.TLS),
    (pycurl.E_PEER_FAILED_VERIFICATION, True, ErrorClass.TLS),
    (8, True, ErrorClass.PROTOCOL),  # weird server reply
    (pycurl.E_PARTIAL_FILE, True, ErrorClass.PROTOCOL),
    (pycurl.E_OUT_OF_MEMORY, True, ErrorClass.TRANSPORT),
])
def test_every_libcurl_error_has_a_class(errno: int, connected: bool, expected: ErrorClass) -> None:
    assert error_class(errno, connected=connected) is expected


@pytest.mark.parametrize(("lines", "expected"), [
    ([b"HTTP/1.1 204 No Content\r\n", b"Server: nginx\r\n", b"\r\n"], (True, "")),
    ([b"HTTP/1.1 200 OK\r\n", b"Content-Len"], (False, "")),  # cut off inside the headers
    ([b"HTTP/1.1 100 Continue\r\n", b"\r\n"], (False, "")),  # an interim answer only
    ([b"HTTP/1.1 103 Early Hints\r\n", b"Link: </a.css>\r\n", b"\r\n", b"HTTP/1.1 200 OK\r\n", b"\n"],
     (True, "")),
    ([b"HTTP/1.1 200 OK\r\n", b"\r\n", b"X-Trailer: HTTP/1.1 2000\r\n", b"\r\n"], (True, "")),  # trailers
    ([b"HTTP/1.1 2000 Nope\r\n", b"\r\n"], (False, "HTTP/1.1 2000 Nope")),
    ([b"HTTP/1.1 10 Up\r\n", b"\r\n", b"HTTP/1.1 204 No Content\r\n", b"\r\n"], (True, "HTTP/1.1 10 Up")),
    ([b"garbage\r\n", b"\r\n"], (False, "garbage")),
    ([], (False, "")),
])
def test_header_lines_are_read_block_by_block(lines: list[bytes], expected: tuple[bool, str]) -> None:
    """The answer's header lines, read once the transfer ended: whether a final answer's
    headers all arrived (a body error after them still leaves the answer), and the first
    status line whose code is not three digits."""
    assert read_header_lines(lines) == expected


def test_malformed_answer_is_a_protocol_error(session) -> None:  # type: ignore[no-untyped-def]
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()

        def answer_garbage() -> None:
            conn, _ = server.accept()
            conn.recv(4096)
            conn.sendall(b"NOT HTTP AT ALL\r\n\r\n")
            conn.close()

        threading.Thread(target=answer_garbage, daemon=True).start()
        with pytest.raises(AttemptError) as info:
            call(session, f"http://127.0.0.1:{server.getsockname()[1]}/", {}, 2.0)
    assert info.value.error_class is ErrorClass.PROTOCOL


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
    transfer = Transfer(session)
    for _ in range(3):
        transfer.prepare(dsp.url + "/status/200", header_lines({}), 2.0)
        transfer.curl.perform()
        assert transfer.result(0).status == 200
    transfer.curl.close()
    calls = dsp.log.snapshot()
    assert len(calls) == 3 and len({c["client_port"] for c in calls}) == 1  # one connection


def test_a_reused_transfer_sends_each_requests_own_headers_and_deadline(session, dsp: MockDspServer) -> None:  # type: ignore[no-untyped-def]
    """prepare() sets the headers and deadline again only when they change: each request
    still goes out with its own."""
    transfer = Transfer(session)
    sent = []
    for ua, timeout_s, path in (("a", 2.0, "/status/204"), ("a", 2.0, "/status/204"), ("b", 2.0, "/status/204"),
                                ("b", 0.3, "/sleep/2000"), ("b", 2.0, "/sleep/500")):
        transfer.prepare(dsp.url + path, header_lines({"X-User-Agent": ua}), timeout_s)
        errno = 0
        try:
            transfer.curl.perform()
        except pycurl.error as e:
            errno = e.args[0]
        sent.append(transfer.result(errno).status or transfer.result(errno).error)
    transfer.curl.close()
    assert sent == [204, 204, 204, ErrorClass.TIMEOUT, 204]
    assert [c["headers"].get("X-User-Agent") for c in dsp.log.snapshot()] == ["a", "a", "b", "b", "b"]


def test_guard_refuses_loopback_outside_the_allow_list(dsp: MockDspServer) -> None:
    # Allow only 127.0.0.1; 127.0.0.2 is loopback too, so nothing leaves the machine.
    session = make_client((ipaddress.ip_network("127.0.0.1/32"),))
    with pytest.raises(ForbiddenDestination, match="loopback"):
        call(session, "http://127.0.0.2:9/", {}, 1.0)
    assert call(session, dsp.url + "/", {}, 2.0) == 204


def test_deliver_turns_a_forbidden_host_into_rejected(dsp: MockDspServer) -> None:
    session = make_client(())
    event = parse_event({"kind": "burl", "url": dsp.url + "/", "upstream": "s2s"})
    attempt = deliver(event, session, attempt_n=1, timeout_s=1.0)
    assert attempt.outcome.value == "rejected" and "loopback" in attempt.reason
    assert dsp.log.snapshot() == []


def raw_answer(answer: bytes, then: str) -> tuple[socket.socket, threading.Event]:
    """A one-shot server on loopback that sends ``answer`` to the first request, then
    stalls (``then="stall"``), resets the connection (``"reset"``) or closes it (``"close"``)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    done = threading.Event()

    def serve() -> None:
        conn, _ = server.accept()
        conn.recv(4096)
        conn.sendall(answer)
        if then == "stall":
            done.wait(10)
        elif then == "reset":
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        conn.close()

    threading.Thread(target=serve, daemon=True).start()
    return server, done


@pytest.mark.parametrize(("answer", "then", "expected"), [
    (b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n", "stall", ErrorClass.TIMEOUT),
    (b"HTTP/1.1 100 Continue\r\n\r\n", "reset", ErrorClass.CONNECTION_RESET),
    (b"HTTP/1.1 100 Continue\r\n\r\n", "close", ErrorClass.CONNECTION_RESET),
    (b"HTTP/1.1 103 Early Hints\r\n\r\nHTTP/1.1 100 Continue\r\n\r\n", "stall", ErrorClass.TIMEOUT),
    (b"HTTP/1.1 101 Switching Protocols\r\n\r\n", "close", None),
    (b"HTTP/1.1 199 Whatever\r\n\r\n", "close", None),
    (b"HTTP/1.1 199 Whatever\r\n\r\n", "stall", None),
    (b"HTTP/1.1 1000 Nope\r\nContent-Length: 0\r\n\r\n", "close", ErrorClass.PROTOCOL),
    (b"HTTP/1.1 2000 Nope\r\nContent-Length: 0\r\n\r\n", "close", ErrorClass.PROTOCOL),
    (b"HTTP/1.1 20 Nope\r\nContent-Length: 0\r\n\r\n", "close", ErrorClass.PROTOCOL),
])
def test_an_interim_1xx_answer_is_not_the_answer(session, answer: bytes, then: str,  # type: ignore[no-untyped-def]
                                                 expected: ErrorClass | None) -> None:
    """SPEC §4: a timeout or reset is a failed attempt, also after an interim 1xx (100
    Continue, 103 Early Hints); only a final answer (200 and up) counts, and a malformed
    status line is a protocol error. (None: whatever error, as long as it is one.)"""
    server, done = raw_answer(answer, then)
    try:
        with pytest.raises(AttemptError) as info:
            call(session, f"http://127.0.0.1:{server.getsockname()[1]}/", {}, 0.7)
    finally:
        done.set()
        server.close()
    if expected is not None:
        assert info.value.error_class is expected, info.value


@pytest.mark.parametrize("interim", [b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n",
                                     b"HTTP/1.1 100 Continue\r\n\r\n"])
def test_a_final_answer_after_an_interim_one_counts(session, interim: bytes) -> None:  # type: ignore[no-untyped-def]
    server, done = raw_answer(interim + b"HTTP/1.1 204 No Content\r\n\r\n", "close")
    try:
        assert call(session, f"http://127.0.0.1:{server.getsockname()[1]}/", {}, 2.0) == 204
    finally:
        done.set()
        server.close()
