"""Prometheus metrics of the fleet (``CGRID_METRICS_PORT``, off by default).

Every process of a worker records into prometheus-client's multiprocess files (prefork
children included); the worker's main process serves them all, summed, on
``http://<host>:CGRID_METRICS_PORT/metrics``. :func:`prepare` runs when the worker module
is imported (``worker/celery_app.py``), before any of our metrics exist.

When metrics are off, every function here is a no-op: the hot path pays nothing.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from typing import Any

ENABLED = False
# Label cardinality: a process gives at most this many buyers series of their own (those
# named in the buyers file always get theirs); the others are counted under OTHER_BUYERS.
# An event's buyer may not begin with '-' (cgrid/event.py), so no buyer is named that.
BUYER_LABELS_MAX = 1000
OTHER_BUYERS = "-other"
_buyer_labels: set[str] = set()
_dir: str | None = None
_owner_pid = 0  # the process that made the directory (pool children inherit it)
# The metric objects, made by _define() once multiprocess mode is set up.
M: Any = None


def prepare(port: int) -> None:
    """Turn metrics on for this worker: a fresh multiprocess directory, inherited by pool
    children. Call before prometheus_client is imported."""
    global ENABLED, _dir, _owner_pid
    if not port:
        return
    _dir = tempfile.mkdtemp(prefix="cgrid-metrics-")
    _owner_pid = os.getpid()
    atexit.register(cleanup)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = _dir
    # prometheus_client picks its value class when it is first imported, and Celery's
    # command line may have imported it already (Flower's command plugin does): pick again.
    from prometheus_client import values

    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
    ENABLED = True
    _define()


class _Metrics:
    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.attempts = Counter("cgrid_attempts", "Attempts by buyer, kind and outcome "
                                "(ok, unexpected, fail, rejected, expired)", ["buyer", "kind", "outcome"])
        self.finished = Counter("cgrid_events_finished", "Events that reached a terminal state",
                                ["buyer", "kind", "state"])
        self.retries = Counter("cgrid_retries_scheduled", "First attempts that failed and scheduled the one retry",
                               ["buyer", "kind"])
        # Per buyer, not per kind too: 16 series per buyer (docs/operations.md#metrics).
        self.latency = Histogram("cgrid_attempt_duration_seconds", "Duration of the calls (attempts that were made)",
                                 ["buyer"], buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60))
        self.first_delay = Histogram("cgrid_first_attempt_delay_seconds", "From an event's created_at (set by "
                                     "publish() unless given) to the start of its first call", ["kind"],
                                     buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900,
                                              1800, 3600))
        self.in_flight = Gauge("cgrid_lane_in_flight", "Calls in flight per buyer lane", ["buyer"],
                               multiprocess_mode="livesum")
        self.waiting = Gauge("cgrid_lane_waiting", "Attempts waiting in a buyer lane of a worker process", ["buyer"],
                             multiprocess_mode="livesum")
        self.cap = Gauge("cgrid_lane_cap", "Calls a buyer lane may have in flight now, summed over processes",
                         ["buyer"], multiprocess_mode="livesum")
        self.throttled = Gauge("cgrid_lane_throttled", "1 while a buyer lane is narrowed (its calls time out or "
                               "fail to connect) in some process", ["buyer"], multiprocess_mode="livemax")
        self.parked = Counter("cgrid_lane_parked", "Attempts handed back to Redis unstarted (lane_full, paused)",
                              ["buyer", "reason"])
        self.queue_depth = Gauge("cgrid_queue_depth", "Triggers waiting on each broker queue", ["queue"],
                                 multiprocess_mode="livemax")
        self.queue_stalled = Gauge("cgrid_queue_stalled_seconds", "How long triggers have waited on a queue "
                                   "with no worker taking any (0 while it is empty or consumed)", ["queue"],
                                   multiprocess_mode="livemax")
        self.due = Gauge("cgrid_due_events", "Events accepted and not final, not parked: queued, in flight, "
                         "or waiting for their retry", multiprocess_mode="livemax")
        self.open_events = Gauge("cgrid_open_events", "Events accepted and not yet final, by kind: the backlog "
                                 "of win (nurl) and billing (burl) notices", ["kind"], multiprocess_mode="livemax")
        self.parked_events = Gauge("cgrid_parked_events", "Events parked in Redis per buyer (lane full, paused)",
                                   ["buyer"], multiprocess_mode="livemax")
        self.archive_backlog = Gauge("cgrid_archive_backlog", "Final ledger records not yet written to the "
                                     "archive files (set once an archiver has started)", multiprocess_mode="livemax")
        self.archive_oldest = Gauge("cgrid_archive_oldest_seconds", "Age of the oldest final record not yet "
                                    "archived (0 when none waits)", multiprocess_mode="livemax")
        self.redis_memory_used = Gauge("cgrid_redis_memory_used_bytes", "Redis's used_memory: against "
                                       "cgrid_redis_memory_max_bytes, how full it is", multiprocess_mode="livemax")
        self.redis_memory_max = Gauge("cgrid_redis_memory_max_bytes", "Redis's maxmemory (0: no limit); new events "
                                      "are refused past CGRID_PUBLISH_MAX_MEMORY_SHARE of it",
                                      multiprocess_mode="livemax")
        self.poisoned = Counter("cgrid_poisoned_messages", "Broker messages dropped as poisoned (not valid "
                                "triggers)")
        self.sweeper = Counter("cgrid_sweeper_actions", "Triggers the sweeper sent: retries due, or attempt-1 "
                               "triggers sent again (lost, or parked events revived)", ["action"])


def buyer_label(buyer: str, *, named: bool = False) -> str:
    """The ``buyer`` label of a buyer's series in this process: its id while fewer than
    BUYER_LABELS_MAX buyers have one (or when ``named`` in the buyers file), else OTHER_BUYERS.
    With 40,000 buyer ids a process keeps 1,000 label sets per metric, not 40,000."""
    if buyer in _buyer_labels:
        return buyer
    if named or len(_buyer_labels) < BUYER_LABELS_MAX:
        _buyer_labels.add(buyer)
        return buyer
    return OTHER_BUYERS


def _define() -> None:
    global M
    M = _Metrics()


def serve(port: int, host: str = "0.0.0.0") -> None:
    """Serve every process's metrics from this (main) process. Raises OSError when the
    port is taken."""
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    from prometheus_client import CollectorRegistry, make_wsgi_app, multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]

    class QuietHandler(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

    class ThreadedServer(WSGIServer):
        daemon_threads = True

    server = make_server(host, port, make_wsgi_app(registry), server_class=ThreadedServer,
                         handler_class=QuietHandler)
    import threading

    threading.Thread(target=server.serve_forever, name="cgrid-metrics", daemon=True).start()


def process_exited(pid: int) -> None:
    """A pool child is gone: drop its live gauges."""
    if ENABLED:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


def cleanup() -> None:
    """Remove the metrics directory (only from the process that made it)."""
    if _dir and os.getpid() == _owner_pid:
        shutil.rmtree(_dir, ignore_errors=True)
