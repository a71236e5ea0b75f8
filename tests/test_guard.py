"""Request-forgery guard (SPEC §8). Non-loopback addresses are only ever *checked* here
(``resolve_checked`` and ``forbidden_reason`` connect to nothing); every test that makes a
real call targets loopback, with the allow-list narrowed to 127.0.0.1/32."""

from __future__ import annotations

import ipaddress
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from cgrid.errors import ForbiddenDestination
from cgrid.settings import parse_networks
from producer.mock_dsp import MockDspServer
from worker.guard import forbidden_reason, resolve_checked
from worker.http_client import call, make_pool

ONLY_127_0_0_1 = parse_networks("127.0.0.1/32")


@pytest.mark.parametrize(
    ("host", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("2130706433", "loopback"),  # decimal
        ("0x7f000001", "loopback"),  # hex
        ("127.1", "loopback"),  # short form
        ("0177.0.0.1", "loopback"),  # octal
        ("::ffff:127.0.0.1", "loopback"),  # IPv4-mapped IPv6
        ("::1", "loopback"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("169.254.169.254", "link-local"),  # cloud metadata
        ("2852039166", "link-local"),  # the same, in decimal
        ("0xa9fea9fe", "link-local"),  # and in hex
        ("fe80::1", "link-local"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("fc00::1", "private"),  # IPv6 unique-local
        ("fd12:3456::1", "private"),
        ("100.64.0.1", "carrier-grade NAT"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("240.0.0.1", "reserved"),
        ("64:ff9b::a9fe:a9fe", "link-local"),  # NAT64 of 169.254.169.254
        ("2002:a9fe:a9fe::1", "link-local"),  # 6to4 of 169.254.169.254
        ("::ffff:10.0.0.1", "private"),
        ("198.18.0.1", "private"),  # benchmarking range
    ],
)
def test_forbidden_addresses_however_written(host: str, reason: str) -> None:
    with pytest.raises(ForbiddenDestination, match=reason):
        resolve_checked(host, 80)


@pytest.mark.parametrize("host", ["93.184.215.14", "8.8.8.8", "2606:4700:4700::1111"])
def test_public_addresses_pass(host: str) -> None:
    assert resolve_checked(host, 443)  # checked only: nothing is connected to


def test_allow_list_lifts_the_ban_for_named_networks_only() -> None:
    allowed = parse_networks("10.0.0.0/8, 127.0.0.1/32")
    assert resolve_checked("10.9.8.7", 80, allowed)
    assert resolve_checked("127.0.0.1", 80, allowed)
    assert resolve_checked("::ffff:127.0.0.1", 80, allowed)  # mapped form of an allowed address
    for host in ("127.0.0.2", "192.168.0.1", "169.254.169.254"):
        with pytest.raises(ForbiddenDestination):
            resolve_checked(host, 80, allowed)


def test_forbidden_reason_of_a_global_address_is_none() -> None:
    assert forbidden_reason(ipaddress.ip_address("1.1.1.1")) is None


@pytest.fixture()
def fake_dns(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, list[str]]]:
    """Names ending in .test resolve to the addresses listed here, one answer per look-up."""
    answers: dict[str, list[str]] = {}
    lookups: list[str] = []
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(host, str) and host.endswith(".test"):
            lookups.append(host)
            address = answers[host].pop(0) if len(answers[host]) > 1 else answers[host][0]
            return real(address, port, *args, **kwargs)
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    answers["__lookups__"] = lookups  # type: ignore[assignment]
    yield answers


def test_name_resolving_to_a_forbidden_address_is_refused_without_a_call(
    fake_dns: dict[str, list[str]], dsp: MockDspServer
) -> None:
    fake_dns["evil.test"] = ["127.0.0.2"]  # loopback, but outside the allow-list
    session = make_pool(ONLY_127_0_0_1)
    with pytest.raises(ForbiddenDestination, match=r"127\.0\.0\.2 is a loopback address"):
        call(session, f"http://evil.test:{dsp.server_address[1]}/", {}, 1.0)
    assert dsp.log.snapshot() == []


@pytest.mark.parametrize("host", ["2130706433", "0x7f000001", "127.1", "0177.0.0.1", "[::ffff:127.0.0.1]",
                                  "localhost", "127.0.0.2"])
def test_real_calls_to_loopback_forms_are_refused(host: str, dsp: MockDspServer) -> None:
    session = make_pool(())  # nothing allowed
    port = dsp.server_address[1]
    with pytest.raises(ForbiddenDestination):
        call(session, f"http://{host}:{port}/", {}, 1.0)
    assert dsp.log.snapshot() == []


def test_checked_address_is_the_connected_one_and_host_header_is_kept(
    fake_dns: dict[str, list[str]], dsp: MockDspServer
) -> None:
    # DNS rebinding: the first answer is allowed, a second look-up would say 127.0.0.2.
    fake_dns["buyer.test"] = ["127.0.0.1", "127.0.0.2"]
    session = make_pool(ONLY_127_0_0_1)
    port = dsp.server_address[1]
    assert call(session, f"http://buyer.test:{port}/status/204", {}, 2.0) == 204
    assert fake_dns["__lookups__"] == ["buyer.test"]  # type: ignore[comparison-overlap]
    assert dsp.log.snapshot()[0]["headers"]["Host"] == f"buyer.test:{port}"


def test_tls_keeps_the_host_name_for_sni_and_verification(
    fake_dns: dict[str, list[str]], tmp_path: Path
) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=buyer.test",
         "-addext", "subjectAltName=DNS:buyer.test", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    seen: dict[str, list[str]] = {"sni": [], "host": []}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen["host"].append(self.headers["Host"])
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    def remember_sni(sock: Any, name: str | None, ctx: Any) -> None:
        seen["sni"].append(name or "")

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    context.sni_callback = remember_sni
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        fake_dns["buyer.test"] = ["127.0.0.1"]
        session = make_pool(ONLY_127_0_0_1)
        session.connection_pool_kw["ca_certs"] = str(cert)  # trust the test cert; verification stays on
        port = server.server_address[1]
        assert call(session, f"https://buyer.test:{port}/", {}, 5.0) == 204
        assert seen == {"sni": ["buyer.test"], "host": [f"buyer.test:{port}"]}
    finally:
        server.shutdown()
