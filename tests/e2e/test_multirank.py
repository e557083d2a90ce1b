"""The learner under torchrun with two ranks (ZeRO-2 over gloo): rank 0 reads Redis and drives rank 1."""

import pytest

from asyncopd.ports import free_port
from asyncopd.tools import localstack
from tests.helpers import check_accounting, submit, tiny_job, wait_job
from tests.helpers import steps as steps_of

pytestmark = pytest.mark.slow


def test_two_rank_learner_trains_a_job(tmp_path, tiny_models):
    info = localstack.up(tmp_path, http_port=free_port(), engine="hf", rollouts=1, learner_ranks=2,
                         extra_env={"ASYNCOPD_ZERO_STAGE": "2"})
    try:
        api = info["api_url"]
        job = wait_job(api, submit(api, tiny_job(tiny_models, train={"steps": 4, "checkpoint_every": 2}))["id"])
        check_accounting(job, steps_of(api, job["id"]), 1)
        assert (tmp_path / "data" / "jobs" / job["id"] / "student" / "model.safetensors").exists()
    finally:
        localstack.down(tmp_path)
