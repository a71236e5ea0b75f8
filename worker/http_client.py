"""The guarded HTTP call: one urllib3 pool manager per process, no redirects, no hidden
retries, a wall-clock deadline, and the request-forgery guard at connect time.

We call urllib3 directly rather than through ``requests`` (which sits on top of it): on
this project's 2-core benchmark machine ``requests`` costs about 441 µs of CPU per call
against 241 µs for urllib3, so ``requests`` alone would use 1.8 cores at the 4,000
deliveries/s target (README, "Performance").

The guard sits in the urllib3 connection: the host name is resolved once, every address is
checked, and the socket is connected to a checked address — so the address checked is the
address connected to. TLS still verifies and sends SNI for the original host name, and the
``Host`` header stays the original host name.

The deadline: a read timeout is per socket read, so a server that trickles its answer byte
by byte would defeat it. Each attempt registers its socket with a per-process reaper that
shuts the socket down when the attempt's wall-clock deadline passes.
"""

from __future__ import annotations

import heapq
import http.client
import itertools
import os
import socket
import ssl
import threading
import time
from collections.abc import Iterable
from typing import Any

import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import NameResolutionError
from urllib3.util.timeout import _DEFAULT_TIMEOUT

from cgrid.errors import CgridError, ForbiddenDestination
from cgrid.settings import IPNetwork
from worker.classify import ErrorClass
from worker.guard import resolve_checked

BODY_READ_MAX_BYTES = 4096


class AttemptError(CgridError):
    """The call made no HTTP answer; ``error_class`` says why."""

    def __init__(self, error_class: ErrorClass, detail: str = "") -> None:
        self.error_class = error_class
        super().__init__(f"{error_class.value}: {detail}" if detail else error_class.value)


class InvalidTarget(CgridError):
    """The client cannot form a request from the URL (e.g. a malformed host)."""


# -- the wall-clock deadline -------------------------------------------------------------


class _Deadline:
    """One attempt's deadline and the socket(s) it uses."""

    __slots__ = ("at", "done", "fired", "lock", "socks")

    def __init__(self, at: float) -> None:
        self.at = at
        self.fired = False
        self.done = False
        self.socks: list[socket.socket] = []
        self.lock = threading.Lock()

    def attach(self, sock: socket.socket) -> None:
        with self.lock:
            self.socks.append(sock)
            if self.fired:
                _shutdown(sock)

    def expire(self) -> None:
        with self.lock:
            if self.done:
                return
            self.fired = True
            for sock in self.socks:
                _shutdown(sock)


def _shutdown(sock: socket.socket) -> None:
    try:
        # The plain-socket method, also for an SSLSocket: it must not touch TLS state
        # that the thread blocked in recv is using.
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass


