"""Grafana dashboards (deploy/helm/asyncopd/dashboards/*.json) and the alert rules: valid JSON, stable unique
uids, a datasource variable, and PromQL that uses only the metrics the services export."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from tests.deploy.chart_support import CONTRACT_METRICS, SERIES_NAMES, chartcheck, promql_metric_names

DASHBOARDS = sorted((chartcheck.CHART / "dashboards").glob("*.json"))


def load(path):
    return json.loads(path.read_text())


def panels(dash):
    stack = list(dash["panels"])
    while stack:
        p = stack.pop(0)
        stack.extend(p.get("panels", []))
        yield p


def test_the_five_dashboards_exist():
    assert {p.stem for p in DASHBOARDS} == {"overview", "rollout", "teacher", "learner", "streams"}


def test_uids_are_stable_and_unique():
    uids = [load(p)["uid"] for p in DASHBOARDS]
    assert len(set(uids)) == len(uids)
    for path in DASHBOARDS:
        assert load(path)["uid"] == f"asyncopd-{path.stem}", "the uid is what links and bookmarks point at"
    titles = [load(p)["title"] for p in DASHBOARDS]
    assert len(set(titles)) == len(titles)


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_dashboard_structure(path):
    dash = load(path)
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert (
        variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    )
    ids = [p["id"] for p in panels(dash)]
    assert len(ids) == len(set(ids)), "panel ids must be unique within a dashboard"
    for p in panels(dash):
        assert {"x", "y", "w", "h"} <= p["gridPos"].keys()
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}"
            assert t["expr"].strip()
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs))


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_queries_use_only_exported_metrics_and_known_variables(path):
    dash = load(path)
    variables = {v["name"] for v in dash["templating"]["list"]} | {"__rate_interval", "__interval", "__range"}
    for p in panels(dash):
        for t in p.get("targets", []):
            expr = t["expr"]
            names = promql_metric_names(expr)
            assert names, f"{p['title']}: no metric in {expr}"
            assert names <= SERIES_NAMES, (
                f"{p['title']}: {sorted(names - SERIES_NAMES)} are not exported metrics"
            )
            for var in re.findall(r"\$(\w+)", expr):
                assert var in variables, f"{p['title']}: unknown variable ${var}"
            assert 'namespace=~"$namespace"' in expr, f"{p['title']}: every selector filters on $namespace"
            # Every substituted query must be something a plain Prometheus runs (checked by promtool below).
            assert "$" not in chartcheck.substitute(expr)


def test_every_exported_metric_is_on_some_dashboard():
    used = set()
    for path in DASHBOARDS:
        for p in panels(load(path)):
            for t in p.get("targets", []):
                used |= promql_metric_names(t["expr"])
    base = {n.removesuffix("_bucket").removesuffix("_sum").removesuffix("_count") for n in used}
    assert CONTRACT_METRICS <= base, f"not shown anywhere: {sorted(CONTRACT_METRICS - base)}"


def test_overview_shows_progress_version_throughput_staleness_and_drops():
    used = set()
    kinds = set()
    for p in panels(load(chartcheck.CHART / "dashboards" / "overview.json")):
        kinds.add(p["type"])
        for t in p.get("targets", []):
            used |= promql_metric_names(t["expr"])
    assert {
        "asyncopd_job_step",
        "asyncopd_jobs",
        "asyncopd_policy_version",
        "asyncopd_samples_trained_total",
        "asyncopd_sample_staleness_bucket",
        "asyncopd_samples_dropped_stale_total",
    } <= used
    assert "heatmap" in kinds


def test_dashboard_queries_parse_with_promtool(chart_tools):
    chartcheck.check_dashboard_promql()


def test_alert_rules_use_only_exported_metrics(rendered):
    (rule,) = [m for m in rendered["monitoring"] if m["kind"] == "PrometheusRule"]
    for group in rule["spec"]["groups"]:
        for r in group["rules"]:
            names = promql_metric_names(r["expr"])
            assert names and names <= SERIES_NAMES, f"{r['alert']}: {sorted(names - SERIES_NAMES)}"
            assert r["labels"]["severity"] in {"warning", "critical"}
            assert r["annotations"]["summary"] and r["annotations"]["description"]


def test_promtool_checks_and_unit_tests_the_alert_rules(chart_tools):
    chartcheck.check_rules()
    tested = set()
    for path in chartcheck.PROM_DIR.glob("*.test.yaml"):
        for case in yaml.safe_load(path.read_text())["tests"]:
            for t in case.get("alert_rule_test", []):
                if t.get("exp_alerts"):
                    tested.add(t["alertname"])
    rules = yaml.safe_load((chartcheck.OUT / "prometheus" / "asyncopd.rules.yaml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    assert alerts == tested, f"alerts without a firing unit test: {sorted(alerts - tested)}"
