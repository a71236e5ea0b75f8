"""The guarded HTTP call on libcurl (``pycurl``): how one transfer is set up and what its
end means. The engine (``delivery/engine.py``) drives many transfers at once with one
``CurlMulti`` per process; :func:`call` makes a single blocking one (tests, tools).

libcurl gives natively what a safe s2s call needs (SPEC §4, §8):

- a wall-clock deadline for the whole transfer (``TIMEOUT_MS``), so a server trickling its
  answer byte by byte cannot hold a call past it;
- the request-forgery guard on the address actually connected to: ``OPENSOCKETFUNCTION``
  sees every resolved address just before libcurl connects to it, however the host was
  written (``2130706434``, ``0x7f000002``, ``127.1``, IPv4-mapped IPv6) or resolved;
- no redirects followed, no proxy or ``.netrc`` from the environment, only
  ``http``/``https``, the path sent exactly as given;
- no hidden retries: libcurl silently sends a request again on a new connection when a
  reused keep-alive connection died before any answer (measured: a buyer that resets
  every connection got 7 calls for one attempt). ``PREREQFUNCTION`` runs before every
  request a transfer sends, and refuses a second one, so an attempt is one request;
- keep-alive connections per host, kept by the multi handle; TLS verified against a CA
  bundle, with SNI for the URL's host name.

Headers: libcurl adds ``Accept: */*`` by default; it is removed, so what goes out is
``Host`` plus the headers of SPEC §3.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import certifi
import pycurl

from cgrid.errors import CgridError, ForbiddenDestination
from cgrid.settings import IPNetwork
from delivery.classify import ErrorClass
from delivery.guard import forbidden_reason

BODY_READ_MAX_BYTES = 4096
CURLOPT_DISALLOW_USERNAME_IN_URL = 278  # libcurl 7.61; pycurl has no name for it
PREREQ_OK: int = pycurl.PREREQFUNC_OK
PREREQ_ABORT: int = pycurl.PREREQFUNC_ABORT

# libcurl error codes (``CURLcode``) by what they mean for an attempt. Numbers are used
# where pycurl has no constant for a newer code.
_TLS_ERRORS = frozenset({35, 53, 54, 58, 59, 60, 64, 66, 77, 80, 82, 83, 90, 91, 98})
_RESET_ERRORS = frozenset({pycurl.E_SEND_ERROR, pycurl.E_RECV_ERROR, pycurl.E_GOT_NOTHING})
# 1 is also what an HTTP/0.9 answer (no status line) gives, once a request went out.
_PROTOCOL_ERRORS = frozenset({pycurl.E_UNSUPPORTED_PROTOCOL, 8, pycurl.E_HTTP2, 92, pycurl.E_PARTIAL_FILE,
                              pycurl.E_BAD_CONTENT_ENCODING, 95, 100})
_BAD_URL_ERRORS = frozenset({pycurl.E_UNSUPPORTED_PROTOCOL, pycurl.E_URL_MALFORMAT, pycurl.E_LOGIN_DENIED})
# Errors after which an answer whose headers had all arrived still counts as the answer:
# the body broke off, trickled past the deadline, or was cut by us after a few KiB.
_BODY_ERRORS = frozenset({pycurl.E_WRITE_ERROR, pycurl.E_PARTIAL_FILE, pycurl.E_OPERATION_TIMEDOUT,
                          pycurl.E_RECV_ERROR, pycurl.E_SEND_ERROR, pycurl.E_GOT_NOTHING})


class AttemptError(CgridError):
    """The call made no HTTP answer; ``error_class`` says why."""

    def __init__(self, error_class: ErrorClass, detail: str = "") -> None:
        self.error_class = error_class
        super().__init__(f"{error_class.value}: {detail}" if detail else error_class.value)


class InvalidTarget(CgridError):
    """libcurl cannot form a request from the URL."""


# Not frozen: one is made per call, and a frozen dataclass's __init__ costs three times as much
# (object.__setattr__ per field). Nothing changes one once made.
@dataclass(slots=True)
class CallResult:
    """What one transfer came to: an HTTP status, an error class, or a refusal to call."""

    status: int | None = None
    error: ErrorClass | None = None
    refused: str = ""  # the request-forgery guard refused every address
    invalid: str = ""  # the URL cannot be called
    detail: str = ""


@dataclass(frozen=True)
class ClientConfig:
    """What every transfer of a process shares."""

    allowed_networks: tuple[IPNetwork, ...] = ()
    ca_file: str = ""  # default: certifi's bundle
    resolve: tuple[str, ...] = ()  # libcurl RESOLVE entries "host:port:addr" (tests)


def header_lines(headers: dict[str, str]) -> list[str]:
    """The request headers as libcurl takes them, with its default ``Accept`` removed."""
    return ["Accept:", *[f"{name}: {value}" for name, value in headers.items()]]


class Transfer:
    """One reusable libcurl easy handle and the state of its current request."""

    __slots__ = ("allowed", "body_bytes", "connects", "curl", "header_lines", "headers", "item", "refusals",
                 "requests", "timeout_ms")

    def __init__(self, config: ClientConfig) -> None:
        self.allowed = config.allowed_networks
        self.item: Any = None  # what the engine is delivering with this transfer
        # The answer's header lines as libcurl hands them over, read once the transfer ends
        # (read_header_lines): libcurl calls the list's own append, a C method, where a
        # Python function per line cost a frame each (five lines for a plain answer).
        self.header_lines: list[bytes] = []
        self.body_bytes = 0
        self.connects = 0
        self.requests = 0
        self.refusals: list[str] = []
        self.headers: list[str] | None = None  # as last set on the handle (set again only when they change)
        self.timeout_ms = 0  # likewise
        curl = self.curl = pycurl.Curl()
        curl.transfer = self  # the multi hands back Curl objects; this finds their Transfer
        for option, value in (
            (pycurl.NOSIGNAL, 1),
            (pycurl.PROXY, ""),
            (pycurl.NOPROXY, "*"),
            (pycurl.NETRC, pycurl.NETRC_IGNORED),
            (pycurl.FOLLOWLOCATION, 0),
            (pycurl.PROTOCOLS, pycurl.PROTO_HTTP | pycurl.PROTO_HTTPS),
            (pycurl.REDIR_PROTOCOLS, pycurl.PROTO_HTTP | pycurl.PROTO_HTTPS),
            (pycurl.HTTP_VERSION, pycurl.CURL_HTTP_VERSION_1_1),
            (pycurl.PATH_AS_IS, 1),
            (CURLOPT_DISALLOW_USERNAME_IN_URL, 1),
            (pycurl.CAINFO, config.ca_file or certifi.where()),
            (pycurl.SSL_VERIFYPEER, 1),
            (pycurl.SSL_VERIFYHOST, 2),
            (pycurl.OPENSOCKETFUNCTION, self._open_socket),
            (pycurl.PREREQFUNCTION, self._before_request),
            (pycurl.HEADERFUNCTION, self.header_lines.append),
            (pycurl.WRITEFUNCTION, self._on_body),
        ):
            curl.setopt(option, value)
        if config.resolve:
            curl.setopt(pycurl.RESOLVE, list(config.resolve))

    def prepare(self, url: str, headers: list[str], timeout_s: float) -> None:
        """Set up the next request (the handle keeps its connections between requests)."""
        self.header_lines.clear()  # (the same list: libcurl holds its append)
        self.body_bytes = 0
        self.connects = 0
        self.requests = 0
        self.refusals = []
        curl = self.curl
        curl.setopt(pycurl.URL, url)
        # The handle keeps its options from one request to the next: what did not change
        # is not set again (libcurl copies a header list into a new slist on every set).
        if headers != self.headers:
            curl.setopt(pycurl.HTTPHEADER, headers)
            self.headers = headers
        timeout_ms = max(1, int(timeout_s * 1000))
        if timeout_ms != self.timeout_ms:
            curl.setopt(pycurl.TIMEOUT_MS, timeout_ms)
            curl.setopt(pycurl.CONNECTTIMEOUT_MS, timeout_ms)
            self.timeout_ms = timeout_ms

    # -- libcurl callbacks (they must never raise) -------------------------------------

    def refusal(self, address: str) -> str | None:
        """Why the guard refuses to connect to ``address`` (as libcurl resolved it), or None."""
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return f"{address!r} is not an IP address"
        reason = forbidden_reason(ip, self.allowed)
        return None if reason is None else f"{ip} is a {reason}"

    def _open_socket(self, purpose: int, address: Any) -> Any:
        """The guard: libcurl is about to connect to ``address``; refuse a forbidden one."""
        try:
            refusal = self.refusal(address.addr[0])
            if refusal is not None:
                self.refusals.append(refusal)
                return pycurl.SOCKET_BAD
            self.connects += 1
            return socket.socket(address.family, address.socktype, address.protocol)
        except Exception as e:  # never let a surprise connect
            self.refusals.append(f"address not checkable ({e.__class__.__name__})")
            return pycurl.SOCKET_BAD

    def _before_request(self, primary_ip: str, local_ip: str, primary_port: int, local_port: int) -> int:
        """Called before each request the transfer sends: the first goes, a second one
        would be libcurl's own retry after a reused connection died, and is refused."""
        self.requests += 1
        return PREREQ_OK if self.requests == 1 else PREREQ_ABORT

    def _on_body(self, data: bytes) -> int | None:
        self.body_bytes += len(data)
        return 0 if self.body_bytes > BODY_READ_MAX_BYTES else None  # 0 stops the transfer

    # -- the end of a transfer -----------------------------------------------------------

    def result(self, errno: int, message: str = "") -> CallResult:
        """Classify the finished transfer (``errno`` 0 is success)."""
        status = int(self.curl.getinfo(pycurl.RESPONSE_CODE))
        headers_done, malformed = read_header_lines(self.header_lines)
        if malformed:
            return CallResult(error=ErrorClass.PROTOCOL, detail=f"malformed status line: {malformed!r}")
        if errno == 0:
            if status < 200:  # nothing but interim answers (e.g. 101 without an upgrade)
                return CallResult(error=ErrorClass.PROTOCOL, detail=f"no final answer after {status}")
            return CallResult(status=status)
        if status >= 200 and headers_done and errno in _BODY_ERRORS:
            return CallResult(status=status)  # the answer arrived; its body did not matter
        if self.refusals and not self.connects:
            return CallResult(refused="; ".join(dict.fromkeys(self.refusals)))
        if errno in _BAD_URL_ERRORS and not self.requests:  # refused before any request went out
            return CallResult(invalid=f"url: {message}")
        if errno == pycurl.E_ABORTED_BY_CALLBACK and self.requests > 1:
            # The request went out on a reused connection that died without an answer.
            return CallResult(error=ErrorClass.CONNECTION_RESET, detail="connection closed without an answer")
        # A request went out (so a connection was up, new or reused) when PREREQ ran.
        return CallResult(error=error_class(errno, connected=self.requests > 0), detail=message[:200])


