"""Checks of the Helm chart with the real tools: helm lint/template, kubernetes-validate, promtool.

`make chart` runs `python deploy/chartcheck.py all`, then pytest tests/deploy (which imports this module
for the scenario list and the rendering helper). Standalone:

    .venv/bin/python deploy/chartcheck.py tools|lint|render|validate|rules|dashboards|all

Scenarios are the default values plus every deploy/helm/ci/*.yaml. A CI values file whose first lines hold
`# helm-template-args: ...` is rendered with those extra arguments (e.g. `--api-versions` for CRDs that
`helm template` cannot discover without a cluster). Rendered manifests go to .cache/chart/.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "deploy" / "helm" / "asyncopd"
CI_DIR = ROOT / "deploy" / "helm" / "ci"
PROM_DIR = ROOT / "deploy" / "prometheus"
TOOLS_DIR = Path(os.environ.get("TOOLS_DIR", ROOT / ".tools"))
HELM = TOOLS_DIR / "bin" / "helm"
INSTALL_TOOLS = ROOT / "deploy" / "scripts" / "install-tools.sh"
OUT = ROOT / ".cache" / "chart"

RELEASE = "ci"
NAMESPACE = "asyncopd"
# Oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest kubernetes-validate knows.
KUBE_VERSIONS = ("1.27", "1.37")
# The scenario whose PrometheusRule promtool checks and unit-tests.
RULES_SCENARIO = "monitoring"

# Grafana variables -> values a plain Prometheus accepts (used to check dashboard queries).
GRAFANA_SUBSTITUTIONS = {
    "$__rate_interval": "1m",
    "$__interval": "30s",
    "$__range": "1h",
    "$namespace": ".*",
    "$rollout": ".*",
    "$teacher": ".*",
}


@dataclass(frozen=True)
class Scenario:
    name: str
    values: Path | None = None
    extra_args: tuple[str, ...] = field(default_factory=tuple)

    def helm_args(self) -> list[str]:
        args = ["-f", str(self.values)] if self.values else []
        return args + list(self.extra_args)


def scenarios() -> list[Scenario]:
    out = [Scenario("default")]
    for path in sorted(CI_DIR.glob("*.yaml")):
        extra: tuple[str, ...] = ()
        for line in path.read_text().splitlines()[:5]:
            m = re.match(r"#\s*helm-template-args:\s*(.+)$", line)
            if m:
                extra = tuple(shlex.split(m.group(1)))
        out.append(Scenario(path.stem, path, extra))
    return out


def scenario(name: str) -> Scenario:
    return next(s for s in scenarios() if s.name == name)


# -- tools ---------------------------------------------------------------------------------------------


def kubernetes_validate_bin() -> str:
    local = Path(sys.executable).parent / "kubernetes-validate"
    return str(local) if local.exists() else (shutil.which("kubernetes-validate") or str(local))


def promtool_bin() -> str:
    return shutil.which("promtool") or "/usr/bin/promtool"


def prometheus_bin() -> str:
    return shutil.which("prometheus") or "/usr/bin/prometheus"


def tools_missing() -> list[str]:
    missing = []
    if not HELM.exists():
        missing.append("helm")
    if not Path(kubernetes_validate_bin()).exists():
        missing.append("kubernetes-validate")
    if not Path(promtool_bin()).exists():
        missing.append("promtool")
    if not Path(prometheus_bin()).exists():
        missing.append("prometheus")
    return missing


def ensure_tools() -> None:
    """Install helm/kubectl, kubernetes-validate and promtool when missing (same script as `make chart`)."""
    if tools_missing():
        env = dict(os.environ, PYTHON=sys.executable, TOOLS_DIR=str(TOOLS_DIR))
        subprocess.run(["bash", str(INSTALL_TOOLS)], check=True, env=env)
    still = tools_missing()
    if still:
        raise RuntimeError(f"tools still missing after {INSTALL_TOOLS}: {', '.join(still)}")


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


# -- helm ----------------------------------------------------------------------------------------------


def helm_template(
    args: list[str], release: str = RELEASE, namespace: str = NAMESPACE
) -> subprocess.CompletedProcess:
    """`helm template` with extra args; returns the completed process (check returncode/stderr)."""
    return run([str(HELM), "template", release, str(CHART), "--namespace", namespace, *args])


def render(s: Scenario) -> str:
    p = helm_template(s.helm_args())
    if p.returncode != 0:
        raise RuntimeError(f"helm template ({s.name}) failed:\n{p.stderr}")
    return p.stdout


def manifests(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


def lint() -> None:
    # helm lint cannot fake API versions, so scenarios that need CRDs are covered by `render` instead.
    for s in scenarios():
        if s.extra_args:
            continue
        p = run(
            [str(HELM), "lint", "--strict", "--quiet", str(CHART), "--namespace", NAMESPACE, *s.helm_args()]
        )
        if p.returncode != 0:
            raise RuntimeError(f"helm lint --strict ({s.name}) failed:\n{p.stdout}{p.stderr}")
        print(f"  lint ok       {s.name}")


def render_all() -> dict[str, Path]:
    OUT.mkdir(parents=True, exist_ok=True)
    files = {}
    for s in scenarios():
        path = OUT / f"{s.name}.yaml"
        text = render(s)
        path.write_text(text)
        files[s.name] = path
        print(f"  rendered      {s.name}: {len(manifests(text))} objects -> {path.relative_to(ROOT)}")
    return files


def validate(files: dict[str, Path]) -> None:
    for version in KUBE_VERSIONS:
        p = run([kubernetes_validate_bin(), "--strict", "--quiet", "-k", version, *map(str, files.values())])
        # Unknown kinds (CRDs: ScaledObject, ServiceMonitor, ...) only warn; anything else fails.
        if p.returncode != 0:
            raise RuntimeError(f"kubernetes-validate --strict -k {version} failed:\n{p.stdout}{p.stderr}")
        print(f"  validated     {len(files)} scenarios against Kubernetes {version} (--strict)")


# -- promtool ------------------------------------------------------------------------------------------


def extract_rules(text: str) -> dict:
    rules = [m for m in manifests(text) if m.get("kind") == "PrometheusRule"]
    if len(rules) != 1:
        raise RuntimeError(f"expected one PrometheusRule in scenario {RULES_SCENARIO}, found {len(rules)}")
    return {"groups": rules[0]["spec"]["groups"]}


def check_rules() -> None:
    """promtool check rules + test rules on the PrometheusRule as rendered by the chart."""
    out = OUT / "prometheus"
    out.mkdir(parents=True, exist_ok=True)
    rules_file = out / "asyncopd.rules.yaml"
    rules_file.write_text(
        yaml.safe_dump(extract_rules(render(scenario(RULES_SCENARIO))), sort_keys=False, width=200)
    )
    p = run([promtool_bin(), "check", "rules", str(rules_file)])
    if p.returncode != 0:
        raise RuntimeError(f"promtool check rules failed:\n{p.stdout}{p.stderr}")
    print(f"  promtool      check rules ok ({rules_file.relative_to(ROOT)})")
    # The unit tests name `asyncopd.rules.yaml` relative to themselves: run copies beside the rendered rules.
    tests = sorted(PROM_DIR.glob("*.test.yaml"))
    if not tests:
        raise RuntimeError(f"no promtool unit tests in {PROM_DIR}")
    for t in tests:
        shutil.copy(t, out / t.name)
    p = run([promtool_bin(), "test", "rules", *(str(out / t.name) for t in tests)])
    if p.returncode != 0:
        raise RuntimeError(f"promtool test rules failed:\n{p.stdout}{p.stderr}")
    print(f"  promtool      test rules ok ({', '.join(t.name for t in tests)})")


def dashboard_queries() -> list[tuple[str, str, str]]:
    """(dashboard file, panel title, expr) for every query of every dashboard panel."""
    out = []
    for path in sorted((CHART / "dashboards").glob("*.json")):
        dash = json.loads(path.read_text())
        stack = list(dash.get("panels", []))
        while stack:
            panel = stack.pop(0)
            stack.extend(panel.get("panels", []))
            for target in panel.get("targets", []):
                if target.get("expr"):
                    out.append((path.name, panel.get("title", ""), target["expr"]))
    return out


def substitute(expr: str) -> str:
    """A dashboard query with Grafana's variables replaced, runnable against a plain Prometheus."""
    for var in sorted(GRAFANA_SUBSTITUTIONS, key=len, reverse=True):
        expr = expr.replace(var, GRAFANA_SUBSTITUTIONS[var])
    return expr


