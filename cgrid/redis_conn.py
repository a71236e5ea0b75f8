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

import re
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import redis
from redis.sentinel import Sentinel

from cgrid.errors import ConfigError

if TYPE_CHECKING:
    from cgrid.settings import Settings

SCHEMES = ("redis://", "rediss://", "sentinel://")
# Unencoded in a user name or password these would be read as part of the address (or, for
# ';', as the next sentinel): the URL must percent-encode them.
_RAW_IN_USERINFO = set("@/;?#")
SENTINEL_PORT = 26379
_PASSWORD = re.compile(r"(://[^:@/;]*):[^@/;]*@")


def mask_url(url: str) -> str:
    """The URL with any password replaced by ``***`` (for messages and logs)."""
    return _PASSWORD.sub(r"\1:***@", url)


@dataclass(frozen=True)
class SentinelTarget:
    """What a ``sentinel://`` URL names."""

    sentinels: tuple[tuple[str, int], ...]
    db: int
    username: str | None
    password: str | None


def parse_sentinel_url(url: str) -> SentinelTarget:
    """Split kombu's ``sentinel://[user:password@]h1:26379/0;sentinel://h2:26379`` form. The
    user, password and database are the first part's (as kombu reads them); a later part
    that names different ones is refused, so the broker and the ledger cannot part ways."""
    sentinels: list[tuple[str, int]] = []
    db, username, password = 0, None, None
    for part in url.split(";"):
        part = part.strip()
        if not part:
            continue
        if not part.startswith("sentinel://"):
            raise ConfigError(f"CGRID_REDIS_URL: {mask_url(part)!r} is not a sentinel:// address "
                              "(Sentinel URLs list every sentinel as sentinel://host:port, ';'-separated)")
        try:
            split = urlsplit(part)
            port = split.port or SENTINEL_PORT
        except ValueError:
            raise ConfigError(f"CGRID_REDIS_URL: {mask_url(part)!r} has no valid port") from None
        if not split.hostname:
            raise ConfigError(f"CGRID_REDIS_URL: {mask_url(part)!r} names no host")
        path = split.path.strip("/")
        if path and not path.isdigit():
            raise ConfigError(f"CGRID_REDIS_URL: database {path!r} is not a number")
        part_db = int(path) if path else 0
        part_user = unquote(split.username) if split.username else None
        part_password = unquote(split.password) if split.password else None
        if not sentinels:
            db, username, password = part_db, part_user, part_password
        elif (path and part_db != db) or (part_user and part_user != username) or (
                part_password and part_password != password):
            raise ConfigError("CGRID_REDIS_URL: put the database, user and password on the first sentinel only "
                              "(sentinel://user:password@host1:26379/0;sentinel://host2:26379); the broker "
                              "reads them from there")
        sentinels.append((split.hostname, port))
    if not sentinels:
        raise ConfigError("CGRID_REDIS_URL: a sentinel:// URL must name at least one sentinel")
    return SentinelTarget(tuple(sentinels), db, username, password)


def check_url(settings: Settings) -> None:
    """Refuse a URL or TLS combination that cannot work, naming the setting."""
    url = settings.redis_url
    if url.startswith("unix://"):
        raise ConfigError("CGRID_REDIS_URL: unix:// sockets are not supported (Celery's broker cannot use them); "
                          "use redis://127.0.0.1:6379/0")
    if not url.startswith(SCHEMES):
        raise ConfigError(f"CGRID_REDIS_URL: {mask_url(url)!r} is not a redis://, rediss:// "
                          "or sentinel:// URL")
    _check_userinfo(url)
    if url.startswith("sentinel://"):
        parse_sentinel_url(url)
        if not settings.redis_master_name:
            raise ConfigError("CGRID_REDIS_MASTER_NAME: a sentinel:// URL needs the primary's name")
        if tls_files(settings) and not settings.redis_sentinel_tls:
            raise ConfigError("CGRID_REDIS_CA_FILE/CERT_FILE/KEY_FILE are set with a sentinel:// URL: "
                              "set CGRID_REDIS_SENTINEL_TLS=on for TLS to the sentinels and the nodes")
    else:
        if settings.redis_sentinel_tls:
            raise ConfigError("CGRID_REDIS_SENTINEL_TLS is on but CGRID_REDIS_URL is not sentinel:// "
                              "(for one Redis over TLS use rediss://)")
        if tls_files(settings) and not url.startswith("rediss://"):
            raise ConfigError("CGRID_REDIS_CA_FILE/CERT_FILE/KEY_FILE are set but CGRID_REDIS_URL is not rediss://")
    if bool(settings.redis_cert_file) != bool(settings.redis_key_file):
        raise ConfigError("CGRID_REDIS_CERT_FILE and CGRID_REDIS_KEY_FILE: a client certificate needs both")


def _check_userinfo(url: str) -> None:
    """A user name or password must percent-encode ``@ / ; ? #``: unencoded, the URL would be
    read differently by kombu and by redis-py, or not at all (and a message could then show
    part of the password). Nothing of the URL is echoed here."""
    for part in url.split(";") if url.startswith("sentinel://") else [url]:
        rest = part.split("://", 1)[1]
        if rest.count("@") > 1:
            raise ConfigError("CGRID_REDIS_URL: percent-encode '@' in the user name or password (%40)")
        if "@" in rest:
            userinfo = rest.rsplit("@", 1)[0]
            if _RAW_IN_USERINFO & set(userinfo):
                raise ConfigError("CGRID_REDIS_URL: percent-encode '@ / ; ? #' in the user name or password "
                                  "(%40 %2F %3B %3F %23)")
        try:
            _ = urlsplit(part).port
        except ValueError:
            raise ConfigError("CGRID_REDIS_URL: its port is not a number (a password with unencoded "
                              "special characters looks like one: percent-encode them)") from None


def tls_files(settings: Settings) -> dict[str, str]:
    return {key: value for key, value in (("ssl_ca_certs", settings.redis_ca_file),
                                          ("ssl_certfile", settings.redis_cert_file),
                                          ("ssl_keyfile", settings.redis_key_file)) if value}


def _tls_options(settings: Settings) -> dict[str, Any]:
    """redis-py's (and kombu's ``broker_use_ssl``) TLS options: the server's certificate is
    always verified, against CGRID_REDIS_CA_FILE or the system's CAs."""
    return {"ssl_cert_reqs": ssl.CERT_REQUIRED, **tls_files(settings)}


def redis_client(settings: Settings, *, socket_timeout_s: float, socket_connect_timeout_s: float,
                 health_check_interval_s: int = 0) -> redis.Redis:
    """A redis-py client for the ledger, the sweeper, the producer and the command line.

    With Sentinel it is the primary's client: after a failover its next command finds the
    new primary (a command caught by the failover raises a ``redis.ConnectionError``, which
    the callers already ride out)."""
    options: dict[str, Any] = {
        "socket_timeout": socket_timeout_s,
        "socket_connect_timeout": socket_connect_timeout_s,
        "health_check_interval": health_check_interval_s,
    }
    url = settings.redis_url
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
    return redis.Redis.from_url(url, **options)


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
    conf: dict[str, Any] = {"broker_url": settings.redis_url}
    options = dict(transport_options)
    if settings.redis_url.startswith("sentinel://"):
        options["master_name"] = settings.redis_master_name
        options["sentinel_kwargs"] = _sentinel_kwargs(settings)
    if settings.redis_url.startswith("rediss://") or settings.redis_sentinel_tls:
        conf["broker_use_ssl"] = _tls_options(settings)
    conf["broker_transport_options"] = options
    return conf