def read_header_lines(lines: list[bytes]) -> tuple[bool, str]:
    """Whether a final answer's (200 and up) status line and headers all arrived, and the
    first malformed status line ('' if none). Each header block opens with a status line; a
    1xx block (100 Continue, 103 Early Hints) is interim, and what follows the final block
    is trailers. libcurl reads ``HTTP/1.1 1000`` as 100 and ``2000`` as 200: a code that is
    not three digits is malformed here (a protocol error)."""
    malformed = ""
    opening = True  # the next line opens a block: a status line
    status = 0
    for line in lines:
        if opening:
            parts = line.split(None, 2)
            code = parts[1] if len(parts) > 1 else b""
            if len(code) == 3 and code.isdigit():
                status = int(code)
            else:
                status = 0
                malformed = malformed or line[:80].decode("latin-1").strip()
            opening = False
        elif line == b"\r\n" or line == b"\n":
            if status >= 200:
                return True, malformed
            opening = True
    return False, malformed


def error_class(errno: int, *, connected: bool) -> ErrorClass:
    """A libcurl error code as the attempt's error class."""
    if errno == pycurl.E_OPERATION_TIMEDOUT:
        return ErrorClass.TIMEOUT if connected else ErrorClass.CONNECT_TIMEOUT
    if errno == pycurl.E_COULDNT_CONNECT:
        return ErrorClass.CONNECT_REFUSED
    if errno == pycurl.E_COULDNT_RESOLVE_HOST:
        return ErrorClass.DNS
    if errno in _RESET_ERRORS:
        return ErrorClass.CONNECTION_RESET
    if errno in _TLS_ERRORS:
        return ErrorClass.TLS
    if errno in _PROTOCOL_ERRORS:
        return ErrorClass.PROTOCOL
    return ErrorClass.TRANSPORT


