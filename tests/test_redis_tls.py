"""Redis with TLS (client certificates required) and an ACL user, end to end: the producer,
a real worker, the command line and Flower all reach it through ``rediss://`` with a CA and
a client certificate made in the test; no password shows in any log or message."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import trustme

from cgrid.ledger import Ledger
from cgrid.redis_conn import redis_client
from cgrid.redis_server import RedisServer, free_port
from cgrid.settings import Settings
from ops.mock_dsp import MockDspServer
from producer import Publisher
from tests.helpers import ROOT, WorkerProcess, fleet_env, get_json, wait_for

pytestmark = pytest.mark.integration

PASSWORD = "tls-test-" + uuid.uuid4().hex  # must never show in a log line or a message
USER = "cgrid"


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    folder = tmp_path_factory.mktemp("tls-redis")
    ca = trustme.CA()
    server_cert = ca.issue_cert("127.0.0.1", "localhost")
    client_cert = ca.issue_cert("cgrid-worker")
    files = {name: str(folder / name) for name in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}
    ca.cert_pem.write_to_path(files["ca.pem"])
    server_cert.cert_chain_pems[0].write_to_path(files["server.pem"])
    server_cert.private_key_pem.write_to_path(files["server.key"])
    client_cert.cert_chain_pems[0].write_to_path(files["client.pem"])
    client_cert.private_key_pem.write_to_path(files["client.key"])
    port = free_port()
    url = f"rediss://{USER}:{PASSWORD}@127.0.0.1:{port}/0"
    tls = {"ssl_ca_certs": files["ca.pem"], "ssl_certfile": files["client.pem"], "ssl_keyfile": files["client.key"]}
    server = RedisServer(
        folder / "data", port,
        extra_args=["--port", "0", "--tls-port", str(port),
                    "--tls-cert-file", files["server.pem"], "--tls-key-file", files["server.key"],
                    "--tls-ca-cert-file", files["ca.pem"], "--tls-auth-clients", "yes",
                    "--user", "default", "off",
                    "--user", USER, "on", f">{PASSWORD}", "~*", "&*", "+@all"],
        client_options=tls, url=url,
    ).start()
    env = fleet_env(url, CGRID_REDIS_CA_FILE=files["ca.pem"], CGRID_REDIS_CERT_FILE=files["client.pem"],
                    CGRID_REDIS_KEY_FILE=files["client.key"], FLOWER_UNAUTHENTICATED_API="true")
    yield {"server": server, "env": env, "port": port, "files": files, "tls": tls}
    server.stop()


def test_the_server_really_requires_tls_a_client_certificate_and_the_password(tls_redis: dict[str, Any]) -> None:
    port, tls = tls_redis["port"], tls_redis["tls"]
    with pytest.raises(redis.ConnectionError):  # plain TCP to the TLS port
        redis.Redis(port=port, username=USER, password=PASSWORD, socket_timeout=2).ping()
    without_cert = {"ssl_ca_certs": tls["ssl_ca_certs"]}
    with pytest.raises(redis.ConnectionError):
        redis.Redis(port=port, ssl=True, username=USER, password=PASSWORD, socket_timeout=2, **without_cert).ping()
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=port, ssl=True, username=USER, password="wrong", **tls).ping()
    assert redis.Redis(port=port, ssl=True, username=USER, password=PASSWORD, **tls).ping()


def test_publish_deliver_status_report_and_flower_over_tls(
    tls_redis: dict[str, Any], dsp: MockDspServer, tmp_path: Path
) -> None:
    env = tls_redis["env"]
    settings = Settings.from_env(env)
    flower_port = free_port()
    flower_log_path = tmp_path / "flower.log"
    flower_log = open(flower_log_path, "wb")
    flower = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "worker", "flower", f"--port={flower_port}", "--address=127.0.0.1"],
        cwd=ROOT, env=env, stdout=flower_log, stderr=subprocess.STDOUT,
    )
    worker = WorkerProcess(env, tmp_path / "worker.log", pool="solo", name="tls").start()
    try:
        api = f"http://127.0.0.1:{flower_port}/api"
        wait_for(lambda: get_json(f"{api}/workers?refresh=1"), 30, "Flower to answer")
        buyer = f"tls-{uuid.uuid4().hex[:6]}"
        with Publisher(settings) as publisher:
            ids = [publisher.publish({"kind": "burl", "upstream": "s2s", "buyer": buyer,
                                      "url": f"{dsp.url}/status/204?e={buyer}-{i}"}) for i in range(20)]
        ledger = Ledger(redis_client(settings, socket_timeout_s=2, socket_connect_timeout_s=2))

        def all_delivered() -> bool:
            return all((ledger.record(i) or {}).get("state") == "delivered" for i in ids)

        wait_for(all_delivered, 30, "the events to be delivered over TLS")
        # (the buyer server is shared with the session's other tests: count this test's calls)
        assert len([c for c in dsp.log.snapshot() if f"e={buyer}-" in c["target"]]) == 20

        # Flower's tasks come from the worker's events over the TLS broker; its broker view
        # (queue lengths) opens its own TLS connection.
        def flower_saw_task() -> bool:
            tasks = get_json(f"{api}/tasks?taskname=cgrid.deliver") or {}
            return any(ids[0] in (task.get("args") or "") + (task.get("result") or "") for task in tasks.values())

        wait_for(flower_saw_task, 30, "Flower to list a delivery task")
        queues = wait_for(lambda: get_json(f"{api}/queues/length"), 30, "Flower's queue lengths over TLS")
        assert "active_queues" in queues

        cli = [sys.executable, "-m", "ops.cli"]
        status = subprocess.run([*cli, "status", ids[0]], cwd=ROOT, env=env, capture_output=True, text=True,
                                timeout=30)
        assert status.returncode == 0, status.stderr
        assert "delivered" in status.stdout
        report = subprocess.run([*cli, "report", "--json", "--buyer", buyer], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=30)
        assert report.returncode == 0, report.stderr
        [row] = json.loads(report.stdout)
        assert (row["buyer"], row["events"], row["delivered_first"]) == (buyer, 20, 20)

        # A wrong password: a clear error, exit 2, no traceback, and the password masked.
        bad_env = dict(env, CGRID_REDIS_URL=env["CGRID_REDIS_URL"].replace(PASSWORD, "not-the-password"))
        bad = subprocess.run([*cli, "status", ids[0]], cwd=ROOT, env=bad_env, capture_output=True, text=True,
                             timeout=30)
        assert bad.returncode == 2
        assert "Traceback" not in bad.stderr
        assert "not-the-password" not in bad.stderr + bad.stdout
        assert "***" in bad.stderr
        outputs = status.stdout + status.stderr + report.stdout + report.stderr
    finally:
        worker.stop()
        flower.terminate()
        flower.wait(timeout=10)
        flower_log.close()
    logs = worker.log_text() + flower_log_path.read_text(errors="replace") + outputs
    assert "ready." in logs
    assert PASSWORD not in logs
    assert PASSWORD not in os.environ.get("CGRID_REDIS_URL", "")