class _Reaper:
    """A per-process thread that expires deadlines in time order."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, _Deadline]] = []
        self._cond = threading.Condition()
        self._seq = itertools.count()
        threading.Thread(target=self._run, name="cgrid-deadline-reaper", daemon=True).start()

    def watch(self, deadline: _Deadline) -> None:
        with self._cond:
            heapq.heappush(self._heap, (deadline.at, next(self._seq), deadline))
            if self._heap[0][2] is deadline:
                self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap:
                    self._cond.wait()
                at, _, deadline = self._heap[0]
                wait_s = at - time.monotonic()
                if wait_s > 0 and not deadline.done:
                    self._cond.wait(wait_s)
                    continue
                heapq.heappop(self._heap)
            deadline.expire()


_reaper: _Reaper | None = None
_reaper_pid = 0
_reaper_lock = threading.Lock()
_current = threading.local()


def _get_reaper() -> _Reaper:
    global _reaper, _reaper_pid
    if _reaper is None or _reaper_pid != os.getpid():  # threads do not survive fork
        with _reaper_lock:
            if _reaper is None or _reaper_pid != os.getpid():
                _reaper, _reaper_pid = _Reaper(), os.getpid()
    return _reaper


def _attach_current(sock: socket.socket | None) -> None:
    deadline: _Deadline | None = getattr(_current, "deadline", None)
    if deadline is not None and sock is not None:
        deadline.attach(sock)


# -- guarded connections -------------------------------------------------------------------


class _GuardMixin:
    """Resolve once, check every address, connect only to a checked one."""

    allowed_networks: tuple[IPNetwork, ...] = ()
    host: str
    port: int
    timeout: Any
    source_address: Any
    socket_options: Any
    _dns_host: str

    def _new_conn(self) -> socket.socket:
        try:
            addresses = resolve_checked(self._dns_host, self.port, self.allowed_networks)
        except socket.gaierror as e:
            raise NameResolutionError(self.host, self, e) from e  # type: ignore[arg-type]
        last_error: OSError | None = None
        for family, sockaddr in addresses:
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                for option in self.socket_options or ():
                    sock.setsockopt(*option)
                if self.timeout is not _DEFAULT_TIMEOUT:
                    sock.settimeout(self.timeout)
                _attach_current(sock)
                sock.connect(sockaddr)
                return sock
            except OSError as e:
                sock.close()
                last_error = e
        assert last_error is not None
        if isinstance(last_error, TimeoutError):
            raise urllib3.exceptions.ConnectTimeoutError(
                self, f"connection to {self.host} timed out"
            ) from last_error
        raise urllib3.exceptions.NewConnectionError(
            self, f"failed to establish a new connection: {last_error}"  # type: ignore[arg-type]
        ) from last_error

    def request(self, *args: Any, **kwargs: Any) -> Any:
        _attach_current(getattr(self, "sock", None))
        return super().request(*args, **kwargs)  # type: ignore[misc]


class GuardedHTTPConnection(_GuardMixin, HTTPConnection):
    pass


class GuardedHTTPSConnection(_GuardMixin, HTTPSConnection):
    pass


def make_pool(allowed_networks: Iterable[IPNetwork], maxsize: int = 100) -> urllib3.PoolManager:
    """A pool manager whose connections are guarded; keep-alive pools per host."""
    allowed = tuple(allowed_networks)
    manager = urllib3.PoolManager(num_pools=256, maxsize=maxsize, block=False, retries=False)
    manager.pool_classes_by_scheme = {  # type: ignore[assignment]
        "http": type("GuardedHTTPPool", (HTTPConnectionPool,), {
            "ConnectionCls": type("Conn", (GuardedHTTPConnection,), {"allowed_networks": allowed})}),
        "https": type("GuardedHTTPSPool", (HTTPSConnectionPool,), {
            "ConnectionCls": type("Conn", (GuardedHTTPSConnection,), {"allowed_networks": allowed})}),
    }
    return manager


# -- the call ------------------------------------------------------------------------------


def _error_class(error: BaseException) -> ErrorClass:
    """The most specific cause in the exception chain."""
    seen: set[int] = set()
    stack: list[BaseException] = [error]
    found: list[BaseException] = []
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        found.append(current)
        stack += [c for c in (current.__cause__, current.__context__) if c is not None]
        stack += [a for a in getattr(current, "args", ()) if isinstance(a, BaseException)]
        reason = getattr(current, "reason", None)
        if isinstance(reason, BaseException):
            stack.append(reason)
    checks: list[tuple[type[BaseException] | tuple[type[BaseException], ...], ErrorClass]] = [
        ((socket.gaierror, NameResolutionError), ErrorClass.DNS),
        (ConnectionRefusedError, ErrorClass.CONNECT_REFUSED),
        (urllib3.exceptions.ConnectTimeoutError, ErrorClass.CONNECT_TIMEOUT),
        ((ConnectionResetError, BrokenPipeError), ErrorClass.CONNECTION_RESET),
        ((ssl.SSLError, urllib3.exceptions.SSLError), ErrorClass.TLS),
        ((TimeoutError, urllib3.exceptions.TimeoutError), ErrorClass.TIMEOUT),
        ((http.client.HTTPException, urllib3.exceptions.ProtocolError), ErrorClass.PROTOCOL),
    ]
    for types, error_class in checks:
        if any(isinstance(e, types) for e in found):
            return error_class
    return ErrorClass.TRANSPORT


def _read_some(response: urllib3.BaseHTTPResponse) -> None:
    """Read at most a few KiB of the body. A small body is read whole so that the
    connection goes back to the pool; otherwise the connection is closed."""
    length = response.headers.get("Content-Length", "")
    if response.status in (204, 304) or (length.isdigit() and int(length) <= BODY_READ_MAX_BYTES):
        response.read()
        response.release_conn()
    else:
        try:
            response.read(BODY_READ_MAX_BYTES)
        finally:
            response.close()
            response.release_conn()


def call(pool: urllib3.PoolManager, url: str, headers: dict[str, str], timeout_s: float) -> int:
    """One GET within ``timeout_s`` of wall-clock time; returns the status code.

    Raises AttemptError (no answer), ForbiddenDestination (guard) or InvalidTarget."""
    deadline = _Deadline(time.monotonic() + timeout_s)
    _current.deadline = deadline
    _get_reaper().watch(deadline)
    try:
        try:
            response = pool.urlopen(
                "GET", url, headers=headers, redirect=False, retries=False, preload_content=False,
                timeout=urllib3.Timeout(connect=timeout_s, read=timeout_s),
            )
        except ForbiddenDestination:
            raise
        except (urllib3.exceptions.LocationParseError, urllib3.exceptions.LocationValueError,
                urllib3.exceptions.URLSchemeUnknown, UnicodeError, ValueError) as e:
            raise InvalidTarget(f"url: {e}") from e
        except Exception as e:
            if deadline.fired:
                raise AttemptError(ErrorClass.TIMEOUT, f"no answer within {timeout_s:g}s") from e
            raise AttemptError(_error_class(e), str(e)[:200]) from e
        try:
            _read_some(response)
        except Exception:
            # The status line and headers arrived: the buyer answered. A body that breaks
            # off or trickles past the deadline does not change the answer.
            response.close()
        return response.status
    finally:
        with deadline.lock:
            deadline.done = True
        _current.deadline = None
