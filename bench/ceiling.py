"""Bare loops: the s2s calls of a list of events, no queue, no ledger. One process of the
benchmark's loops; ``bench.run`` starts one per core.

    python -m bench.ceiling --mode urllib3|pycurl|bare --concurrency N --events FILE [--ca-file PEM]

``urllib3`` is a blocking loop over urllib3 (the previous engine's client), N OS threads
(N=1 is a plain loop). ``pycurl`` is the worker's own call (``delivery.http_client.Transfer``:
guard, headers, deadline) on a bare libcurl multi loop with N transfers in flight. ``bare``
is a bare libcurl call: plain ``pycurl.Curl`` handles given the URL, the headers and a
deadline, N in flight, driven by libcurl's ``perform``/``select``, URLs and headers made
before the clock starts: what one call costs at the least, the unit of issue 17's ratio. Prints
one JSON line: calls answered, loop seconds and CPU seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import selectors
import threading
import time
from collections import deque
from pathlib import Path

import pycurl
import urllib3

from cgrid.event import Event
from cgrid.settings import parse_networks
from delivery.headers import build_headers
from delivery.http_client import Transfer, header_lines, make_client

# Pools the urllib3 loop keeps (one per origin): enough for every buyer of the HTTPS
# scenario, so it keeps a connection per buyer (urllib3's default is 10 pools).
URLLIB3_POOLS = 1024


def urllib3_loop(events: list[Event], concurrency: int, timeout_s: float, ca_file: str = "") -> int:
    pool = urllib3.PoolManager(num_pools=URLLIB3_POOLS, maxsize=max(concurrency, 1), retries=False,
                               ca_certs=ca_file or None)
    answered = 0
    lock = threading.Lock()

    def loop(share: list[Event]) -> None:
        nonlocal answered
        for event in share:
            try:
                response = pool.request("GET", event.target_url(), headers=build_headers(event),
                                        redirect=False, retries=False, timeout=timeout_s)
            except urllib3.exceptions.HTTPError:
                continue
            if response.status:
                with lock:
                    answered += 1

    workers = [threading.Thread(target=loop, args=(events[i::concurrency],)) for i in range(concurrency)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return answered


def bare_loop(calls: list[tuple[str, list[str]]], concurrency: int, timeout_s: float) -> int:
    """A bare libcurl call: plain handles given the URL, the headers and a deadline, the
    answer's body discarded, ``concurrency`` in flight, driven by libcurl's own
    ``perform``/``select`` (no Python callback per socket or timer): the least one call costs
    libcurl and the interpreter, the unit of issue 17's ratio."""
    multi = pycurl.CurlMulti()
    free = []
    for _ in range(concurrency):
        curl = pycurl.Curl()
        curl.setopt(pycurl.NOSIGNAL, 1)
        curl.setopt(pycurl.WRITEFUNCTION, len)
        free.append(curl)
    todo = deque(calls)
    running = answered = 0
    timeout_ms = int(timeout_s * 1000)
    while todo or running:
        while todo and free:
            (url, headers), curl = todo.popleft(), free.pop()
            curl.setopt(pycurl.URL, url)
            curl.setopt(pycurl.HTTPHEADER, headers)
            curl.setopt(pycurl.TIMEOUT_MS, timeout_ms)
            multi.add_handle(curl)
            running += 1
        multi.select(1.0)
        while multi.perform()[0] == pycurl.E_CALL_MULTI_PERFORM:
            pass
        while True:
            queued, ok, failed = multi.info_read()
            answered += len(ok)
            for curl in [*ok, *(c for c, _, _ in failed)]:
                multi.remove_handle(curl)
                free.append(curl)
                running -= 1
            if not queued:
                break
    return answered


def pycurl_loop(events: list[Event], concurrency: int, timeout_s: float, ca_file: str = "") -> int:
    """The bare multi loop: ``socket_action`` over epoll, as the engine drives it (select()
    would break past 1,024 sockets)."""
    client = make_client(parse_networks("127.0.0.0/8"), ca_file=ca_file)
    multi = pycurl.CurlMulti()
    selector = selectors.DefaultSelector()
    timer_at: list[float | None] = [None]

    def on_socket(what: int, fd: int, _multi: object, _data: object) -> None:
        if what == pycurl.POLL_REMOVE:
            with contextlib.suppress(KeyError, ValueError):
                selector.unregister(fd)
            return
        mask = (selectors.EVENT_READ if what in (pycurl.POLL_IN, pycurl.POLL_INOUT) else 0) | (
            selectors.EVENT_WRITE if what in (pycurl.POLL_OUT, pycurl.POLL_INOUT) else 0)
        try:
            selector.modify(fd, mask)
        except KeyError:
            selector.register(fd, mask)

    def on_timer(ms: int) -> None:
        timer_at[0] = None if ms < 0 else time.monotonic() + ms / 1000

    multi.setopt(pycurl.M_SOCKETFUNCTION, on_socket)
    multi.setopt(pycurl.M_TIMERFUNCTION, on_timer)
    free = [Transfer(client) for _ in range(concurrency)]
    todo = deque(events)
    running = answered = 0
    while todo or running:
        while todo and free:
            event, transfer = todo.popleft(), free.pop()
            transfer.prepare(event.target_url(), header_lines(build_headers(event)), timeout_s)
            multi.add_handle(transfer.curl)
            running += 1
        at = timer_at[0]
        wait_s = 1.0 if at is None else max(0.0, at - time.monotonic())
        if selector.get_map():
            ready = selector.select(wait_s)
        else:
            ready = []
            time.sleep(wait_s)
        for key, mask in ready:
            flags = (pycurl.CSELECT_IN if mask & selectors.EVENT_READ else 0) | (
                pycurl.CSELECT_OUT if mask & selectors.EVENT_WRITE else 0)
            multi.socket_action(key.fd, flags)
        if timer_at[0] is not None and time.monotonic() >= timer_at[0]:
            timer_at[0] = None
            multi.socket_action(pycurl.SOCKET_TIMEOUT, 0)
        while True:
            queued, ok, failed = multi.info_read()
            for curl, errno in [(c, 0) for c in ok] + [(c, e) for c, e, _ in failed]:
                if curl.transfer.result(errno).status is not None:
                    answered += 1
                multi.remove_handle(curl)
                free.append(curl.transfer)
                running -= 1
            if not queued:
                break
    return answered


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ceiling")
    parser.add_argument("--mode", choices=["urllib3", "pycurl", "bare"], required=True)
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--events", type=Path, required=True, help="file of event JSON lines")
    parser.add_argument("--timeout-s", type=float, default=2.0)
    parser.add_argument("--ca-file", default="", help="CA bundle to verify https buyers with (default: "
                        "urllib3's and libcurl's own)")
    args = parser.parse_args()
    events = [Event.from_json(line) for line in args.events.read_text().splitlines() if line]
    bare_calls = [(e.target_url(), header_lines(build_headers(e))) for e in events] if args.mode == "bare" else None
    started, cpu0 = time.perf_counter(), time.process_time()
    if bare_calls is not None:
        answered = bare_loop(bare_calls, args.concurrency, args.timeout_s)
    elif args.mode == "urllib3":
        answered = urllib3_loop(events, args.concurrency, args.timeout_s, args.ca_file)
    else:
        answered = pycurl_loop(events, args.concurrency, args.timeout_s, args.ca_file)
    print(json.dumps({"calls": len(events), "answered": answered, "seconds": time.perf_counter() - started,
                      "cpu_s": time.process_time() - cpu0}))


if __name__ == "__main__":
    main()
