"""What deploy/ ships: the alert rules (checked and unit-tested by promtool when it is on
PATH — .ci/run installs it), the Grafana dashboard, and docker-compose.yml's Prometheus and
Grafana. The same rules and dashboard run against a real Prometheus in test_prometheus.py."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import ROOT

DEPLOY = ROOT / "deploy"
RULES = DEPLOY / "prometheus" / "alerts.yml"
RULE_TESTS = DEPLOY / "prometheus" / "alerts_test.yml"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "cgrid-s2s.json"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not on PATH (Debian: apt-get install "
                                    "prometheus; .ci/run installs it)")


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def dashboard_panels() -> list[dict[str, Any]]:
    return [p for p in json.loads(DASHBOARD.read_text())["panels"] if p["type"] != "row"]


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard_panels() for t in p["targets"]]


def anchors(markdown: Path) -> set[str]:
    """The anchors GitHub makes of a page's headings."""
    return {re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
            for line in markdown.read_text().splitlines() if line.startswith("#")}


def exported_names() -> set[str]:
    """Every sample name cgrid/metrics.py exports (counters with _total, histograms' series)."""
    source = (ROOT / "cgrid" / "metrics.py").read_text()
    names: set[str] = set()
    for kind, name in re.findall(r"\b(Counter|Gauge|Histogram)\(\s*\"(cgrid_\w+)\"", source):
        names |= {"Counter": {name + "_total"}, "Gauge": {name},
                  "Histogram": {name + "_bucket", name + "_sum", name + "_count"}}[kind]
    return names


@needs_promtool
def test_promtool_accepts_the_config_and_the_rules() -> None:
    result = subprocess.run([str(PROMTOOL), "check", "config", str(PROMETHEUS_CONFIG)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


@needs_promtool
def test_the_alert_rules_pass_their_promtool_unit_tests() -> None:
    result = subprocess.run([str(PROMTOOL), "test", "rules", str(RULE_TESTS)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_waits_has_a_severity_and_a_runbook_that_exists() -> None:
    rules = alert_rules()
    assert len(rules) >= 6
    runbook_anchors = anchors(ROOT / "docs" / "troubleshooting.md")
    for rule in rules:
        name = rule["alert"]
        assert re.fullmatch(r"\d+[smh]", str(rule.get("for", ""))), f"{name}: no for:"
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        page, _, anchor = rule["annotations"]["runbook_url"].partition("#")
        assert page == "docs/troubleshooting.md" and anchor in runbook_anchors, f"{name}: runbook {anchor!r}"
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name


def test_every_alert_has_a_unit_test_that_makes_it_fire() -> None:
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    fired = {case["alertname"] for test in tests for case in test["alert_rule_test"] if case["exp_alerts"]}
    assert {rule["alert"] for rule in alert_rules()} <= fired


def test_rules_and_dashboard_use_only_metrics_the_workers_export() -> None:
    known = exported_names() | {"up"}
    assert "cgrid_first_attempt_delay_seconds_bucket" in known and "cgrid_attempts_total" in known
    for expr in [rule["expr"] for rule in alert_rules()] + dashboard_exprs():
        used = set(re.findall(r"\b(cgrid_\w+|up)\b(?=\s*[{\[)])", expr))
        assert used, expr
        assert used <= known, f"unknown metric {used - known} in {expr}"


def test_the_dashboard_is_a_grafana_dashboard_with_the_panels_on_call_needs() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "cgrid-s2s" and dashboard["schemaVersion"] >= 36 and dashboard["id"] is None
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["buyer"]["multi"] and variables["buyer"]["includeAll"] and variables["buyer"]["allValue"] == ".*"
    panels = dashboard_panels()
    assert len(panels) >= 12
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        mine = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not mine & cells, f"{panel['title']} overlaps another panel"
        cells |= mine
    for panel in panels:
        assert panel["type"] in ("timeseries", "stat") and panel["description"], panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"] and target["refId"]
            assert set(re.findall(r"\$\w+", target["expr"])) <= {"$buyer", "$__rate_interval"}, target["expr"]
    exprs = " ".join(dashboard_exprs())
    for needed in ("cgrid_events_finished_total", "cgrid_attempt_duration_seconds_bucket",
                   "cgrid_retries_scheduled_total", "cgrid_lane_in_flight", "cgrid_lane_cap", "cgrid_lane_throttled",
                   "cgrid_lane_parked_total", "cgrid_parked_events", "cgrid_open_events", "cgrid_due_events",
                   "cgrid_queue_depth", "cgrid_archive_backlog", "cgrid_archive_oldest_seconds",
                   "cgrid_first_attempt_delay_seconds_bucket"):
        assert needed in exprs, needed


def test_operations_md_explains_every_panel_and_every_alert() -> None:
    operations = (ROOT / "docs" / "operations.md").read_text()
    for panel in dashboard_panels():
        assert f"**{panel['title']}**" in operations, panel["title"]
    for rule in alert_rules():
        assert f"`{rule['alert']}`" in operations, rule["alert"]


def test_docker_compose_runs_prometheus_on_the_workers_and_grafana_with_the_dashboard() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "cgrid-workers"  # the job the rules' up{job=...} name
    assert 'up{job="cgrid-workers"}' in RULES.read_text()
    (discovery,) = job["dns_sd_configs"]
    assert discovery["names"] == ["worker"] and "worker" in services
    assert str(discovery["port"]) == services["worker"]["environment"]["CGRID_METRICS_PORT"]
    assert config["rule_files"] == ["alerts.yml"]

    def mounts(service: str) -> dict[str, str]:
        pairs = [volume.split(":")[:2] for volume in services[service]["volumes"]]
        return {target: source for source, target in pairs}

    prometheus = mounts("prometheus")
    assert (ROOT / prometheus["/etc/prometheus"]).resolve() == PROMETHEUS_CONFIG.parent
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]
    grafana = mounts("grafana")
    assert (ROOT / grafana["/var/lib/grafana/dashboards/cgrid-s2s.json"]).resolve() == DASHBOARD
    provisioning = ROOT / grafana["/etc/grafana/provisioning"]
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "cgrid-s2s.yml").read_text())["providers"]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    for service in ("prometheus", "grafana"):  # on loopback only, as Flower
        assert all(port.startswith("127.0.0.1:") for port in services[service]["ports"])
