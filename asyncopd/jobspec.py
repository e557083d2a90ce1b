"""The job model: what `POST /v1/jobs` accepts, what `asyncopd submit` sends, what every service reads.

Validation here is the one place a job spec is judged; the REST API turns its errors into 422s naming the
field. Checks that need the filesystem (model paths, tokenizers, prompt files) run in `preflight` when the
job starts, so a job naming a path that does not exist fails with a reason instead of being refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, model_validator

from asyncopd.objective_spec import ObjectiveSpec

_objective_adapter: TypeAdapter = TypeAdapter(ObjectiveSpec)


def _default_objective():
    return _objective_adapter.validate_python({"kind": "forward_kl_topk"})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelRef(_Strict):
    model: str = Field(min_length=1, description="Local HF-format directory or Hugging Face hub id.")


class Prompts(_Strict):
    path: str = Field(min_length=1, description="JSONL file; each line has `prompt` (text) or `messages` (chat).")
    heldout_path: str | None = Field(None, description="Optional held-out JSONL for the before/after check.")
    heldout_limit: int = Field(16, ge=1, le=10_000, description="Held-out prompts used per check.")


class Generation(_Strict):
    n: int = Field(4, ge=1, le=256, description="Samples per prompt.")
    max_tokens: int = Field(32, ge=1, le=32_768, description="Completion length limit.")
    temperature: float = Field(1.0, gt=0, le=4.0, description="Sampling temperature of the student.")


class Scoring(_Strict):
    top_k: int = Field(8, ge=1, le=1024, description="Teacher top-K cached per position.")


class Train(_Strict):
    steps: int = Field(20, ge=1, le=10_000_000, description="Optimizer steps (= published policy versions).")
    prompts_per_step: int = Field(8, ge=1, le=65_536, description="Prompts per step; samples = this x n.")
    learning_rate: float = Field(1e-4, gt=0, le=1.0)
    warmup_steps: int = Field(10, ge=0, description="Linear learning-rate warmup; Adam's first steps move every "
                              "weight by ~lr whatever the gradient, which wrecks a converged student without it.")
    weight_decay: float = Field(0.0, ge=0, le=1.0)
    grad_clip: float = Field(1.0, gt=0)
    checkpoint_every: int = Field(10, ge=1, description="DeepSpeed checkpoint every N steps (for resume).")
    seed: int = Field(0, ge=0)


class Eval(_Strict):
    every: int = Field(0, ge=0, description="Evaluate the published student on prompts.heldout_path every N steps "
                       "(and before the first and after the last); 0 = never.")
    kl: bool = Field(True, description="Also measure the exact KL to the teacher, which loads the teacher in the "
                     "learner (fine for small teachers; turn off for large ones).")


class JobSpec(_Strict):
    name: str = Field("job", min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._-]+$")
    student: ModelRef
    teacher: ModelRef
    prompts: Prompts
    objective: Annotated[ObjectiveSpec, Field(discriminator="kind")] = Field(default_factory=_default_objective)
    max_staleness: int = Field(
        1, ge=0, le=1024, description="η: no sample older than η policy versions is trained on. 0 = synchronous."
    )
    generation: Generation = Field(default_factory=Generation)
    scoring: Scoring = Field(default_factory=Scoring)
    train: Train = Field(default_factory=Train)
    eval: Eval = Field(default_factory=Eval)
    output_dir: str | None = Field(None, description="Where the distilled student goes; default data_dir/jobs/<id>.")

    @model_validator(mode="after")
    def _eval_has_prompts(self) -> JobSpec:
        if self.eval.every and not self.prompts.heldout_path:
            raise ValueError("eval.every needs prompts.heldout_path (the held-out prompts to evaluate on)")
        return self

    def samples_per_step(self) -> int:
        return self.train.prompts_per_step * self.generation.n


def output_dir_for(spec: JobSpec, job_id: str, data_dir: Path) -> Path:
    return Path(spec.output_dir) if spec.output_dir else data_dir / "jobs" / job_id
