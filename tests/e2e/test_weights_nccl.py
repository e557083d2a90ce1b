"""The whole stack on the `nccl` weights transport (ASYNCOPD_WEIGHTS_TRANSPORT=nccl for every service) with vLLM
engines on CPUs, so versions travel over vLLM's weight transfer with the `asyncopd_gloo` backend: a
strict-synchronous job whose rollout receives every version from the learner (none from the fallback's files),
and a learner killed mid-job whose restarted successor serves the new lineage the same way."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests import helpers as pipeline
from tests.helpers import learner_restarted_mid_job, steps, submit, tiny_job, transport_stack, wait_job

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_models):
    yield from transport_stack(tmp_path_factory.mktemp("stack-nccl"), "vllm", {
        "ASYNCOPD_WEIGHTS_TRANSPORT": "nccl", "ASYNCOPD_WEIGHTS_FALLBACK": "delta", "ASYNCOPD_WEIGHTS_FULL_EVERY": "3"})


def logs(stack, service: str) -> str:
    return "".join(p.read_text() for p in sorted((Path(stack["run_dir"]) / "logs").glob(f"{service}*.log")))


def test_a_strictly_synchronous_job_receives_every_version_by_transfer(stack, tiny_models):
    api = stack["api_url"]
    job = wait_job(api, submit(api, tiny_job(tiny_models, max_staleness=0, train={"steps": 8}))["id"])
    records = steps(api, job["id"])
    pipeline.check_accounting(job, records, 0)
    assert all(s["staleness"] == {"0": s["samples"]} for s in records)  # every version was loaded
    sent = {int(v) for v in re.findall(r"weights: v(\d+) sent to 1 follower", logs(stack, "learner"))}
    assert set(range(1, 8)) <= sent, sent  # the last version (8) trains nothing, so no worker asks for it
    assert "not received by transfer" not in logs(stack, "rollout")


def test_a_restarted_learner_serves_the_new_lineage_by_transfer(stack, tiny_models):
    # η = 0: every version is asked for before the next can be published (at η = 1 and ~70 ms steps the learner
    # can run two versions ahead of a request, which then loads from the fallback, as it should).
    learner_restarted_mid_job(stack, tiny_models, max_staleness=0, total_steps=24)
    learner = Path(stack["run_dir"]) / "logs" / "learner.log"
    after_restart = learner.read_text().rsplit("lineage 2", 1)[-1]
    assert re.search(r"weights: v\d+ sent to 1 follower", after_restart), after_restart[-3000:]
