"""Reading and checking ``CGRID_REDIS_URL`` (its forms: ``cgrid/redis_conn.py``), and
masking its password: nothing here echoes a password."""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from cgrid.errors import ConfigError

SCHEMES = ("redis://", "rediss://", "sentinel://")
# Unencoded in a user name or password these would be read as part of the address (or, for
# ';', as the next sentinel): the URL must percent-encode them.
_RAW_IN_USERINFO = set("@/;?#")
SENTINEL_PORT = 26379
# A password in the query (redis-py reads ?password=...), whatever the parameter's case.
_QUERY_PASSWORD = re.compile(r"([?&;][^=&;#]*password[^=&;#]*=)[^&;#]*", re.IGNORECASE)


def mask_url(url: str) -> str:
    """The URL with any password replaced by ``***`` (for messages and logs): the one in the
    user information — everything between ``user:`` and the part's last ``@``, so that a
    password with an unencoded ``/`` or ``?`` is hidden whole too — and a ``password=`` in
    the query. Each ``;``-separated part (sentinels) on its own."""
    return ";".join(_mask_part(part) for part in url.split(";"))


def _mask_part(part: str) -> str:
    part = _QUERY_PASSWORD.sub(r"\1***", part)
    scheme, sep, rest = part.partition("://")
    if not sep or "@" not in rest:
        return part
    userinfo, _, address = rest.rpartition("@")
    user, colon, _ = userinfo.partition(":")
    return f"{scheme}://{user}:***@{address}" if colon else part


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


def check_url(url: str, *, master_name: str, sentinel_tls: bool, tls_files: bool, cert_file: str,
              key_file: str) -> None:
    """Refuse a URL or TLS combination that cannot work, naming the setting (``tls_files``:
    whether any of CGRID_REDIS_CA_FILE/CERT_FILE/KEY_FILE is set)."""
    if url.startswith("unix://"):
        raise ConfigError("CGRID_REDIS_URL: unix:// sockets are not supported (Celery's broker cannot use them); "
                          "use redis://127.0.0.1:6379/0")
    if not url.startswith(SCHEMES):
        raise ConfigError(f"CGRID_REDIS_URL: {mask_url(url)!r} is not a redis://, rediss:// "
                          "or sentinel:// URL")
    _check_userinfo(url)
    if url.startswith("sentinel://"):
        parse_sentinel_url(url)
        if not master_name:
            raise ConfigError("CGRID_REDIS_MASTER_NAME: a sentinel:// URL needs the primary's name")
        if tls_files and not sentinel_tls:
            raise ConfigError("CGRID_REDIS_CA_FILE/CERT_FILE/KEY_FILE are set with a sentinel:// URL: "
                              "set CGRID_REDIS_SENTINEL_TLS=on for TLS to the sentinels and the nodes")
    else:
        if sentinel_tls:
            raise ConfigError("CGRID_REDIS_SENTINEL_TLS is on but CGRID_REDIS_URL is not sentinel:// "
                              "(for one Redis over TLS use rediss://)")
        if tls_files and not url.startswith("rediss://"):
            raise ConfigError("CGRID_REDIS_CA_FILE/CERT_FILE/KEY_FILE are set but CGRID_REDIS_URL is not rediss://")
    if bool(cert_file) != bool(key_file):
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
