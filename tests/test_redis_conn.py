"""How CGRID_REDIS_URL and the TLS/Sentinel settings become connections (no server needed)."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from cgrid.errors import ConfigError
from cgrid.redis_conn import celery_connection_conf, mask_url, parse_sentinel_url, redis_client
from cgrid.settings import Settings


@pytest.mark.parametrize(("url", "shown"), [
    ("redis://:s3cret@host:6379/0", "redis://:***@host:6379/0"),
    ("rediss://cgrid:s3cret@host:6380/1", "rediss://cgrid:***@host:6380/1"),
    ("redis://host:6379/0", "redis://host:6379/0"),
    ("redis://cgrid@host/0", "redis://cgrid@host/0"),
    ("sentinel://u:pw@h1:26379;sentinel://h2:26379/0", "sentinel://u:***@h1:26379;sentinel://h2:26379/0"),
    # An unencoded '/', '?' or '@' in the password does not leave part of it shown.
    ("http://u:Se/cret@h:6379/0", "http://u:***@h:6379/0"),
    ("redis://:a?b/c@d@h:6379/0", "redis://:***@h:6379/0"),
    # A password in the query (redis-py reads it).
    ("redis://h:1/0?password=s3cret", "redis://h:1/0?password=***"),
    ("redis://h:1/0?db=1&Password=s3cret&x=1", "redis://h:1/0?db=1&Password=***&x=1"),
    ("redis://h:1/0?sentinel_password=s3/cr@t", "redis://h:1/0?sentinel_password=***"),
])
def test_mask_url_hides_only_the_password(url: str, shown: str) -> None:
    assert mask_url(url) == shown


def test_sentinel_url_lists_every_sentinel_and_takes_db_and_credentials() -> None:
    target = parse_sentinel_url("sentinel://cgrid:p%40ss@10.0.0.1:26379/2;sentinel://10.0.0.2;sentinel://h3:26380")
    assert target.sentinels == (("10.0.0.1", 26379), ("10.0.0.2", 26379), ("h3", 26380))
    assert (target.db, target.username, target.password) == (2, "cgrid", "p@ss")


@pytest.mark.parametrize(("env", "named"), [
    ({"CGRID_REDIS_URL": "http://host:6379"}, "CGRID_REDIS_URL"),
    ({"CGRID_REDIS_URL": "sentinel://h1:26379;redis://h2:6379"}, "CGRID_REDIS_URL"),
    ({"CGRID_REDIS_URL": "sentinel://h1:notaport"}, "CGRID_REDIS_URL"),
    ({"CGRID_REDIS_URL": "sentinel://h1:26379/zero"}, "CGRID_REDIS_URL"),
    ({"CGRID_REDIS_URL": "redis://h:6379", "CGRID_REDIS_CA_FILE": "/etc/hostname"}, "CGRID_REDIS_CA_FILE"),
    ({"CGRID_REDIS_URL": "rediss://h:6379", "CGRID_REDIS_CA_FILE": "/no/such/ca.pem"}, "CGRID_REDIS_CA_FILE"),
    ({"CGRID_REDIS_URL": "rediss://h:6379", "CGRID_REDIS_CERT_FILE": "/etc/hostname"}, "CGRID_REDIS_KEY_FILE"),
    ({"CGRID_REDIS_URL": "sentinel://h1:26379", "CGRID_REDIS_CA_FILE": "/etc/hostname"}, "CGRID_REDIS_SENTINEL_TLS"),
    ({"CGRID_REDIS_URL": "rediss://h:6379", "CGRID_REDIS_SENTINEL_TLS": "on"}, "CGRID_REDIS_SENTINEL_TLS"),
    ({"CGRID_REDIS_URL": "sentinel://h1:26379", "CGRID_REDIS_SENTINEL_TLS": "maybe"}, "CGRID_REDIS_SENTINEL_TLS"),
    ({"CGRID_REDIS_URL": "unix:///run/redis.sock"}, "CGRID_REDIS_URL"),
    ({"CGRID_REDIS_URL": "redis://u:p@ss@h:6379/0"}, "CGRID_REDIS_URL"),
    ({"CGRID_REDIS_URL": "redis://u:p/ss@h:6379/0"}, "CGRID_REDIS_URL"),
    ({"CGRID_REDIS_URL": "redis://u:p;ss@h:6379/0"}, "CGRID_REDIS_URL"),
    ({"CGRID_REDIS_URL": "redis://h:63x79/0"}, "CGRID_REDIS_URL"),
    ({"CGRID_REDIS_URL": "sentinel://h1:26379;sentinel://h2:26379/2"}, "CGRID_REDIS_URL"),
    ({"CGRID_REDIS_URL": "sentinel://h1:26379/1;sentinel://h2:26379/2"}, "CGRID_REDIS_URL"),
    ({"CGRID_REDIS_URL": "sentinel://h1:26379;sentinel://u:pw@h2:26379"}, "CGRID_REDIS_URL"),
    ({"CGRID_REDIS_WAIT_REPLICAS": "1", "CGRID_REDIS_WAIT_TIMEOUT_MS": "1001"}, "CGRID_REDIS_WAIT_TIMEOUT_MS"),
    ({"CGRID_REDIS_WAIT_REPLICAS": "-1"}, "CGRID_REDIS_WAIT_REPLICAS"),
    ({"CGRID_REDIS_WAIT_TIMEOUT_MS": "0"}, "CGRID_REDIS_WAIT_TIMEOUT_MS"),
])
def test_bad_redis_settings_are_refused_naming_the_setting(env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        Settings.from_env(env)


@pytest.mark.parametrize("url", ["sentinel://u:hunter2@h1:26379;redis://h2", "redis://u:hunter2;x@h:6379/0",
                                 "redis://u:hunter2/x@h:6379/0", "redis://u:hunter2@x@h:6379/0"])
def test_a_refused_url_never_echoes_its_password(url: str) -> None:
    with pytest.raises(ConfigError) as refused:
        Settings.from_env({"CGRID_REDIS_URL": url})
    assert "hunter2" not in str(refused.value)


def test_an_encoded_password_is_accepted_and_sentinel_waits_for_a_replica_by_default() -> None:
    assert Settings.from_env({"CGRID_REDIS_URL": "redis://u:p%40s%2Fs%3B@h:6379/0"}).redis_wait_replicas == 0
    sentinel = {"CGRID_REDIS_URL": "sentinel://u:p@h1:26379/0;sentinel://h2:26379"}
    assert Settings.from_env(sentinel).redis_wait_replicas == 1
    assert Settings.from_env({**sentinel, "CGRID_REDIS_WAIT_REPLICAS": "0"}).redis_wait_replicas == 0


def test_celery_gets_tls_options_for_rediss(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("not read here")
    settings = Settings.from_env({"CGRID_REDIS_URL": "rediss://u:p@h:6380/0", "CGRID_REDIS_CA_FILE": str(ca)})
    conf = celery_connection_conf(settings, {"visibility_timeout": 60})
    assert conf["broker_use_ssl"] == {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": str(ca)}
    assert conf["broker_transport_options"] == {"visibility_timeout": 60}


def test_celery_gets_the_master_name_and_sentinel_password_for_sentinel() -> None:
    settings = Settings.from_env({"CGRID_REDIS_URL": "sentinel://h1:26379;sentinel://h2:26379/0",
                                  "CGRID_REDIS_MASTER_NAME": "cgrid", "CGRID_REDIS_SENTINEL_PASSWORD": "sp"})
    conf = celery_connection_conf(settings, {"visibility_timeout": 60})
    options = conf["broker_transport_options"]
    assert options["master_name"] == "cgrid"
    assert options["sentinel_kwargs"]["password"] == "sp"
    assert "broker_use_ssl" not in conf


def test_a_sentinel_client_is_the_named_primarys_client() -> None:
    settings = Settings.from_env({"CGRID_REDIS_URL": "sentinel://u:pw@h1:26379/3;sentinel://h2:26380",
                                  "CGRID_REDIS_MASTER_NAME": "cgrid"})
    client = redis_client(settings, socket_timeout_s=1, socket_connect_timeout_s=1)
    pool = client.connection_pool
    assert pool.service_name == "cgrid"  # type: ignore[attr-defined]
    assert pool.connection_kwargs["db"] == 3
    assert (pool.connection_kwargs["username"], pool.connection_kwargs["password"]) == ("u", "pw")


def test_an_empty_master_name_takes_the_default() -> None:
    for empty in ("", "  "):
        settings = Settings.from_env({"CGRID_REDIS_URL": "sentinel://h1:26379", "CGRID_REDIS_MASTER_NAME": empty})
        assert settings.redis_master_name == "mymaster"


def test_no_message_and_no_repr_shows_a_password() -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"CGRID_REDIS_URL": "http://u:Se/cret@h:6379/0"})
    assert "is not a redis://" in str(info.value) and "cret" not in str(info.value)
    settings = Settings.from_env({"CGRID_REDIS_URL": "redis://u:s3cret@h:6379/0?password=s3cret",
                                  "CGRID_REDIS_SENTINEL_PASSWORD": "sp-secret"})
    assert "s3cret" not in repr(settings) and "sp-secret" not in repr(settings)
    assert "redis://u:***@h:6379/0?password=***" in repr(settings) and "redis_sentinel_password='***'" in repr(settings)
