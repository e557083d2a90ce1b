"""The chart passes the real tools: helm lint --strict and kubernetes-validate --strict on every scenario."""

from __future__ import annotations

from tests.deploy.chart_support import chartcheck


def test_helm_lint_strict(chart_tools):
    chartcheck.lint()


def test_every_rendered_manifest_passes_kubernetes_validate_strict(chart_tools):
    chartcheck.validate(chartcheck.render_all())


def test_helm_is_v4_from_the_tools_folder(chart_tools):
    p = chartcheck.run([str(chartcheck.HELM), "version", "--short"])
    assert p.returncode == 0 and p.stdout.startswith("v4."), p.stdout
