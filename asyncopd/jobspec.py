"""The job model: what `POST /v1/jobs` accepts, what `asyncopd submit` sends, what every service reads.

Validation here is the one place a job spec is judged; the REST API turns its errors into 422s naming the
field. Checks that need the filesystem (model paths, tokenizers, prompt files) run in `preflight` when the
job starts, so a job naming a path that does not exist fails with a reason instead of being refused.

Every number is bounded and finite (`allow_inf_nan=False`, and `_finite` for the objective's fields): a spec
is stored as JSON, where `Infinity` would come back as `null` and make the stored job unreadable.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator, model_validator

from asyncopd.objective_spec import ObjectiveSpec

_objective_adapter: TypeAdapter = TypeAdapter(ObjectiveSpec)


def _default_objective():
    return _objective_adapter.validate_python({"kind": "forward_kl_topk"})


JOB_NAME_PATTERN = r"^[A-Za-z0-9._-]+$"
MAX_STEPS = 10_000_000


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ModelRef(_Strict):
    model: str = Field(min_length=1, description="Local HF-format directory or Hugging Face hub id.")


# The ranks vLLM's LoRA kernels are built for (vllm.config.lora.MaxLoRARanks): a rollout worker serves an
# adapter of rank r with the smallest of these >= r, so a rank above the largest cannot be served.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
MODULE_NAME_PATTERN = r"^[A-Za-z0-9_.]{1,128}$"


class Lora(_Strict):
    """A PEFT LoRA adapter trained on the frozen student: each weight version is the adapter alone."""

    rank: int = Field(16, ge=1, le=VLLM_LORA_RANKS[-1], description="LoRA rank r.")
    alpha: float = Field(32.0, gt=0, le=1e6, description="LoRA alpha: the update is scaled by alpha / rank.")
    target_modules: list[Annotated[str, Field(pattern=MODULE_NAME_PATTERN)]] | Literal["all-linear"] = Field(
        "all-linear", description="Module names (suffixes, e.g. q_proj, v_proj) that get adapters, or "
        "`all-linear`: every linear layer but the output head.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter's input while training.")

    @field_validator("target_modules")
    @classmethod
    def _some_modules(cls, value):
        if isinstance(value, list) and not 1 <= len(value) <= 64:
            raise ValueError("target_modules names 1 to 64 modules (or is `all-linear`)")
        return sorted(set(value)) if isinstance(value, list) else value


class StudentRef(ModelRef):
    lora: Lora | None = Field(None, description="Train a LoRA adapter instead of the whole student.")
    export_merged: bool = Field(False, description="With `lora`: also export the adapter merged into the base "
                                "as a plain HF model in <output_dir>/student-merged.")

    @model_validator(mode="after")
    def _merged_needs_lora(self) -> StudentRef:
        if self.export_merged and self.lora is None:
            raise ValueError("student.export_merged needs student.lora (a fully trained student is exported "
                             "whole in <output_dir>/student)")
        return self


class Prompts(_Strict):
    """Where prompts (and held-out rows with answers) come from; read by `asyncopd.prompts`."""

    path: str = Field(min_length=1, description="A JSONL file, a local dataset file (.parquet, .arrow, .json, "
                      ".jsonl, .csv) or directory `datasets` reads, or a hub dataset id (where there is network).")
    config: str | None = Field(None, max_length=128, description="Configuration of a hub dataset (gsm8k: main).")
    split: str = Field("train", min_length=1, max_length=128, description="Split of a dataset source.")
    prompt_field: str = Field("prompt", min_length=1, max_length=128, description="Column with the prompt text.")
    messages_field: str = Field("messages", min_length=1, max_length=128,
                                description="Column with chat messages, used when a row has no prompt text; "
                                "rendered with the student's chat template.")
    answer_field: str | None = Field("answer", max_length=128, description="Column with the answer held-out "
                                     "evaluation compares with; rows without it are evaluated by KL only.")
    as_chat: bool = Field(False, description="Send text prompts as one user message through the chat template "
                          "(instruction-tuned models).")
    heldout_path: str | None = Field(None, description="Held-out rows from another source.")
    heldout_split: str | None = Field(None, max_length=128, description="Held-out rows from this split of "
                                      "`path` (or of `heldout_path`).")
    heldout_size: int | None = Field(None, ge=1, le=1_000_000, description="Hold out the last N rows of the "
                                     "training split (never trained on).")
    heldout_limit: int = Field(16, ge=1, le=10_000, description="Held-out rows used per evaluation.")

    @model_validator(mode="after")
    def _one_heldout_source(self) -> Prompts:
        if self.heldout_size and (self.heldout_path or self.heldout_split):
            raise ValueError("prompts.heldout_size holds out rows of `path`; it cannot be combined with "
                             "heldout_path or heldout_split")
        return self

    def has_heldout(self) -> bool:
        return bool(self.heldout_path or self.heldout_split or self.heldout_size)


class Generation(_Strict):
    n: int = Field(4, ge=1, le=256, description="Samples per prompt.")
    max_tokens: int = Field(32, ge=1, le=32_768, description="Completion length limit.")
    temperature: float = Field(1.0, gt=0, le=4.0, description="Sampling temperature of the student.")


class Scoring(_Strict):
    top_k: int = Field(8, ge=1, le=1024, description="Teacher top-K cached per position.")
    logprobs_dtype: Literal["float32", "float16"] = Field(
        "float32", description="How the teacher's top-K log-probs travel to the learner: float16 makes a scored "
        "sample ~25 % smaller (an (id, log-prob) pair 6 bytes instead of 8) for a loss that moves by < 1e-3 "
        "(docs/results/dataplane.md); float32 is exact.")


class Train(_Strict):
    steps: int = Field(20, ge=1, le=10_000_000, description="Optimizer steps (= published policy versions).")
    prompts_per_step: int = Field(8, ge=1, le=65_536, description="Prompts per step; samples = this x n.")
    learning_rate: float = Field(1e-4, gt=0, le=1.0)
    warmup_steps: int = Field(10, ge=0, le=MAX_STEPS, description="Linear learning-rate warmup; Adam's first "
                              "steps move every weight by ~lr whatever the gradient, which wrecks a converged "
                              "student without it.")
    weight_decay: float = Field(0.0, ge=0, le=1.0)
    grad_clip: float = Field(1.0, gt=0, le=1e6)
    checkpoint_every: int = Field(10, ge=1, le=MAX_STEPS, description="DeepSpeed checkpoint every N steps "
                                  "(for resume).")
    seed: int = Field(0, ge=0, le=2**32 - 1)


class Eval(_Strict):
    every: int = Field(0, ge=0, le=MAX_STEPS, description="Evaluate the published student on the held-out rows "
                       "every N steps (and before the first and after the last); 0 = never.")
    kl: bool = Field(True, description="Also measure the exact KL to the teacher, which loads the teacher in the "
                     "learner (fine for small teachers; turn off for large ones).")
    task: str = Field("exact_match", min_length=1, max_length=128, description="How answers are judged: "
                      "exact_match, arithmetic, or a judge an installed package registers (entry points "
                      "`asyncopd.tasks`).")
    extract: str = Field("first_word", min_length=1, max_length=512, description="The answer in a completion "
                         "(exact_match): first_word, last_number, gsm8k (`#### 42`), boxed (`\\boxed{42}`) or "
                         "regex:<pattern>.")
    max_tokens: int | None = Field(None, ge=1, le=32_768, description="Completion length of evaluation "
                                   "(default: generation.max_tokens).")
    samples: int = Field(8, ge=0, le=1000, description="Held-out completions (prompt, student answer, teacher "
                         "answer, judged) kept per evaluation in <output_dir>/evals/.")

    @model_validator(mode="after")
    def _judge_exists(self) -> Eval:
        from asyncopd.tasks import judge

        judge(self.task, self.extract)  # ValueError names the field
        return self


class JobSpec(_Strict):
    name: str = Field("job", min_length=1, max_length=128, pattern=JOB_NAME_PATTERN)
    student: StudentRef
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
    output_dir: str | None = Field(None, min_length=1, max_length=4096, description="Where the distilled "
                                   "student, step records and checkpoints go: a new or empty directory under "
                                   "the coordinator's output roots (default <data_dir>/jobs; a relative path is "
                                   "taken under it); default <data_dir>/jobs/<id>.")
    max_lost_fraction: float = Field(0.1, ge=0, le=1, description="The job fails (instead of succeeding) when "
                                     "more than this share of its released samples was dead-lettered; a job "
                                     "that trained no sample always fails.")

    @field_validator("objective")
    @classmethod
    def _finite(cls, objective):
        """No infinite or NaN number in the objective either (its models live in objective_spec)."""
        for path, value in _numbers(objective.model_dump()):
            if not math.isfinite(value):
                raise ValueError(f"{path} must be a finite number, not {value}")
        return objective

    @model_validator(mode="after")
    def _eval_has_prompts(self) -> JobSpec:
        if self.eval.every and not self.prompts.has_heldout():
            raise ValueError("eval.every needs held-out rows: prompts.heldout_path, heldout_split or heldout_size")
        return self

    def samples_per_step(self) -> int:
        return self.train.prompts_per_step * self.generation.n


def _numbers(value, path: str = ""):
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _numbers(v, f"{path}.{k}" if path else str(k))
    elif isinstance(value, float):
        yield path, value


def output_dir_for(spec: JobSpec, job_id: str, data_dir: Path) -> Path:
    return Path(spec.output_dir) if spec.output_dir else data_dir / "jobs" / job_id
