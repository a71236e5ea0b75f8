"""Buyer servers for the benchmark: nginx when present (fast scenario), else an asyncio
server of our own; the asyncio one also plays the realistic buyer.

    python -m bench.buyers fast|realistic --port N [--hang-s S]
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


async def serve(mode: str, port: int, hang_s: float) -> None:
    behaviour = Behaviour(mode, hang_s)
    server = await asyncio.start_server(lambda r, w: handle(r, w, behaviour), "127.0.0.1", port,
                                        backlog=4096, reuse_address=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["fast", "realistic"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--hang-s", type=float, default=5.0)
    args = parser.parse_args()
    try:
        import uvloop  # type: ignore[import-not-found]

        uvloop.install()
    except ImportError:
        pass
    started = time.time()
    try:
        asyncio.run(serve(args.mode, args.port, args.hang_s))
    except KeyboardInterrupt:
        print(f"buyer ran {time.time() - started:.0f}s")


if __name__ == "__main__":
    main()
