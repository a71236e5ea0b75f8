"""The Celery app of the fleet: ``celery -A worker worker`` and ``celery -A worker flower``."""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

from celery import signals

from cgrid import logs, metrics
from cgrid.broker import DELIVER_TASK, make_celery, prefetch_multiplier
from cgrid.buyers import BuyersFile
from cgrid.errors import ConfigError
from cgrid.settings import Settings
from worker import poison
from worker.screening import message_sample
from worker.transport import use_hardened_transports

GREEN_POOLS = ("gevent", "eventlet")


def green_pool_in_use() -> str | None:
    """The green pool this process was started with (Celery patches before importing us)."""
    for name in GREEN_POOLS:
        module = sys.modules.get(f"{name}.monkey" if name == "gevent" else name)
        if module is None:
            continue
        if name == "gevent" and module.is_module_patched("socket"):
            return name
        if name == "eventlet" and module.patcher.is_monkey_patched("socket"):
            return name
    return None


if green_pool_in_use():
    # The calls are made by one libcurl loop per process, in a thread of its own: green
    # threads would add nothing but a blocked hub. docs/deploy.md.
    print(f"cgrid-s2s: the {green_pool_in_use()} pool is not supported: calls are made by each process's "
          "libcurl loop, so green threads add nothing. Run `celery -A worker worker -P solo`, one per "
          "core (recommended), or prefork (no -P) or -P threads.", file=sys.stderr)
    raise SystemExit(2)

try:
    settings = Settings.from_env()
    # A buyers file that cannot be used stops the worker at start (later, a broken new
    # version is refused and the last good one stays in force).
    BuyersFile.for_settings(settings)
except ConfigError as e:
    print(f"cgrid-s2s: configuration error: {e}", file=sys.stderr)
    raise SystemExit(2) from None

logs.configure(settings.log_level)
metrics.prepare(settings.metrics_port)  # before anything imports prometheus_client
poison.configure(settings)  # where poisoned messages are recorded
# Consume with the hardened transport: a poisoned message is dropped, not fatal.
use_hardened_transports()
app = make_celery(settings)
app.conf.worker_consumer = "worker.consumer:Consumer"  # reconnects every 2 s at most

# What the task runs, imported now rather than in the first task: the engine, libcurl, the
# ledger (measured: ~0.16 CPU s per process in its first task). A prefork worker imports it
# once, in the main process, before its children fork; nothing here makes a connection or a
# libcurl handle (worker/runtime.py builds them in each process, after the fork).
from worker.batch import run_batch, run_shared, send_on  # noqa: E402
from worker.runtime import get_runtime  # noqa: E402


@app.task(name=DELIVER_TASK, bind=True)
def deliver(self: Any, ids: Any, attempt: Any = 1, sent_at: Any = 0.0, shared: Any = None) -> dict[str, Any]:
    """Deliver a batch of events: attempt 1, or the one retry (attempt 2); or, for a shared
    trigger (``shared``: its ledger partition), the first attempts waiting in its queue."""
    delivery_info = getattr(self.request, "delivery_info", None) or {}
    queue = delivery_info.get("routing_key")
    if shared is not None:
        return run_shared(get_runtime(settings), ids, shared, sent_at, queue,
                          lambda *trigger: send_on(self.app, *trigger))
    return run_batch(get_runtime(settings), ids, attempt, sent_at, queue)


_sweeper: Any = None
_main_pid = os.getpid()


@signals.worker_init.connect
def _serve_metrics(**_: Any) -> None:
    """The main process serves every process's metrics; a taken port stops the worker."""
    if not metrics.ENABLED:
        return
    try:
        metrics.serve(settings.metrics_port)
    except OSError as e:
        print(f"cgrid-s2s: CGRID_METRICS_PORT: cannot serve metrics on port {settings.metrics_port}: "
              f"{e.strerror or e} (is another worker on this host using it?)", file=sys.stderr, flush=True)
        metrics.cleanup()
        os._exit(2)


