"""The whole stack on the `delta` weights transport (ASYNCOPD_WEIGHTS_TRANSPORT=delta for every service): a
strict-synchronous job whose rollouts load every version from deltas and whose held-out evaluation reads delta
versions, and a learner restart (a new lineage republishing over the old one's versions) on deltas. HF engine:
the weight path under test is the same for vLLM (tests/integration/test_weights.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from asyncopd.client import Client
from asyncopd.ml.weights.manifest import Manifest
from tests import helpers as pipeline
from tests.helpers import ROOT, learner_restarted_mid_job, steps, submit, tiny_job, transport_stack, wait_job

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_models):
    yield from transport_stack(tmp_path_factory.mktemp("stack-delta"), "hf", {
        "ASYNCOPD_WEIGHTS_TRANSPORT": "delta", "ASYNCOPD_WEIGHTS_FULL_EVERY": "3", "ASYNCOPD_WEIGHTS_DTYPE": "float32"})


def test_a_strictly_synchronous_job_runs_on_delta_versions(stack, tiny_models):
    api = stack["api_url"]
    spec = tiny_job(tiny_models, max_staleness=0, eval={"every": 2},
                    prompts={"heldout_path": str(ROOT / "examples" / "arith-heldout.jsonl"), "heldout_limit": 16},
                    train={"steps": 6, "checkpoint_every": 6})
    job = wait_job(api, submit(api, spec)["id"])
    records = steps(api, job["id"])
    pipeline.check_accounting(job, records, 0)
    assert all(s["staleness"] == {"0": s["samples"]} for s in records)  # every version was loaded, from deltas
    with Client(api) as c:
        evals = [e.step for e in c.evals(job["id"])]
    assert [v for v in evals if v > 0] == [2, 4, 6]  # versions 2 and 6 are deltas
    kept = {d.name: Manifest.read(d).kind
            for d in (Path(stack["run_dir"]) / "data" / "weights" / job["id"]).iterdir() if d.name[1:].isdigit()}
    assert "delta" in kept.values() and "full" in kept.values(), kept
    rollout_log = (Path(stack["run_dir"]) / "logs").glob("rollout*.log")
    assert not any("cannot be loaded" in p.read_text() for p in rollout_log)


def test_learner_killed_mid_job_resumes_on_delta_versions(stack, tiny_models):
    """The restarted learner's publisher starts afresh: a full version at its checkpoint, under version numbers
    the discarded lineage had used; rollouts holding the old lineage's base follow it back."""
    learner_restarted_mid_job(stack, tiny_models, max_staleness=2, total_steps=30)
