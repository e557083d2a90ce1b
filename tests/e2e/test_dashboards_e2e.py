"""Every Grafana panel shows data for a real run: the local stack (HF engine) trains a real job while a real
Prometheus scrapes every service — the coordinator's HTTP /metrics and each live rollout, teacher and learner
process on the metrics port it registered in its heartbeat — and then every dashboard query runs against it.

Two checks: `chartcheck.dashboard_queries_without_data` (every query returns at least one series, the same
helper the synthetic-exporter test in tests/deploy uses) and, stricter, every series value is a number —
a histogram panel with no observations in the window is `NaN`, which Grafana draws as an empty graph.
"""

from __future__ import annotations

import json
import math
import subprocess
import time
import urllib.parse
import urllib.request

import pytest
import redis
import yaml

from asyncopd import state
from asyncopd.ports import free_port
from asyncopd.tools import localstack
from tests.deploy.chart_support import chartcheck
from tests.helpers import submit, tiny_job, wait_job

pytestmark = pytest.mark.slow

SCRAPE = 1.0  # seconds


def query(base: str, expr: str) -> list:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as resp:
        body = json.load(resp)
    assert body["status"] == "success", body
    return body["data"]["result"]


def scrape_targets(info: dict) -> dict[str, list[str]]:
    r = redis.Redis.from_url(info["redis_url"], decode_responses=True)
    targets = {"coordinator": [info["api_url"].removeprefix("http://")]}  # /metrics on the REST port
    for service in ("rollout", "teacher", "learner"):
        ports = [s.metrics_port for s in state.live_services(r, service) if s.metrics_port]
        assert ports, f"no live {service} with a metrics port"
        targets[service] = [f"127.0.0.1:{p}" for p in ports]
    r.close()
    return targets


def start_prometheus(tmp_path, targets: dict[str, list[str]]) -> tuple[subprocess.Popen, str]:
    chartcheck.ensure_tools()
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump(chartcheck.prometheus_config(targets, scrape_interval=f"{SCRAPE:g}s")))
    port = free_port()
    log = open(tmp_path / "prometheus.log", "wb")
    proc = subprocess.Popen([chartcheck.prometheus_bin(), f"--config.file={config}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=log, stderr=subprocess.STDOUT)
    log.close()
    return proc, f"http://127.0.0.1:{port}"


def wait_all_up(base: str, n_targets: int, timeout_s: float = 30) -> None:
    """The first query after ready is empty: wait until every target has been scraped successfully."""
    deadline = time.monotonic() + timeout_s
    last: object = "nothing"
    while time.monotonic() < deadline:
        try:
            last = query(base, "up")
            if len(last) == n_targets and all(s["value"][1] == "1" for s in last):
                return
        except OSError as exc:
            last = exc
        time.sleep(0.3)
    raise TimeoutError(f"Prometheus did not scrape all {n_targets} targets in {timeout_s}s: {last}")


def test_every_dashboard_panel_has_data_from_a_real_run(tmp_path, tiny_models):
    t0 = time.monotonic()
    info = localstack.up(tmp_path / "stack", http_port=free_port(), engine="hf", rollouts=1)
    prom = None
    try:
        targets = scrape_targets(info)
        prom, base = start_prometheus(tmp_path, targets)
        wait_all_up(base, sum(len(t) for t in targets.values()))
        t_prom = time.monotonic()

        # Several steps at η = 1: every histogram observes (staleness, step, wait, publish, reload, scoring).
        api = info["api_url"]
        spec = tiny_job(tiny_models, train={"steps": 6, "prompts_per_step": 4, "checkpoint_every": 100})
        job = wait_job(api, submit(api, spec)["id"], timeout_s=120)
        assert job["state"] == "succeeded", job
        time.sleep(3 * SCRAPE)  # the final values reach Prometheus
        # The window covers the whole run, as a dashboard's time range would.
        window = f"{math.ceil(time.monotonic() - t_prom) + 5}s"

        empty = chartcheck.dashboard_queries_without_data(base, window=window)
        assert not empty, "panels without data:\n" + "\n".join(f"  {d} / {t}: {e}" for d, t, e in empty)

        subs = dict(chartcheck.GRAFANA_SUBSTITUTIONS, **{"$__rate_interval": window, "$__range": window})
        nan = []
        for dash, title, expr in chartcheck.dashboard_queries():
            for var in sorted(subs, key=len, reverse=True):
                expr = expr.replace(var, subs[var])
            values = [float(s["value"][1]) for s in query(base, expr)]
            if not all(math.isfinite(v) for v in values):
                nan.append(f"  {dash} / {title}: {expr} -> {values}")
        assert not nan, "panels whose queries return NaN/Inf (no observations in the window):\n" + "\n".join(nan)

        # The labelled series a dashboard groups by exist for every label value, zeros included.
        states = {s["metric"]["state"] for s in query(base, "asyncopd_jobs")}
        assert states == {"queued", "running", "succeeded", "failed", "cancelled"}
        for metric in ("asyncopd_stream_length_entries", "asyncopd_stream_pending_entries",
                       "asyncopd_dead_letter_entries_total"):
            streams_seen = {s["metric"]["stream"] for s in query(base, metric)}
            assert {"asyncopd:prompts", "asyncopd:rollouts", "asyncopd:scored"} <= streams_seen, metric
        assert float(query(base, 'sum(asyncopd_jobs{state="succeeded"})')[0]["value"][1]) == 1
        assert float(query(base, "max(asyncopd_policy_version)")[0]["value"][1]) == 6
    finally:
        if prom is not None:
            prom.terminate()
            prom.wait(20)
        localstack.down(tmp_path / "stack")
    assert time.monotonic() - t0 < 90, f"took {time.monotonic() - t0:.0f}s (budget 90 s)"
