"""CGRID_BROKER_URL: Celery's broker on a Redis of its own, the ledger on another. Triggers
go to the broker only, ledger keys to the ledger only, and the sweeper still finds a lost
trigger by reading the queues on the broker."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from cgrid.errors import ConfigError
from cgrid.ledger import Ledger
from cgrid.redis_server import RedisServer
from cgrid.settings import Settings
from ops.mock_dsp import MockDspServer
from producer import Publisher
from tests.helpers import ROOT, WorkerProcess, fleet_env, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture()
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("broker")).start()
    yield server
    server.stop()


def test_broker_url_defaults_to_the_ledgers_redis() -> None:
    settings = Settings.from_env({"CGRID_REDIS_URL": "redis://127.0.0.1:7000/0"})
    assert settings.broker == "redis://127.0.0.1:7000/0"
    other = Settings.from_env({"CGRID_REDIS_URL": "redis://127.0.0.1:7000/0",
                               "CGRID_BROKER_URL": "redis://127.0.0.1:7001/0"})
    assert (other.broker, other.redis_url) == ("redis://127.0.0.1:7001/0", "redis://127.0.0.1:7000/0")


@pytest.mark.parametrize("url", ["http://127.0.0.1:7001/0", "unix:///tmp/redis.sock", "redis://u:p@ss@h:1/0"])
def test_a_broker_url_that_cannot_work_is_refused_naming_it(url: str) -> None:
    with pytest.raises(ConfigError, match=r"^CGRID_BROKER_URL") as refused:
        Settings.from_env({"CGRID_BROKER_URL": url})
    assert "p@ss" not in str(refused.value)


def test_the_worker_and_the_command_line_refuse_a_bad_broker_url(tmp_path: Path) -> None:
    env = fleet_env("redis://127.0.0.1:1/0", CGRID_BROKER_URL="http://127.0.0.1:2/0")
    cli = subprocess.run([sys.executable, "-m", "ops.cli", "report"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=60)
    assert cli.returncode == 2 and "CGRID_BROKER_URL" in cli.stderr and "Traceback" not in cli.stderr
    worker = subprocess.run([sys.executable, "-m", "celery", "-A", "worker", "worker", "-P", "solo"], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=60)
    assert worker.returncode == 2 and "CGRID_BROKER_URL" in worker.stderr and "Traceback" not in worker.stderr


def test_events_flow_with_the_broker_on_its_own_redis(redis_url: str, broker: RedisServer, dsp: MockDspServer,
                                                      tmp_path: Path) -> None:
    # Triggers with ids (CGRID_SHARED_TRIGGERS=0): the sweeper tells one lost by the queue it
    # reads on the broker. (A shared trigger lost is told by its pending list in the ledger:
    # tests/test_shared_triggers.py.)
    env = fleet_env(redis_url, CGRID_BROKER_URL=broker.url, CGRID_REDELIVER_AFTER_S="1", CGRID_SHARED_TRIGGERS="0")
    settings = Settings.from_env(env)
    ledger_redis, broker_redis = redis.Redis.from_url(redis_url), redis.Redis.from_url(broker.url)
    ledger = Ledger(ledger_redis)
    base = dsp.url

    # Published with no worker running: the ledger holds the events, the broker the trigger.
    with Publisher(settings) as publisher:
        first = [publisher.publish({"id": f"b-{i}", "kind": "burl", "upstream": "s2s", "buyer": "dsp-1",
                                    "url": f"{base}/status/204"}) for i in range(5)]
    assert broker_redis.llen("cgrid.deliver") >= 1 and not ledger_redis.exists("cgrid.deliver")
    assert ledger_redis.exists("cgrid:ev:b-0") and not broker_redis.keys("cgrid:*")

    # The trigger is lost (the broker Redis lost its data, say): a worker's sweeper, reading the
    # queue on the broker, finds it empty and sends the trigger again.
    broker_redis.delete("cgrid.deliver")
    worker = WorkerProcess(env, tmp_path / "worker.log", pool="solo", concurrency=1).start()
    try:
        with Publisher(settings) as publisher:
            later = [publisher.publish({"id": f"c-{i}", "kind": "nurl", "upstream": "s2s", "buyer": "dsp-1",
                                        "url": f"{base}/sequence/500,204?e=c-{i}"}) for i in range(3)]

        def states() -> list[str | None]:
            return [(ledger.record(i) or {}).get("state") for i in first + later]

        wait_for(lambda: set(states()) == {"delivered"}, 60, "every event delivered")
    finally:
        worker.stop()
    assert "resent_lost_triggers" in worker.log_text()
    assert all(ledger.record(i)["attempts"][-1]["status"] == 204 for i in first + later)  # type: ignore[index]
    assert [len((ledger.record(i) or {})["attempts"]) for i in later] == [2, 2, 2]  # one retry, via the broker
    assert not ledger_redis.exists("cgrid.deliver", "cgrid.retry") and not broker_redis.keys("cgrid:*")
