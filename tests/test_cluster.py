"""The ledger on a real Redis Cluster (three primaries with a replica each, on loopback), the
broker on a Redis of its own: events spread over the partitions and the primaries, and
publish -> deliver -> status, report, replay and archive cover every partition."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from archive.files import read_lines
from cgrid.ledger.partitions import CLUSTER_PARTITIONS, PartitionedLedger, partition_tags
from cgrid.redis_conn import long_lived_client
from cgrid.redis_server import RedisServer
from cgrid.settings import Settings
from ops.mock_dsp import MockDspServer
from producer import Publisher
from tests.cluster import Cluster
from tests.helpers import ROOT, WorkerProcess, fleet_env, wait_for

pytestmark = pytest.mark.integration
TERMINAL = {"delivered", "failed", "rejected", "expired"}


def test_partition_tags_spread_evenly_over_the_slots() -> None:
    from redis.crc import key_slot

    tags = partition_tags(CLUSTER_PARTITIONS)
    assert len(set(tags)) == CLUSTER_PARTITIONS
    slots = [key_slot(f"cgrid:{{{tag}}}:due".encode()) for tag in tags]
    # partition i's slot lies in the i-th twelfth: three primaries with even ranges get 4 each
    assert [slot * CLUSTER_PARTITIONS // 16384 for slot in slots] == list(range(CLUSTER_PARTITIONS))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("cluster")).start()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("broker")).start()
    yield server
    server.stop()


@pytest.fixture()
def env(cluster: Cluster, broker: RedisServer) -> dict[str, str]:
    return fleet_env(cluster.url, CGRID_REDIS_CLUSTER="1", CGRID_BROKER_URL=broker.url,
                     CGRID_REDIS_WAIT_REPLICAS="1", CGRID_REDIS_WAIT_TIMEOUT_MS="200")


def cli(env: dict[str, str], *args: str, input_text: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ops.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, input=input_text, timeout=120)


def test_cluster_mode_without_a_broker_of_its_own_is_refused(cluster: Cluster) -> None:
    env = fleet_env(cluster.url, CGRID_REDIS_CLUSTER="1")
    out = cli(env, "report")
    assert out.returncode == 2 and "CGRID_BROKER_URL" in out.stderr and "Traceback" not in out.stderr
    worker = subprocess.run([sys.executable, "-m", "celery", "-A", "worker", "worker", "-P", "solo"], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=60)
    assert worker.returncode == 2 and "CGRID_BROKER_URL" in worker.stderr and "Traceback" not in worker.stderr


def test_events_flow_over_every_partition(cluster: Cluster, env: dict[str, str], dsp: MockDspServer,
                                          tmp_path: Path) -> None:
    settings = Settings.from_env(env)
    ledger = PartitionedLedger(long_lived_client(settings))
    run = uuid.uuid4().hex[:6]
    buyer = f"dsp-{run}"
    ok = [f"{run}-ok-{i}" for i in range(300)]
    retried = [f"{run}-retry-{i}" for i in range(24)]
    failed = [f"{run}-fail-{i}" for i in range(12)]
    events = ([{"id": i, "kind": "burl", "upstream": "s2s", "buyer": buyer, "url": f"{dsp.url}/status/204?e={i}"}
               for i in ok]
              + [{"id": i, "kind": "nurl", "upstream": "s2s", "buyer": buyer,
                  "url": f"{dsp.url}/sequence/500,204?e={i}"} for i in retried]
              + [{"id": i, "kind": "burl", "upstream": "s2s", "buyer": buyer, "url": f"{dsp.url}/status/500?e={i}"}
                 for i in failed])
    assert {ledger.partition_of(e["id"]) for e in events} == set(range(CLUSTER_PARTITIONS))

    archive_dir = tmp_path / "archive"
    archiver = subprocess.Popen([sys.executable, "-m", "ops.cli", "archive", "--dir", str(archive_dir),
                                 "--name", "a1"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                stderr=open(tmp_path / "archiver.log", "wb"))
    worker = WorkerProcess(env, tmp_path / "worker.log", pool="solo", concurrency=1).start()
    try:
        time.sleep(1)  # the archiver makes its streams' groups first
        with Publisher(settings) as publisher:
            publisher.publish_many(events)
        ids = [e["id"] for e in events]

        def final() -> bool:
            return all((ledger.record(i) or {}).get("state") in TERMINAL for i in ids)

        wait_for(final, 90, "every event final")
        states = {i: ledger.record(i)["state"] for i in ids}  # type: ignore[index]
        assert {states[i] for i in ok + retried} == {"delivered"}
        assert {states[i] for i in failed} == {"failed"}
        calls: dict[str, int] = {}
        for call in dsp.log.snapshot():
            if "e=" in call["target"]:
                event_id = call["target"].split("e=", 1)[1]
                calls[event_id] = calls.get(event_id, 0) + 1
        assert all(calls.get(i) == 1 for i in ok)
        assert all(calls.get(i) == 2 for i in retried + failed)

        # Every primary holds a share of the events' records (20-47% each with three).
        shares = cluster.keys_per_primary(f"cgrid:{{*}}:ev:{run}-*")
        total = sum(shares.values())
        assert total == len(events)
        assert all(0.20 <= count / total <= 0.47 for count in shares.values()), shares

        # status and report read across the partitions.
        status = cli(env, "status", retried[0])
        assert status.returncode == 0, status.stderr
        assert [a["status"] for a in json.loads(status.stdout)["attempts"]] == [500, 204]
        report = cli(env, "report", "--json", "--buyer", buyer)
        [row] = json.loads(report.stdout)
        assert (row["events"], row["delivered_first"], row["delivered_retry"], row["failed"]) == (
            len(events), len(ok), len(retried), len(failed))

        # replay finds the failed events of every partition.
        day = time.strftime("%Y-%m-%d", time.gmtime())
        replay = cli(env, "replay", "--buyer", buyer, "--day", day)
        assert replay.returncode == 0, replay.stderr
        replayed = [f"{i}:replay1" for i in failed]
        wait_for(lambda: all((ledger.record(i) or {}).get("state") in TERMINAL for i in replayed), 60,
                 "the replays final")

        # The archive gets one line per final record, from every partition's stream.
        def archived() -> list[dict[str, Any]]:
            lines = [record for path in sorted((archive_dir / day).glob("*.jsonl")) for _, record in read_lines(path)]
            return [r for r in lines if r["id"].startswith(run)]

        lines = wait_for(lambda: (found := archived()) and len(found) >= len(events) + len(failed) and found, 60,
                         "every final record archived")
        assert sorted(r["id"] for r in lines) == sorted(ids + replayed)
        assert len({r["entry"] for r in lines}) == len(lines)  # entries unique across partitions
        assert len(list((archive_dir / day).glob("a1.*.jsonl"))) == CLUSTER_PARTITIONS
        # reconcile reads every partition's stream and ledger records, and the partitions' files.
        export = tmp_path / "theirs.csv"
        export.write_text("id\n" + "".join(f"{i}\n" for i in ok + retried))
        rec = cli({**env, "CGRID_ARCHIVE_DIR": str(archive_dir)}, "reconcile", "--buyer", buyer, "--date", day,
                  str(export), "--json")
        assert rec.returncode == 0, rec.stderr
        summary = json.loads(rec.stdout)
        assert (summary["ours"], summary["theirs"], summary["matched"]) == (len(ok + retried),) * 3
        # What the metrics read, over every partition.
        assert wait_for(lambda: ledger.archive_backlog() == (0, 0.0), 30, "the archive streams empty")
        assert ledger.backlog() == (0, {}) and ledger.open_events() == {"nurl": 0, "burl": 0}
    finally:
        worker.stop()
        archiver.terminate()
        archiver.wait(timeout=30)


def test_a_cluster_whose_port_was_taken_starts_on_other_ports(tmp_path: Path) -> None:
    """A port found free can be taken before its node binds it (a client's ephemeral port):
    the cluster stops the nodes it started and tries other ports, leaving none behind."""
    import socket

    c = Cluster(tmp_path / "cluster", start_port=38000)
    taken = c.ports[2]
    first_nodes = list(c.nodes.values())
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", taken))
        squatter.listen()
        c.start()
    try:
        assert taken not in c.ports
        assert all(node.process is None or node.process.poll() is not None for node in first_nodes)
        client = c.client()
        client.set("k", "v")
        assert client.get("k") == b"v"
    finally:
        c.stop()
