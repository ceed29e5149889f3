"""The alert rules, the Grafana dashboard and docs/metrics.md name only metrics the code exposes.

The exposed names are read from the real registries: a worker's and a coordinator's (built on
fakeredis, never run) and the exporter's (with a snapshot set by hand), so a renamed metric
fails here instead of leaving a silent alert or an empty panel.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import fakeredis
import pytest
import yaml
from prometheus_client import CollectorRegistry

from streamflow import App, Context, Worker
from streamflow.dag.coordinator import Coordinator
from streamflow.ops.exporter import Exporter, Snapshot
from streamflow.ops.inspect import GroupInfo, RoleInfo
from tests.helpers import ROOT

ALERTS = ROOT / "deploy" / "prometheus-alerts.yml"
DASHBOARD = ROOT / "deploy" / "grafana-dashboard.json"
METRICS_DOC = ROOT / "docs" / "metrics.md"

#: A metric name as written in PromQL or prose (env variables are upper case, so not matched).
METRIC_NAME = re.compile(r"\bstreamflow_[a-z0-9_]*[a-z0-9]")
#: The series a family of each type exposes, as suffixes of the family name.
SERIES_SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum"),
    "summary": ("", "_count", "_sum"),
}
SEVERITIES = {"critical", "warning", "info"}
DURATION = re.compile(r"^([0-9]+(ms|s|m|h|d|w|y))+$")


def worker_registry() -> CollectorRegistry:
    app = App()

    @app.role("resize")
    async def resize(ctx: Context, payload: dict[str, Any]) -> None:
        pass

    return Worker(app, fakeredis.FakeAsyncRedis()).enable_metrics()


def exporter_registry() -> CollectorRegistry:
    exporter = Exporter(fakeredis.FakeAsyncRedis())
    group = GroupInfo(
        name="workers",
        consumers=[],
        pending=2,
        lag=3,
        last_delivered_id="1-0",
        oldest_pending_id="1-0",
        oldest_pending_age_ms=1500,
    )
    role = RoleInfo(role="resize", length=5, groups=[group], delayed=1, dead_letters=4)
    exporter.snapshot = Snapshot(
        roles=[role], events_backlog={"resize": 6}, workers=2, tasks={"queued": 1, "running": 2}
    )
    return exporter.registry()


def registries() -> list[CollectorRegistry]:
    """The registries of a worker, a coordinator and the exporter."""
    coordinator = Coordinator(fakeredis.FakeAsyncRedis())
    return [worker_registry(), coordinator.enable_metrics(), exporter_registry()]


def exposed_families() -> dict[str, str]:
    """Every metric family of a worker, a coordinator and the exporter: name -> type."""
    families: dict[str, str] = {}
    for registry in registries():
        for family in registry.collect():
            assert families.setdefault(family.name, family.type) == family.type, family.name
    return families


def exposed_series() -> set[str]:
    """Every series name the processes can expose (labelled families may have no samples yet)."""
    names = {
        name + suffix
        for name, type_ in exposed_families().items()
        for suffix in SERIES_SUFFIXES[type_]
    }
    names |= {sample.name for r in registries() for f in r.collect() for sample in f.samples}
    return names


def referenced(text: str) -> set[str]:
    return set(METRIC_NAME.findall(text))


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def dashboard_targets(board: dict[str, Any]) -> list[dict[str, Any]]:
    return [target for panel in board["panels"] for target in panel.get("targets", [])]


def test_exposed_names_follow_the_naming_rules() -> None:
    families = exposed_families()
    assert "streamflow_messages" in families  # the probe itself works
    for name, type_ in families.items():
        assert re.fullmatch(r"streamflow_[a-z0-9_]+", name), name
        if type_ == "histogram":
            assert name.endswith("_seconds"), name


def test_alert_rules_parse_with_the_prometheus_structure() -> None:
    doc = yaml.safe_load(ALERTS.read_text())
    assert isinstance(doc, dict) and set(doc) == {"groups"}
    names: list[str] = []
    for group in doc["groups"]:
        assert isinstance(group["name"], str) and group["rules"], group
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
            names.append(rule["alert"])
            assert isinstance(rule["expr"], str) and rule["expr"].strip(), rule
            assert DURATION.match(rule.get("for", "0s")), rule
            assert rule["labels"]["severity"] in SEVERITIES, rule
            assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule
    assert len(names) == len(set(names)), "alert names repeat"


def test_alert_rules_cover_the_operational_signals() -> None:
    used = referenced(" ".join(rule["expr"] for rule in alert_rules()))
    for name in (
        "streamflow_pending_entries",
        "streamflow_group_lag",
        "streamflow_oldest_pending_age_seconds",
        "streamflow_dead_letter_depth",
        "streamflow_messages_total",
        "streamflow_handler_duration_seconds_bucket",
        "streamflow_live_workers",
        "streamflow_redis_reconnects_total",
        "streamflow_task_events_backlog",
        "streamflow_oldest_pending_idle_seconds",
        "streamflow_trimmed_pending_entries_total",
        "streamflow_coordinator_trimmed_events_total",
        "streamflow_role_consumer_groups",  # a role nobody serves (issue 18 item 3)
    ):
        assert name in used, name


def test_dashboard_parses_with_its_data_source_and_role_variables() -> None:
    board = dashboard()
    assert 36 <= board["schemaVersion"] <= 41
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    role = variables["role"]
    assert role["query"]["query"] == "label_values(streamflow_messages_total, role)"
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for panel in board["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, panel
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
            assert METRIC_NAME.search(target["expr"]), panel["title"]


def test_queries_name_only_exposed_series() -> None:
    board = dashboard()
    queries = [rule["expr"] for rule in alert_rules()]
    queries += [target["expr"] for target in dashboard_targets(board)]
    queries += [v["query"]["query"] for v in board["templating"]["list"] if v["type"] == "query"]
    unknown = referenced("\n".join(queries)) - exposed_series()
    assert not unknown, f"queries name series the code does not expose: {sorted(unknown)}"


@pytest.mark.parametrize("path", [ALERTS, DASHBOARD, METRICS_DOC], ids=lambda p: p.name)
def test_files_name_only_exposed_metrics(path: Path) -> None:
    # Prose (descriptions, docs) may name a histogram by its family name too.
    families = exposed_families()
    allowed = exposed_series() | {name for name, t in families.items() if t == "histogram"}
    unknown = referenced(path.read_text()) - allowed
    assert not unknown, f"{path.name} names metrics the code does not expose: {sorted(unknown)}"


def test_metrics_doc_documents_every_exposed_metric() -> None:
    documented = referenced(METRICS_DOC.read_text())
    for name, type_ in exposed_families().items():
        series = name + SERIES_SUFFIXES[type_][0]
        assert series in documented, f"{series} is not in docs/metrics.md"


def test_promql_of_rules_and_dashboard_parses_with_promtool(tmp_path: Path) -> None:
    if shutil.which("promtool") is None:
        message = "promtool is not installed (apt-get install prometheus)"
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but {message}", pytrace=False)
        pytest.skip(message)
    checked = subprocess.run(
        ["promtool", "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # The dashboard's queries, with Grafana's variables filled in, as recording rules.
    rules = [
        {
            "record": f"dashboard:query_{i}",
            "expr": target["expr"].replace("$__rate_interval", "5m").replace("$role", ".*"),
        }
        for i, target in enumerate(dashboard_targets(dashboard()))
    ]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    checked = subprocess.run(
        ["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
