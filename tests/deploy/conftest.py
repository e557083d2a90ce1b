"""Fixtures of the chart/image checks: the real helm, kubernetes-validate and promtool.

The tools are the ones `make chart` installs (helm into .tools/bin, kubernetes-validate into the venv,
promtool from apt); the session fixture installs them with the same script when they are missing.
"""

from __future__ import annotations

import pytest

from tests.deploy.chart_support import chartcheck


@pytest.fixture(scope="session", autouse=True)
def chart_tools():
    chartcheck.ensure_tools()
    return chartcheck


@pytest.fixture(scope="session")
def rendered(chart_tools) -> dict[str, list[dict]]:
    """scenario name -> rendered manifests, for the defaults and every deploy/helm/ci/*.yaml."""
    return {s.name: chartcheck.manifests(chartcheck.render(s)) for s in chartcheck.scenarios()}
