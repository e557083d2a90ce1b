"""Every dashboard panel's query returns data from a real Prometheus that scraped the contract's metrics.

The exporter here is synthetic (prometheus_client serving every asyncopd_* metric of the service contract,
with values that move); the end-to-end test that runs a real job reuses the same helper,
`chartcheck.dashboard_queries_without_data`, against the real services.
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request

import pytest
import yaml
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from tests.deploy.chart_support import COUNTERS, GAUGES, HISTOGRAMS, chartcheck

LABELS = {
    "asyncopd_stream_pending_entries": {"stream": ["asyncopd:job:j1:prompts", "asyncopd:job:j1:rollouts"]},
    "asyncopd_stream_length_entries": {"stream": ["asyncopd:job:j1:prompts", "asyncopd:job:j1:rollouts"]},
    "asyncopd_dead_letter_entries_total": {"stream": ["asyncopd:job:j1:rollouts"]},
    "asyncopd_jobs": {"state": ["queued", "running", "succeeded", "failed", "cancelled"]},
    "asyncopd_phase_seconds_total": {"phase": ["engine", "redis", "serialize", "idle"]},
    "asyncopd_learner_objective": {"metric": ["kl_estimate", "leaked_mass", "teacher_tail_mass", "student_entropy"]},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def synthetic_exporter(stop: threading.Event) -> int:
    registry = CollectorRegistry()
    metrics = []
    for name in sorted(HISTOGRAMS | COUNTERS | GAUGES):
        labels = LABELS.get(name, {})
        cls = Histogram if name in HISTOGRAMS else Counter if name in COUNTERS else Gauge
        # prometheus_client appends _total to counter names itself.
        base = name.removesuffix("_total") if cls is Counter else name
        metric = cls(base, name, list(labels), registry=registry)
        children = [metric.labels(*v) for v in zip(*labels.values(), strict=True)] if labels else [metric]
        metrics.extend((cls, child) for child in children)

    def tick():
        step = 0
        while not stop.wait(0.2):
            step += 1
            for cls, child in metrics:
                if cls is Histogram:
                    child.observe(step % 5)
                elif cls is Counter:
                    child.inc(1 + step % 3)
                else:
                    child.set(step)

    port = free_port()
    start_http_server(port, addr="127.0.0.1", registry=registry)
    threading.Thread(target=tick, daemon=True).start()
    return port


def query(base: str, expr: str) -> list:
    with urllib.request.urlopen(f"{base}/api/v1/query?query={urllib.parse.quote(expr)}", timeout=5) as r:
        return json.load(r)["data"]["result"]


@pytest.fixture
def prometheus(tmp_path):
    stop = threading.Event()
    target = synthetic_exporter(stop)
    config = tmp_path / "prometheus.yml"
    scrape = chartcheck.prometheus_config({"asyncopd": [f"127.0.0.1:{target}"]}, scrape_interval="1s")
    config.write_text(yaml.safe_dump(scrape))
    port = free_port()
    proc = subprocess.Popen(
        [
            chartcheck.prometheus_bin(),
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        # The first query right after ready is empty: wait for several scrapes so rates have two points.
        while time.monotonic() < deadline:
            try:
                result = query(base, "count_over_time(up[1m])")
                if result and float(result[0]["value"][1]) >= 6:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail("Prometheus did not scrape the exporter within 60 s")
        yield base
    finally:
        stop.set()
        proc.terminate()
        proc.wait(20)


def test_every_dashboard_query_returns_data(prometheus):
    empty = chartcheck.dashboard_queries_without_data(prometheus, window="30s")
    assert not empty, "panels without data:\n" + "\n".join(f"  {d} / {t}: {e}" for d, t, e in empty)
