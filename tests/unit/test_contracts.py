"""Promises of the shipped files: every shipped job file validates, every objective kind is accepted (the
layout's promises are in test_layers.py)."""

import typing
from pathlib import Path

import pytest
import yaml

from asyncopd.jobspec import JobSpec

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.yaml")))
def test_shipped_job_files_validate(path):
    JobSpec.model_validate(yaml.safe_load(path.read_text()))


# One job-spec objective per estimator variant (the ones tests/e2e/test_objectives_e2e.py trains end to end
# and a few more); every kind of the union appears at least once.
SUBMITTED_OBJECTIVES = [
    {"kind": "forward_kl_topk"}, {"kind": "forward_kl_topk", "tail": False, "token_clip": 0.05},
    {"kind": "reverse_kl_topk", "support": "student"}, {"kind": "reverse_kl_topk", "token_clip": 0.05},
    {"kind": "skewed_kl_topk", "alpha": 0.5}, {"kind": "token_level_kl"}, {"kind": "forward_kl_mc", "samples": 4},
    {"kind": "reverse_kl_sampled", "correction": "none"}, {"kind": "reverse_kl_recompute"},
    {"kind": "reverse_kl_recompute", "correction": "none"}, {"kind": "reverse_kl_mc", "samples": 4},
    {"kind": "reverse_kl_mc", "samples": 4, "advantage": "rollout"},
    {"kind": "reverse_kl_mc", "samples": 4, "correction": "none"}, {"kind": "decoupled_ppo"},
    {"kind": "m2po"}, {"kind": "m2po", "second_moment_budget": 0.04, "min_clip_low": 0.0, "min_clip_high": 0.0},
    {"kind": "mixed", "alpha": 0.5},
]


@pytest.mark.parametrize("objective", SUBMITTED_OBJECTIVES, ids=str)
def test_every_objective_kind_is_accepted_at_submission(objective):
    """Each objective's extra data (MC tokens, the student's top-K, the teacher's draws) is produced by the
    pipeline, so no kind is refused for lack of it."""
    base = yaml.safe_load((ROOT / "examples" / "tiny-job.yaml").read_text())
    spec = JobSpec.model_validate({**base, "objective": objective})
    assert spec.objective.model_dump().items() >= objective.items()


def test_the_submitted_objectives_cover_every_kind():
    from asyncopd.objective_spec import ObjectiveSpec

    members = typing.get_args(typing.get_args(ObjectiveSpec)[0])
    assert {m.model_fields["kind"].default for m in members} == {o["kind"] for o in SUBMITTED_OBJECTIVES}
