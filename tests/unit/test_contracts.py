"""Promises of the layout and the shipped files: the coordinator stays torch-free, services do not import
each other, every shipped job file validates, every objective kind is accepted."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from asyncopd.jobspec import JobSpec

ROOT = Path(__file__).resolve().parents[2]


def test_coordinator_and_cli_import_no_torch():
    code = ("import sys, services.coordinator.api, services.coordinator.runner, services.coordinator.pools, "
            "services.coordinator.pools.kubernetes, asyncopd.tools.cli, asyncopd.tools.localstack; "
            "print(sorted(m for m in ('torch', 'transformers', 'vllm', 'deepspeed') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("service", ["rollout", "teacher", "learner", "coordinator"])
def test_services_never_import_each_other(service):
    others = {"rollout", "teacher", "learner", "coordinator"} - {service}
    names = "|".join(others)
    pattern = re.compile(rf"^\s*(from|import)\s+services\.({names})\b", re.M)
    for path in (ROOT / "services" / service).rglob("*.py"):
        assert not pattern.search(path.read_text()), f"{path} imports another service"


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.yaml")))
def test_shipped_job_files_validate(path):
    JobSpec.model_validate(yaml.safe_load(path.read_text()))


def test_every_objective_kind_is_accepted_at_submission():
    """Each objective's extra data (MC tokens, the student's top-K) is produced by the pipeline, so no kind is
    refused for lack of it."""
    base = yaml.safe_load((ROOT / "examples" / "tiny-job.yaml").read_text())
    for objective in ({"kind": "reverse_kl_recompute"}, {"kind": "reverse_kl_mc", "samples": 4},
                      {"kind": "reverse_kl_topk", "support": "student"}, {"kind": "m2po"}):
        JobSpec.model_validate({**base, "objective": objective})
