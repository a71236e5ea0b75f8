"""Fixtures: a private redis-server on a free port, a recording buyer server, workers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from cgrid.redis_server import RedisServer
from ops.mock_dsp import MockDspServer


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture()
def redis_url(redis_server: RedisServer) -> str:
    """The private server, emptied for this test."""
    redis.Redis.from_url(redis_server.url).flushall()
    return redis_server.url


@pytest.fixture(scope="session")
def dsp_server() -> Iterator[MockDspServer]:
    server = MockDspServer().start_in_thread()
    yield server
    server.shutdown()


@pytest.fixture()
def dsp(dsp_server: MockDspServer) -> MockDspServer:
    dsp_server.log.clear()
    return dsp_server


@pytest.fixture()
def logs_dir(tmp_path: Path) -> Path:
    return tmp_path
