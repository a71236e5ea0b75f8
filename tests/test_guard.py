"""Request-forgery guard (SPEC §8). Non-loopback addresses are only ever *checked* here:
libcurl parses the URL and resolves the host, and the socket opener records what the
guard says and then refuses every address, so nothing is connected to. Every test that
makes a real call targets loopback, with the allow-list narrowed to 127.0.0.1/32."""

from __future__ import annotations

import ipaddress
import ssl
import threading
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pycurl
import pytest
import trustme

from cgrid.errors import ForbiddenDestination
from cgrid.settings import IPNetwork, parse_networks
from delivery.classify import ErrorClass
from delivery.guard import forbidden_reason
from delivery.http_client import AttemptError, Transfer, call, make_client
from ops.mock_dsp import MockDspServer

ONLY_127_0_0_1 = parse_networks("127.0.0.1/32")


def guard_verdicts(url: str, allowed: Iterable[IPNetwork] = ()) -> list[tuple[str, str | None]]:
    """(address, refusal) for every address libcurl would connect to for ``url``; connects
    to none of them."""
    transfer = Transfer(make_client(allowed))
    seen: list[tuple[str, str | None]] = []

    def never_connect(purpose: int, address: Any) -> Any:
        seen.append((address.addr[0], transfer.refusal(address.addr[0])))
        return pycurl.SOCKET_BAD

    transfer.curl.setopt(pycurl.OPENSOCKETFUNCTION, never_connect)
    transfer.prepare(url, [], 1.0)
    with pytest.raises(pycurl.error):
        transfer.curl.perform()
    transfer.curl.close()
    return seen


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
    literal = f"[{host}]" if ":" in host else host
    verdicts = guard_verdicts(f"http://{literal}:80/")
    assert verdicts, "libcurl offered no address"
    for _address, refusal in verdicts:
        assert refusal is not None and reason in refusal


@pytest.mark.parametrize("host", ["93.184.215.14", "8.8.8.8", "[2606:4700:4700::1111]"])
def test_public_addresses_pass(host: str) -> None:
    assert [refusal for _, refusal in guard_verdicts(f"https://{host}/")] == [None]  # checked, not connected


def test_allow_list_lifts_the_ban_for_named_networks_only() -> None:
    allowed = parse_networks("10.0.0.0/8, 127.0.0.1/32")
    for host in ("10.9.8.7", "127.0.0.1", "[::ffff:127.0.0.1]"):  # the mapped form of an allowed address too
        assert [refusal for _, refusal in guard_verdicts(f"http://{host}/", allowed)] == [None], host
    for host in ("127.0.0.2", "192.168.0.1", "169.254.169.254"):
        [(_, refusal)] = guard_verdicts(f"http://{host}/", allowed)
        assert refusal is not None, host


def test_forbidden_reason_of_a_global_address_is_none() -> None:
    assert forbidden_reason(ipaddress.ip_address("1.1.1.1")) is None


def test_name_resolving_to_a_forbidden_address_is_refused_without_a_call(dsp: MockDspServer) -> None:
    port = dsp.server_address[1]
    # libcurl's own resolver answers "evil.test" with 127.0.0.2: loopback, outside the allow-list.
    client = make_client(ONLY_127_0_0_1, resolve=[f"evil.test:{port}:127.0.0.2"])
    with pytest.raises(ForbiddenDestination, match=r"127\.0\.0\.2 is a loopback address"):
        call(client, f"http://evil.test:{port}/", {}, 1.0)
    assert dsp.log.snapshot() == []


@pytest.mark.parametrize("host", ["2130706433", "0x7f000001", "127.1", "0177.0.0.1", "[::ffff:127.0.0.1]",
                                  "localhost", "127.0.0.2", "[::1]"])
def test_real_calls_to_loopback_forms_are_refused(host: str, dsp: MockDspServer) -> None:
    client = make_client(())  # nothing allowed
    port = dsp.server_address[1]
    with pytest.raises(ForbiddenDestination):
        call(client, f"http://{host}:{port}/", {}, 1.0)
    assert dsp.log.snapshot() == []


def test_the_address_checked_is_the_one_connected_and_host_header_is_kept(dsp: MockDspServer) -> None:
    # The name has a forbidden and an allowed address: libcurl tries both, the guard sees
    # each one just before its connect, and only the allowed one is connected.
    port = dsp.server_address[1]
    client = make_client(ONLY_127_0_0_1, resolve=[f"buyer.test:{port}:127.0.0.2,127.0.0.1"])
    assert call(client, f"http://buyer.test:{port}/status/204", {}, 2.0) == 204
    [received] = dsp.log.snapshot()
    assert received["headers"]["Host"] == f"buyer.test:{port}"


def test_tls_is_verified_and_keeps_the_host_name_for_sni(tmp_path: Path) -> None:
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
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
    ca.issue_cert("buyer.test").configure_cert(context)
    context.sni_callback = remember_sni
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        resolve = [f"buyer.test:{port}:127.0.0.1", f"other.test:{port}:127.0.0.1"]
        client = make_client(ONLY_127_0_0_1, ca_file=str(ca_file), resolve=resolve)
        assert call(client, f"https://buyer.test:{port}/", {}, 5.0) == 204
        assert seen == {"sni": ["buyer.test"], "host": [f"buyer.test:{port}"]}
        # A certificate for another name, or one from a CA we do not trust, is a TLS failure.
        with pytest.raises(AttemptError) as wrong_name:
            call(client, f"https://other.test:{port}/", {}, 5.0)
        assert wrong_name.value.error_class is ErrorClass.TLS
        with pytest.raises(AttemptError) as untrusted:
            call(make_client(ONLY_127_0_0_1, resolve=resolve), f"https://buyer.test:{port}/", {}, 5.0)
        assert untrusted.value.error_class is ErrorClass.TLS
        assert seen["host"] == [f"buyer.test:{port}"]  # neither reached the handler
    finally:
        server.shutdown()