@signals.worker_init.connect
def _prefetch_for_the_pool(sender: Any, **_: Any) -> None:
    """Before the consumer is built: the prefetch that suits the worker's pool
    (``CGRID_PREFETCH_MULTIPLIER`` sets one for every pool)."""
    pool = sender.pool_cls
    pool_module = pool if isinstance(pool, str) else getattr(pool, "__module__", "")
    sender.prefetch_multiplier = settings.prefetch_multiplier or prefetch_multiplier(pool_module)
    if pool_module.endswith(".solo") or pool == "solo":
        # A solo worker runs one task at a time, but Celery sizes its prefetch (multiplier x
        # concurrency) by -c, which defaults to the CPU count even for solo: 16 triggers held
        # by one worker on a 16-core host. The consumer is built after this signal.
        sender.concurrency = 1


@signals.worker_init.connect
def _without_gossip_and_mingle(sender: Any, **_: Any) -> None:
    """As if started with ``--without-gossip --without-mingle`` (docs/deploy.md says why):
    the worker's options reach the consumer's bootsteps after this signal. Heartbeats stay
    on: Flower needs them."""
    sender.options["without_gossip"] = True
    sender.options["without_mingle"] = True


@signals.worker_init.connect
def _reject_what_the_pool_cannot_take(sender: Any, **_: Any) -> None:
    """Celery hands a request to its pool unguarded: one that raises on the way (a message
    worker/screening.py did not foresee) would stay unacked and, under prefork, hold its pool
    slot (a semaphore) for good. Such a request gives both back and is recorded as poison.
    (Set before the pool is built: its semaphore then calls this ``_process_task``.)"""
    process = sender._process_task

    def process_task(request: Any) -> None:
        try:
            process(request)
        except Exception as e:
            if getattr(sender, "semaphore", None) is not None and sender.process_task == sender._process_task_sem:
                sender._quick_release()
            request.reject(requeue=False)
            message = request.message
            poison.record_poison(f"celery could not take the message: {e!r}"[:200],
                                 message_sample({"headers": message.headers, "body": message.body}))

    sender._process_task = process_task


@signals.worker_ready.connect
def _start_sweeper(sender: Any = None, **_: Any) -> None:
    global _sweeper
    _prefetch = getattr(getattr(sender, "controller", None), "prefetch_multiplier", None)
    from cgrid.ledger.partitions import ledger_for
    from cgrid.redis_conn import broker_client, long_lived_client
    from worker.sweeper import Sweeper

    _sweeper = Sweeper(app, ledger_for(settings, long_lived_client(settings)), settings, broker_client(settings))
    _sweeper.start()
    # Instead of Celery's restart: SIGHUP re-reads the buyers file (docs/settings.md, the buyers file).
    signal.signal(signal.SIGHUP, _reload_buyers_file)
    logs.get_logger().info(
        "worker_ready",
        node=getattr(sender, "hostname", None),
        queues=sorted(app.amqp.queues.consume_from),  # all of the routing's, or what -Q chose
        timeout_s=settings.timeout_s,
        retry_delay_s=settings.retry_delay_s,
        prefetch_multiplier=_prefetch,
        allowed_networks=[str(n) for n in settings.allowed_networks],
    )


def _reload_buyers_file(*_: Any) -> None:
    """SIGHUP: re-read the buyers file now (it is also re-read within a second of a change)."""
    from worker.runtime import current_runtime

    runtime = current_runtime()
    if runtime is not None and runtime._engine is not None:
        runtime._engine.request_reload()
    if _sweeper is not None:
        _sweeper.buyers.reload()


@signals.worker_process_init.connect
def _sighup_in_pool_child(**_: Any) -> None:
    signal.signal(signal.SIGHUP, _reload_buyers_file)


@signals.worker_shutdown.connect
def _stop_sweeper(**_: Any) -> None:
    if _sweeper is not None:
        _sweeper.stop()
    _drain_engine()
    metrics.cleanup()


@signals.worker_process_shutdown.connect
def _drain_engine(**_: Any) -> None:
    """Warm shutdown: the calls this process has claimed are made and recorded first."""
    from worker.runtime import current_runtime

    runtime = current_runtime()
    if runtime is not None:
        runtime.drain()
    if os.getpid() != _main_pid:
        metrics.process_exited(os.getpid())
