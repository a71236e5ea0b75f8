"""Flower, a real process, sees the delivery tasks through its HTTP API (task events on)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cgrid.redis_server import RedisServer, free_port
from cgrid.settings import Settings
from ops.mock_dsp import MockDspServer
from producer import Publisher
from tests.helpers import ROOT, WorkerProcess, fleet_env, get_json, wait_for

pytestmark = pytest.mark.integration


def test_flower_lists_a_delivered_task(redis_server: RedisServer, dsp: MockDspServer, tmp_path: Path) -> None:
    env = fleet_env(redis_server.url, FLOWER_UNAUTHENTICATED_API="true")
    port = free_port()
    flower_log = open(tmp_path / "flower.log", "wb")
    flower = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "worker", "flower", f"--port={port}", "--address=127.0.0.1"],
        cwd=ROOT, env=env, stdout=flower_log, stderr=subprocess.STDOUT,
    )
    worker = WorkerProcess(env, tmp_path / "worker.log", name="flower-test").start()
    try:
        api = f"http://127.0.0.1:{port}/api"
        wait_for(lambda: get_json(f"{api}/workers?refresh=1"), 30, "Flower to answer")
        with Publisher(Settings.from_env(env)) as publisher:
            event_id = publisher.publish({"kind": "burl", "upstream": "s2s", "url": f"{dsp.url}/status/204?f=1"})

        def delivered_task() -> dict[str, Any] | None:
            tasks = get_json(f"{api}/tasks?taskname=cgrid.deliver") or {}
            for task in tasks.values():  # (a shared trigger's result names the first ids it took)
                if event_id in (task.get("args") or "") + (task.get("result") or "") and task.get("state") == "SUCCESS":
                    return task  # type: ignore[no-any-return]
            return None

        task = wait_for(delivered_task, 30, "Flower to list the delivered task")
        assert task["name"] == "cgrid.deliver"
        assert "'claimed': 1" in task["result"]
        # The broker view (queue lengths) knows the broker URL's scheme: the hardened
        # transport is picked by scheme, not by a transport name Flower cannot read.
        queues = wait_for(lambda: get_json(f"{api}/queues/length"), 30, "Flower's queue lengths")
        assert "cgrid.deliver" in [queue["name"] for queue in queues["active_queues"]]
    finally:
        worker.stop()
        flower.terminate()
        flower.wait(timeout=10)
        flower_log.close()
