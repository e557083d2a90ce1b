"""A job the way a user brings one: prompts from a Parquet dataset with chat rows, a held-out tail of it,
answers judged by the job's task, completions kept to read; and the same job without answers (KL only)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from asyncopd.client import Client
from asyncopd.ports import free_port
from asyncopd.tools import localstack
from tests.helpers import ROOT, tiny_job

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def api(tmp_path_factory, tiny_models):
    run_dir = tmp_path_factory.mktemp("stack-real-jobs")
    info = localstack.up(run_dir, http_port=free_port(), engine="hf", rollouts=1)
    yield info["api_url"]
    localstack.down(run_dir)


def chat_job(models, **overrides) -> dict:
    return tiny_job(models, name="chat-parquet",
                    prompts={"path": str(ROOT / "examples" / "arith-chat.parquet"), "heldout_size": 32,
                             "heldout_limit": 12, **overrides.pop("prompts", {})},
                    train={"steps": 4, "prompts_per_step": 4, "checkpoint_every": 4},
                    eval={"every": 2, "task": "exact_match", "extract": "first_word", "samples": 3, "max_tokens": 6},
                    **overrides)


def test_a_parquet_chat_dataset_trains_and_is_judged_with_readable_samples(api, tiny_models):
    with Client(api) as c:
        with_answers = c.submit(chat_job(tiny_models))
        kl_only = c.submit(chat_job(tiny_models, prompts={"answer_field": None}))
        job = c.wait(with_answers.id, timeout_s=300)
        assert job.state == "succeeded", job.reason
        evals = list(c.evals(job.id))
        assert [e.step for e in evals] == [0, 2, 4]
        for e in evals:
            assert e.task == "exact_match" and e.judged == 12 and 0.0 <= e.accuracy <= 1.0 and e.kl_to_teacher > 0
            lines = [json.loads(x) for x in Path(e.samples_path).read_text().splitlines()]
            assert len(lines) == 3 and Path(e.samples_path).parent == Path(job.output_dir) / "evals"
            for s in lines:
                assert s["prompt"][0]["role"] == "user" and isinstance(s["student"], str)
                assert isinstance(s["teacher"], str) and s["answer"] and s["score"] in (0.0, 1.0)
        assert sum(s.samples for s in c.steps(job.id)) == 4 * 4 * 2  # every released sample trained

        job = c.wait(kl_only.id, timeout_s=300)
        assert job.state == "succeeded", job.reason
        for e in c.evals(job.id):
            assert e.accuracy is None and e.judged == 0 and e.kl_to_teacher > 0