def make_client(allowed_networks: Iterable[IPNetwork] = (), *, ca_file: str = "",
                resolve: Iterable[str] = ()) -> ClientConfig:
    return ClientConfig(tuple(allowed_networks), ca_file, tuple(resolve))


def call_result(client: ClientConfig, url: str, headers: dict[str, str], timeout_s: float) -> CallResult:
    """One blocking GET within ``timeout_s`` of wall-clock time, classified as the engine
    classifies its transfers."""
    transfer = Transfer(client)
    transfer.prepare(url, header_lines(headers), timeout_s)
    errno, message = 0, ""
    try:
        transfer.curl.perform()
    except pycurl.error as e:
        errno, message = int(e.args[0]), str(e.args[1])
    finally:
        result = transfer.result(errno, message)
        transfer.curl.close()
    return result


def call(client: ClientConfig, url: str, headers: dict[str, str], timeout_s: float) -> int:
    """:func:`call_result` as a status code; raises AttemptError (no answer),
    ForbiddenDestination (guard) or InvalidTarget."""
    return raise_or_status(call_result(client, url, headers, timeout_s))


def raise_or_status(result: CallResult) -> int:
    if result.refused:
        raise ForbiddenDestination(result.refused)
    if result.invalid:
        raise InvalidTarget(result.invalid)
    if result.error is not None:
        raise AttemptError(result.error, result.detail)
    assert result.status is not None
    return result.status
