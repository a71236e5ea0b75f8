"""Buyer servers for the benchmark: nginx when present (fast scenario), else an asyncio
server of our own; the asyncio one also plays the realistic buyer, and the dead one.

    python -m bench.buyers fast|realistic --port N [--hang-s S]
    python -m bench.buyers dead --port N --calls-file PATH

The dead buyer (``bench/isolation.py``) accepts every connection, reads the request and
never answers: it holds the connection until the caller gives up and closes it. It appends
the ``e`` query parameter of every request it reads to ``--calls-file``, one line a call,
so the bench can count the calls each event received.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import IO
from urllib.parse import parse_qs, urlsplit

NGINX_CONF = """
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 60s;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    server {{
        listen 127.0.0.1:{port} reuseport backlog=4096;
        location / {{ return 204; }}
    }}
}}
"""

# The HTTPS scenario (bench/https.py): one nginx, one TLS origin per buyer (a server block
# on a loopback port of its own, one certificate for 127.0.0.1), keep-alive as nginx ships
# it (keepalive_requests 1000, keepalive_timeout 75s: not set here). stub_status on a plain
# HTTP port of its own counts the connections nginx accepted.
HTTPS_NGINX_CONF = """
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 16384; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    server {{
        listen 127.0.0.1:{status_port};
        location = /status {{ stub_status; }}
    }}
{servers}
}}
"""

HTTPS_SERVER = """    server {{
        listen 127.0.0.1:{port} ssl backlog=4096;
        location / {{ return 204; }}
    }}
"""


def https_nginx_conf(workdir: str, ports: list[int], status_port: int, cert: str, key: str) -> str:
    """nginx's configuration for the HTTPS scenario: a TLS server on each of ``ports``."""
    servers = "".join(HTTPS_SERVER.format(port=port) for port in ports)
    return HTTPS_NGINX_CONF.format(dir=workdir, status_port=status_port, cert=cert, key=key, servers=servers)


def start_https_nginx(ports: list[int], status_port: int, cert: str, key: str) -> tuple[subprocess.Popen[bytes], str]:
    nginx = find_nginx()
    if nginx is None:
        raise RuntimeError("the HTTPS scenario needs nginx (Debian: apt-get install nginx-light)")
    workdir = tempfile.mkdtemp(prefix="bench-nginx-https-")
    conf = Path(workdir) / "nginx.conf"
    conf.write_text(https_nginx_conf(workdir, ports, status_port, cert, key))
    process = subprocess.Popen([nginx, "-c", str(conf), "-p", workdir], stderr=subprocess.DEVNULL)
    return process, workdir


RESPONSES = {
    204: b"HTTP/1.1 204 No Content\r\nServer: bench\r\n\r\n",
    500: b"HTTP/1.1 500 Internal Server Error\r\nServer: bench\r\nContent-Length: 0\r\n\r\n",
}


def find_nginx() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).exists()), None)


def start_nginx(port: int) -> tuple[subprocess.Popen[bytes], str]:
    nginx = find_nginx()
    assert nginx is not None
    workdir = tempfile.mkdtemp(prefix="bench-nginx-")
    conf = Path(workdir) / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=workdir, port=port))
    process = subprocess.Popen([nginx, "-c", str(conf), "-p", workdir], stderr=subprocess.DEVNULL)
    return process, workdir


class Behaviour:
    def __init__(self, mode: str, hang_s: float, seed: int = 1) -> None:
        self.mode = mode
        self.hang_s = hang_s
        self.rng = random.Random(seed)

    async def answer(self) -> bytes | None:
        if self.mode == "fast":
            return RESPONSES[204]
        roll = self.rng.random()
        if roll < 0.01:
            await asyncio.sleep(self.hang_s)  # hangs past the caller's deadline
            return RESPONSES[204]
        await asyncio.sleep(0.050)
        return RESPONSES[500] if roll < 0.03 else RESPONSES[204]


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, behaviour: Behaviour) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            if not head:
                break
            response = await behaviour.answer()
            if response is None:
                break
            writer.write(response)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
        pass
    finally:
        writer.close()


def event_id_of(head: bytes) -> str:
    """The ``e`` query parameter of a request's first line (``-`` if it has none)."""
    try:
        target = head.split(b"\r\n", 1)[0].split(b" ")[1].decode("ascii", "replace")
    except IndexError:
        return "-"
    return parse_qs(urlsplit(target).query).get("e", ["-"])[0]


async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, calls: IO[str]) -> None:
    """The dead buyer: record the call, answer nothing, keep the connection until the
    caller closes it."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        calls.write(event_id_of(head) + "\n")
        calls.flush()
        while await reader.read(4096):  # anything more (nothing is expected) is ignored
            pass
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
        pass
    finally:
        writer.close()


async def serve(mode: str, port: int, hang_s: float, calls_file: str | None = None) -> None:
    if mode == "dead":
        if not calls_file:
            raise SystemExit("the dead buyer needs --calls-file")
        calls = open(calls_file, "a")  # open for the server's lifetime
        server = await asyncio.start_server(lambda r, w: hold(r, w, calls), "127.0.0.1", port,
                                            backlog=4096, reuse_address=True)
    else:
        behaviour = Behaviour(mode, hang_s)
        server = await asyncio.start_server(lambda r, w: handle(r, w, behaviour), "127.0.0.1", port,
                                            backlog=4096, reuse_address=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["fast", "realistic", "dead"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--hang-s", type=float, default=5.0)
    parser.add_argument("--calls-file", help="dead: append the e= of every request read here")
    args = parser.parse_args()
    try:
        import uvloop  # type: ignore[import-not-found]

        uvloop.install()
    except ImportError:
        pass
    started = time.time()
    try:
        asyncio.run(serve(args.mode, args.port, args.hang_s, args.calls_file))
    except KeyboardInterrupt:
        print(f"buyer ran {time.time() - started:.0f}s")


if __name__ == "__main__":
    main()
