"""The dashboard and the alert rules against a real Prometheus (Debian's ``prometheus``;
.ci/run installs it): it scrapes a real worker while events flow to a healthy, a failing
(500) and a hanging buyer, and to a buyer whose queue no worker consumes. Every expression of
the dashboard is asked through the HTTP API and must be accepted, and nearly all return data;
every rule evaluates healthy; CgridBuyerFailing fires for the failing buyer within its for:
and never for the healthy one."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from archive.files import ensure_group
from cgrid.redis_server import free_port
from cgrid.settings import Settings
from ops.mock_dsp import MockDspServer
from producer import Publisher
from tests.helpers import WorkerProcess, fleet_env, wait_for
from tests.test_deploy import PROMETHEUS_CONFIG, RULES, alert_rules, dashboard_exprs

pytestmark = pytest.mark.integration

PROMETHEUS = shutil.which("prometheus")
INTERVAL_S = 1  # scrape and rule evaluation
RATE_INTERVAL = "15s"  # what Grafana's $__rate_interval stands for here
BUYERS = {"healthy": "/status/204", "failing": "/status/500", "hanging": "/sleep/3000", "orphan": "/status/204"}


class Prometheus:
    """A real prometheus on a free loopback port, scraping the worker with deploy/'s config
    (its job, its rules) and short intervals."""

    def __init__(self, workdir: Path, target_port: int) -> None:
        config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
        config["global"].update(scrape_interval=f"{INTERVAL_S}s", evaluation_interval=f"{INTERVAL_S}s")
        config["rule_files"] = [str(RULES)]
        (job,) = config["scrape_configs"]
        del job["dns_sd_configs"]  # docker's DNS: here the one worker, on loopback
        job["static_configs"] = [{"targets": [f"127.0.0.1:{target_port}"]}]
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.port = free_port()
        self.log_path = workdir / "prometheus.log"
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [str(PROMETHEUS), f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self._log, stderr=subprocess.STDOUT)

    def api(self, path: str, **params: str) -> Any:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as response:  # loopback only
                return json.loads(response.read())
        except urllib.error.HTTPError as e:  # a refused query: 400 with {"status": "error", ...}
            return json.loads(e.read())

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2):
                return True
        except OSError:
            assert self.process.poll() is None, self.log_path.read_text()[-3000:]
            return False

    def query(self, expr: str) -> Any:
        return self.api("query", query=expr)

    def alerts(self, name: str) -> list[dict[str, Any]]:
        return [a for a in self.api("alerts")["data"]["alerts"] if a["labels"]["alertname"] == name]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()


def publish_until(stop: threading.Event, settings: Settings, base_url: str, run: str) -> None:
    """Every 0.2 s, one event to each buyer, until ``stop``."""
    with Publisher(settings) as publisher:
        n = 0
        while not stop.is_set():
            publisher.publish_many([{"id": f"{run}-{buyer}-{n}", "kind": "burl" if n % 2 else "nurl",
                                     "upstream": "s2s", "buyer": buyer, "url": f"{base_url}{path}?n={n}"}
                                    for buyer, path in BUYERS.items()])
            n += 1
            stop.wait(0.2)


def dashboard_query(expr: str) -> str:
    """A dashboard expression as Grafana sends it with every buyer selected."""
    return expr.replace("$__rate_interval", RATE_INTERVAL).replace("$buyer", ".*")


@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus is not installed (Debian: apt-get install prometheus; "
                    ".ci/run installs it)")
@pytest.mark.timeout(240)
def test_a_real_prometheus_runs_the_dashboard_and_the_alerts(redis_url: str, dsp: MockDspServer,
                                                            tmp_path: Path) -> None:
    metrics_port = free_port()
    env = fleet_env(redis_url, CGRID_METRICS_PORT=metrics_port, CGRID_RETRY_DELAY_S="0.5",
                    CGRID_BUYER_QUEUES="cgrid.orphan=orphan")
    ensure_group(redis.Redis.from_url(redis_url))  # the archive on (no archiver): its gauges are set
    # The worker consumes the default queues only: the orphan buyer's queue has no consumer.
    worker = WorkerProcess(env, tmp_path / "worker.log", pool="solo",
                           queues="cgrid.deliver,cgrid.retry").start()
    prometheus = Prometheus(tmp_path, metrics_port)
    stop = threading.Event()
    publisher = threading.Thread(target=publish_until, daemon=True,
                                 args=(stop, Settings.from_env(env), dsp.url, uuid.uuid4().hex[:6]))
    try:
        wait_for(prometheus.ready, 30, "prometheus to be ready")
        publisher.start()
        started = time.monotonic()
        wait_for(lambda: [r["value"][1] for r in prometheus.query('up{job="cgrid-workers"}')["data"]["result"]]
                 == ["1"], 30, "prometheus to scrape the worker")

        # Every rule is loaded (the file's alerts, no more, no fewer) and evaluates healthy.
        names = {rule["alert"] for rule in alert_rules()}

        def rules_evaluated() -> list[dict[str, Any]] | None:
            rules = [r for g in prometheus.api("rules")["data"]["groups"] for r in g["rules"]]
            done = all(not r["lastEvaluation"].startswith("0001") for r in rules)
            return rules if rules and done else None

        rules = wait_for(rules_evaluated, 30, "every rule evaluated")
        assert {r["name"] for r in rules} == names
        for rule in rules:
            assert rule["health"] == "ok" and not rule.get("lastError"), rule

        # Every dashboard expression is accepted; nearly all return data once events flowed.
        exprs = [dashboard_query(e) for e in dashboard_exprs()]
        answers: dict[str, Any] = {}

        def all_answer_data() -> bool:
            answers.update({e: prometheus.query(e) for e in exprs})
            refused = {e: a for e, a in answers.items() if a["status"] != "success"}
            assert not refused, refused
            return all(a["data"]["result"] for a in answers.values())

        try:
            wait_for(all_answer_data, 40, "every dashboard expression to return data")
        except AssertionError as e:
            if "timed out" not in str(e):
                raise
        empty = [e for e, a in answers.items() if not a["data"]["result"]]
        assert len(empty) <= len(exprs) // 10, f"no data for {empty}"
        buyers = prometheus.api("label/buyer/values", **{"match[]": "cgrid_attempts_total"})["data"]
        assert {"healthy", "failing", "hanging"} <= set(buyers)  # the dashboard's $buyer choices

        # What the new gauges show live: the orphan buyer's queue stalls, its lane never starts.
        stalled = prometheus.query('max by (queue) (cgrid_queue_stalled_seconds{queue="cgrid.orphan"})')
        assert float(stalled["data"]["result"][0]["value"][1]) > 5
        delay = prometheus.query(dashboard_query(
            'histogram_quantile(0.5, sum by (le) (rate(cgrid_first_attempt_delay_seconds_bucket[$__rate_interval])))'))
        assert 0 < float(delay["data"]["result"][0]["value"][1]) < 5

        # The buyer-failing alert fires for the failing buyer once its for: has passed.
        (failing_rule,) = [r for r in rules if r["name"] == "CgridBuyerFailing"]
        for_s = failing_rule["duration"]

        def failing_fires() -> dict[str, Any] | None:
            firing = [a for a in prometheus.alerts("CgridBuyerFailing") if a["labels"]["buyer"] == "failing"
                      and a["state"] == "firing"]
            return firing[0] if firing else None

        alert = wait_for(failing_fires, for_s + 60, f"CgridBuyerFailing to fire for the failing buyer (for: {for_s}s)")
        fired_after_s = time.monotonic() - started
        assert for_s <= fired_after_s <= for_s + 60
        assert alert["labels"]["severity"] == "warning"
        assert alert["annotations"]["runbook_url"] == "docs/troubleshooting.md#2-a-buyer-down"
        assert not [a for a in prometheus.alerts("CgridBuyerFailing") if a["labels"]["buyer"] == "healthy"]
        # The hanging buyer's lane narrowed: its alert is on its way (for: 5m).
        assert [a for a in prometheus.alerts("CgridBuyerThrottled") if a["labels"]["buyer"] == "hanging"]
        for rule in [r for g in prometheus.api("rules")["data"]["groups"] for r in g["rules"]]:
            assert rule["health"] == "ok", rule
    finally:
        stop.set()
        publisher.join(timeout=10)
        prometheus.stop()
        worker.stop()
