"""The HTTPS scenario of ``make bench`` (``--scenario https``, in ``all``): buyers over TLS.

B buyers (``--buyers``, default 100), each its own TLS origin: one nginx with a ``server``
block per buyer, each listening on a loopback port of its own, with a certificate for
127.0.0.1 signed by a CA made in the run (``trustme``), handed to the fleet as
``CGRID_CA_FILE`` and to the blocking loop as its CA bundle. Keep-alive is nginx's own
(``keepalive_requests 1000``, ``keepalive_timeout 75s``). The events are spread over the
buyers by a Zipf law (exponent ``ZIPF_S``, seeded: the same calls every run).

For each of the two systems, over the same calls:

- the blocking urllib3 loop (bench/ceiling.py: 2 processes, one call at a time each, a
  connection pool per buyer, verifying TLS with the run's CA);
- cgrid-s2s as bench/run.py's ``run_cgrid`` runs it (events published first, then the
  workers, ``-P solo`` one per core, and the archiver);

it reports deliveries/s, CPU per delivery, and the TLS connections nginx accepted, per 1,000
calls: nginx's ``stub_status`` (a plain-HTTP location on a loopback port of its own) is
read before and after each run; ``accepts`` counts every connection nginx accepted, the
status reads' own included (one per read: the later read's is taken off). Its ``requests``
counter gives the calls nginx answered in the run (the same way, the later read taken off).
"""

from __future__ import annotations

import os
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
import trustme

from bench.buyers import start_https_nginx
from bench.common import Buyer, bench_event, fleet_env, publishes_like, wait_until
from cgrid.redis_server import RedisServer, free_port

ZIPF_S = 1.0  # P(buyer of rank k) is proportional to 1 / k ** ZIPF_S
SEED = 17
URLLIB3_PROCESSES = 2  # as the issue's urllib3 loop: 2 processes, one call at a time each
TIMEOUT_S = 2.0


@dataclass
class Status:
    """nginx's stub_status counters."""

    accepts: int
    handled: int
    requests: int


