"""A local buyer endpoint for demos and tests: ``cgrid-s2s mock-dsp``.

The path chooses the answer, so one server plays every kind of buyer:

| path                         | answer                                                  |
|------------------------------|---------------------------------------------------------|
| ``/status/<code>``           | that status (``302`` comes with a ``Location``)         |
| ``/sleep/<ms>[/<code>]``     | waits, then answers (``204`` by default)                |
| ``/trickle/<ms>``            | sends its answer one byte every ``<ms>`` milliseconds   |
| ``/reset``                   | resets the connection without answering                |
| ``/big/<bytes>``             | ``200`` with a body of that many bytes                  |
| ``/sequence/<c1>,<c2>,...``  | the n-th call of this exact URL gets the n-th code      |
| anything else                | ``204``                                                 |
| ``GET /_calls``              | every recorded call as JSON (``POST /_reset`` clears)   |

Every call (except ``/_`` paths) is recorded with its time, URL, headers and the caller's
port (one port, one connection: keep-alive shows as calls sharing it).
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class CallLog:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.calls: list[dict[str, Any]] = []
        self._seen: dict[str, int] = {}

    def record(self, target: str, headers: dict[str, str], client_port: int = 0) -> int:
        """Record a call; returns how many times this exact target was called before."""
        with self._lock:
            self.calls.append({"t": time.time(), "target": target, "headers": headers, "client_port": client_port})
            count = self._seen.get(target, 0)
            self._seen[target] = count + 1
            return count

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.calls)

    def clear(self) -> None:
        with self._lock:
            self.calls.clear()
            self._seen.clear()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: MockDspServer

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.verbose:
            super().log_message(format, *args)

    def _answer(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if status not in (204, 304) and status >= 200:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body and status not in (204, 304):
            self.wfile.write(body)

    def do_POST(self) -> None:
        if self.path == "/_reset":
            self.server.log.clear()
            self._answer(200, b"{}")
        else:
            self.do_GET()

    def do_GET(self) -> None:
        if self.path.startswith("/_calls"):
            body = json.dumps(self.server.log.snapshot()).encode()
            self._answer(200, body, {"Content-Type": "application/json"})
            return
        previous = self.server.log.record(self.path, dict(self.headers.items()), self.client_address[1])
        parts = self.path.split("?", 1)[0].strip("/").split("/")
        try:
            self._behave(parts, previous)
        except (ValueError, IndexError):
            self._answer(400, b"bad mock-dsp path\n")

    def _behave(self, parts: list[str], previous: int) -> None:
        head = parts[0]
        if head == "status":
            code = int(parts[1])
            headers = {"Location": "/redirected"} if 300 <= code < 400 else {}
            self._answer(code, b"ok\n", headers)
        elif head == "sleep":
            time.sleep(int(parts[1]) / 1000)
            self._answer(int(parts[2]) if len(parts) > 2 else 204)
        elif head == "trickle":
            pause_s = int(parts[1]) / 1000
            for byte in b"HTTP/1.1 204 No Content\r\nX-Trickle: 1\r\n\r\n":
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(pause_s)
            self.close_connection = True
        elif head == "reset":
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            self.connection.close()
        elif head == "big":
            self._answer(200, b"x" * min(int(parts[1]), 50_000_000))
        elif head == "sequence":
            codes = [int(c) for c in parts[1].split(",")]
            self._answer(codes[min(previous, len(codes) - 1)])
        else:
            self._answer(HTTPStatus.NO_CONTENT)

    def finish(self) -> None:
        with contextlib.suppress(OSError):
            super().finish()


class MockDspServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, verbose: bool = False) -> None:
        super().__init__((host, port), _Handler)
        self.log = CallLog()
        self.verbose = verbose

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a reset or a client that went away is part of the game

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}"

    def start_in_thread(self) -> MockDspServer:
        threading.Thread(target=self.serve_forever, name="mock-dsp", daemon=True).start()
        return self
