"""Shared by the tests of tests/deploy: the chartcheck module and the service metric contract."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def deploy_script(name: str):
    """A script of deploy/ (chartcheck, imagescheck) as a module."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "deploy" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


chartcheck = deploy_script("chartcheck")

# The metric names the services export (DESIGN.md §4 and the service contract). Dashboards and alerts may
# use nothing else.
HISTOGRAMS = {
    "asyncopd_sample_staleness",
    "asyncopd_teacher_score_seconds",
    "asyncopd_learner_step_seconds",
    "asyncopd_weight_publish_seconds",
    "asyncopd_weight_reload_seconds",
    "asyncopd_http_request_seconds",
}
COUNTERS = {
    "asyncopd_samples_dropped_stale_total",
    "asyncopd_samples_trained_total",
    "asyncopd_prompts_released_total",
    "asyncopd_rollout_tokens_generated_total",
    "asyncopd_rollout_samples_total",
    "asyncopd_teacher_samples_total",
    "asyncopd_dead_letter_entries_total",
    "asyncopd_phase_seconds_total",
    "asyncopd_weight_transfer_rounds_total",
    "asyncopd_weight_sync_fallbacks_total",
}
GAUGES = {
    "asyncopd_stream_pending_entries",
    "asyncopd_stream_length_entries",
    "asyncopd_learner_loss",
    "asyncopd_learner_kl",
    "asyncopd_policy_version",
    "asyncopd_jobs",
    "asyncopd_job_step",
    "asyncopd_learner_objective",
}
CONTRACT_METRICS = HISTOGRAMS | COUNTERS | GAUGES
# Series names a query may select: histograms expose _bucket/_sum/_count.
SERIES_NAMES = COUNTERS | GAUGES | {f"{h}{s}" for h in HISTOGRAMS for s in ("_bucket", "_sum", "_count")}


def render_with(*args: str):
    """helm template with the default values plus args; returns the completed process."""
    return chartcheck.helm_template(list(args))


_LABEL_LISTS = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "offset",
    "and",
    "or",
    "unless",
    "inf",
    "nan",
    "atan2",
}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (functions, keywords, labels, Grafana variables removed)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals (label values)
    e = re.sub(r"\{[^}]*\}", "", e)  # label matchers
    e = re.sub(r"\[[^\]]*\]", "", e)  # ranges and subqueries
    e = _LABEL_LISTS.sub("", e)  # by (...), on (...), ...
    e = re.sub(r"\$\w+", "", e)  # Grafana variables
    names = set()
    for m in re.finditer(r"(?<![\w.$])[A-Za-z_:][A-Za-z0-9_:]*", e):
        if e[m.end() :].lstrip().startswith("(") or m.group(0).lower() in _KEYWORDS:
            continue  # a function or aggregation call, or a keyword
        names.add(m.group(0))
    return names
