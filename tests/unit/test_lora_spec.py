"""`student.lora` in the job spec: what is accepted, what is refused with the field named, and the rank a
vLLM rollout worker serves it with."""

import pytest
from pydantic import ValidationError

from asyncopd.jobspec import VLLM_LORA_RANKS, JobSpec


def spec(**student) -> JobSpec:
    return JobSpec.model_validate({"student": {"model": "s", **student}, "teacher": {"model": "t"},
                                   "prompts": {"path": "p.jsonl"}})


def test_defaults_and_explicit_modules():
    assert spec().student.lora is None and not spec().student.export_merged
    lora = spec(lora={}).student.lora
    assert (lora.rank, lora.alpha, lora.target_modules, lora.dropout) == (16, 32.0, "all-linear", 0.0)
    explicit = spec(lora={"rank": 8, "target_modules": ["v_proj", "q_proj", "q_proj"]}, export_merged=True)
    assert explicit.student.lora.target_modules == ["q_proj", "v_proj"] and explicit.student.export_merged


@pytest.mark.parametrize("lora,field", [
    ({"rank": 0}, "student.lora.rank"), ({"rank": 513}, "student.lora.rank"),
    ({"alpha": 0}, "student.lora.alpha"), ({"alpha": float("nan")}, "student.lora.alpha"),
    ({"dropout": 1.0}, "student.lora.dropout"), ({"target_modules": []}, "student.lora.target_modules"),
    ({"target_modules": "q_proj"}, "student.lora.target_modules"),
    ({"target_modules": ["q_proj; rm -rf"]}, "student.lora.target_modules"), ({"rnak": 8}, "student.lora.rnak"),
])
def test_invalid_lora_names_the_field(lora, field):
    with pytest.raises(ValidationError) as err:
        spec(lora=lora)
    assert any(".".join(map(str, e["loc"])).startswith(field) for e in err.value.errors()), err.value


def test_a_merged_export_needs_lora_and_a_teacher_takes_none():
    with pytest.raises(ValidationError, match="export_merged needs student.lora"):
        spec(export_merged=True)
    with pytest.raises(ValidationError, match="teacher.lora"):
        JobSpec.model_validate({"student": {"model": "s"}, "teacher": {"model": "t", "lora": {}},
                                "prompts": {"path": "p.jsonl"}})


def test_vllm_serves_every_valid_rank():
    from asyncopd.ml.lora import vllm_max_rank

    assert [vllm_max_rank(r) for r in (1, 2, 8, 9, 33, 512)] == [1, 8, 8, 16, 64, 512]
    assert spec(lora={"rank": max(VLLM_LORA_RANKS)}).student.lora.rank == 512  # the largest valid rank is served