def read_status(port: int) -> Status:
    """One GET of the stub_status page over a connection of its own (it counts itself)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
    lines = data.split(b"\r\n\r\n", 1)[1].decode().splitlines()
    # "Active connections: N", "server accepts handled requests", " A H R", ...
    accepts, handled, requests = (int(x) for x in lines[2].split())
    return Status(accepts, handled, requests)


class TlsBuyers:
    """One nginx: a TLS origin per buyer, and its stub_status port."""

    def __init__(self, buyers: int, workdir: Path) -> None:
        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1")
        self.ca_file = workdir / "https-ca.pem"
        ca.cert_pem.write_to_path(str(self.ca_file))
        cert_file, key_file = workdir / "https-cert.pem", workdir / "https-key.pem"
        cert.cert_chain_pems[0].write_to_path(str(cert_file))
        cert.private_key_pem.write_to_path(str(key_file))
        # Ports picked free may be taken by the time nginx binds them (other benchmarks on
        # the machine): then nginx exits, and new ones are picked.
        error = ""
        for _ in range(3):
            self.ports = [free_port() for _ in range(buyers)]
            self.status_port = free_port()
            process, nginx_dir = start_https_nginx(self.ports, self.status_port, str(cert_file), str(key_file))
            self.buyer = Buyer("nginx https", self.status_port, process, nginx_dir)
            started = wait_until(lambda p=process: p.poll() is not None or self._listening(), 30, 0.1)
            if started and process.poll() is None:
                return
            log = Path(nginx_dir) / "error.log"
            error = log.read_text()[-1000:] if log.exists() else f"exit code {process.poll()}"
            self.stop()
        raise RuntimeError(f"nginx did not listen on its {buyers + 1} ports: {error}")

    def _listening(self) -> bool:
        for port in [self.status_port, *self.ports]:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) != 0:
                    return False
        return True

    def status(self) -> Status:
        return read_status(self.status_port)

    def stop(self) -> None:
        self.buyer.stop()


def zipf_buyers(n: int, buyers: int, seed: int = SEED) -> list[int]:
    """The buyer (0 = the busiest) of each of ``n`` events, Zipf-distributed, seeded."""
    weights = [1 / (rank + 1) ** ZIPF_S for rank in range(buyers)]
    return random.Random(seed).choices(range(buyers), weights=weights, k=n)


def https_events(n: int, ports: list[int], run: str) -> list[dict[str, Any]]:
    return [bench_event(run, i, f"dsp{b}", f"https://127.0.0.1:{ports[b]}")
            for i, b in enumerate(zipf_buyers(n, len(ports)))]


def connections(before: Status, after: Status, calls_planned: int) -> dict[str, Any]:
    """What nginx saw between two status reads (the later read's own connection and
    request taken off)."""
    accepted = after.accepts - before.accepts - 1
    requests = after.requests - before.requests - 1
    return {"accepted": accepted, "requests": requests,
            "per_1000_calls": round(accepted / max(requests, 1) * 1000, 2),
            "per_1000_events": round(accepted / calls_planned * 1000, 2)}


def run_https(n: int, buyers: int, workdir: Path, server: RedisServer, run_ceiling_loop: Callable[..., dict[str, Any]],
              run_cgrid: Callable[..., dict[str, Any]], archiver: bool = True,
              code: Path | None = None) -> dict[str, Any]:
    """``run_ceiling_loop`` and ``run_cgrid``: bench/run.py's (passed in: bench.run imports this
    module, so this one cannot import it). ``code``: the checkout the fleet runs from."""
    processes = os.cpu_count() or 2
    client = redis.Redis.from_url(server.url)
    tls = TlsBuyers(buyers, workdir)
    try:
        events = https_events(n, tls.ports, f"https{time.time():.0f}")
        share = zipf_buyers(n, buyers)
        top = sorted((share.count(b) for b in range(buyers)), reverse=True)
        print(f"[https] {buyers} TLS buyers (nginx), {n} calls, Zipf s={ZIPF_S}: the busiest buyer "
              f"{top[0] / n:.1%}, the 10 busiest {sum(top[:10]) / n:.1%}; urllib3 loop...", flush=True)
        before = tls.status()
        loop = run_ceiling_loop(events, URLLIB3_PROCESSES, "urllib3", 1, workdir, tls.buyer, ca_file=str(tls.ca_file))
        loop["connections"] = connections(before, tls.status(), n)
        print(f"[https] urllib3 loop {loop['rate']}/s, {loop['connections']['per_1000_calls']} new "
              f"connections per 1,000 calls; cgrid-s2s...", flush=True)
        env = fleet_env(server.url, {"CGRID_TIMEOUT_S": str(TIMEOUT_S), "CGRID_CA_FILE": str(tls.ca_file),
                                     **(publishes_like(code) if code else {})})
        before = tls.status()
        cgrid = run_cgrid(events, env, "solo", processes, workdir, client, tls.buyer, latency=False,
                          archiver=archiver, **({"code": code} if code else {}))
        cgrid["connections"] = connections(before, tls.status(), n)
        print(f"[https] cgrid-s2s {cgrid['rate']}/s, {cgrid['connections']['per_1000_calls']} new connections "
              f"per 1,000 calls", flush=True)
    finally:
        tls.stop()
    return {"buyers": buyers, "events": n, "zipf_s": ZIPF_S, "seed": SEED,
            "busiest_buyer_share": round(top[0] / n, 4), "urllib3_loop": loop, "cgrid": cgrid,
            "ratio_to_urllib3_loop": round(cgrid["rate"] / loop["rate"], 2)}


def print_https(r: dict[str, Any], archive_summary: Callable[[dict[str, Any]], str]) -> None:
    loop, g = r["urllib3_loop"], r["cgrid"]
    redis_s, archiver = g["redis_cpu_s_per_1000"], (g["archive"] or {}).get("cpu_s_per_1000")
    print(f"\nhttps: {r['events']} calls over {r['buyers']} TLS buyers (Zipf s={r['zipf_s']}, the busiest "
          f"{r['busiest_buyer_share']:.1%}), nginx keep-alive as shipped")
    print(f"  urllib3 loop ({loop['processes']} proc, one call at a time): {loop['rate']}/s, "
          f"{loop['cpu_s_per_1000']} CPU s/1k, {loop['connections']['accepted']} connections = "
          f"{loop['connections']['per_1000_calls']} per 1,000 calls ({loop['connections']['requests']} requests)")
    print(f"  cgrid-s2s (solo x {g['processes']} + archiver): {g['rate']}/s = {r['ratio_to_urllib3_loop']}x the "
          f"urllib3 loop; workers {g['cpu_s_per_1000']} CPU s/1k + Redis {redis_s} + archiver {archiver}; "
          f"{g['connections']['accepted']} connections = {g['connections']['per_1000_calls']} per 1,000 calls "
          f"({g['connections']['requests']} requests); states {g['states']}")
    print(f"  {archive_summary(g)}")