def check_dashboard_promql() -> None:
    """promtool parses every dashboard query (as recording rules) with the Grafana variables substituted."""
    out = OUT / "prometheus"
    out.mkdir(parents=True, exist_ok=True)
    queries = dashboard_queries()
    rules = [
        {"record": f"asyncopd:dashboard_query_{i}", "expr": substitute(q)}
        for i, (_, _, q) in enumerate(queries)
    ]
    path = out / "dashboard-queries.rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}, sort_keys=False))
    p = run([promtool_bin(), "check", "rules", str(path)])
    if p.returncode != 0:
        raise RuntimeError(f"dashboard PromQL does not parse:\n{p.stdout}{p.stderr}")
    print(f"  promtool      {len(queries)} dashboard queries parse")


# -- end to end: dashboards against a real Prometheus (used by the e2e test that runs a job) ----------------


def prometheus_config(targets: dict[str, list[str]], scrape_interval: str = "2s") -> dict:
    """A prometheus.yml scraping `targets` ({service: ["127.0.0.1:PORT", ...]}) at /metrics."""
    return {
        "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
        "scrape_configs": [
            {"job_name": name, "metrics_path": "/metrics", "static_configs": [{"targets": addrs}]}
            for name, addrs in targets.items()
        ],
    }


def dashboard_queries_without_data(prometheus_url: str, window: str = "5m") -> list[tuple[str, str, str]]:
    """Every dashboard query, variables substituted (`$__rate_interval`/`$__range` -> `window`), run as an
    instant query; returns (dashboard, panel, expr) for each one that yields no series."""
    import urllib.parse
    import urllib.request

    subs = dict(GRAFANA_SUBSTITUTIONS, **{"$__rate_interval": window, "$__range": window})
    empty = []
    for dash, title, expr in dashboard_queries():
        for var in sorted(subs, key=len, reverse=True):
            expr = expr.replace(var, subs[var])
        url = f"{prometheus_url.rstrip('/')}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.load(r)
        if body.get("status") != "success" or not body["data"]["result"]:
            empty.append((dash, title, expr))
    return empty


# -- main ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("step", choices=["tools", "lint", "render", "validate", "rules", "dashboards", "all"])
    step = ap.parse_args(argv).step
    t0 = time.monotonic()
    try:
        ensure_tools()
        if step in ("lint", "all"):
            lint()
        if step in ("render", "validate", "all"):
            files = render_all()
            if step != "render":
                validate(files)
        if step in ("rules", "all"):
            check_rules()
        if step in ("dashboards", "all"):
            check_dashboard_promql()
    except (RuntimeError, subprocess.CalledProcessError) as e:
        print(f"chartcheck {step}: FAILED\n{e}", file=sys.stderr)
        return 1
    print(f"chartcheck {step}: ok in {time.monotonic() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
