"""The REST API's response shapes, declared in its OpenAPI document and read back by `asyncopd.client`.

One error shape for every 4xx/5xx: `{"detail": "..."}`, or for invalid input `{"detail": [{"loc", "field",
"msg", "type"}, ...]}` naming each invalid field.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from asyncopd.jobspec import JOB_NAME_PATTERN, JobSpec
from asyncopd.records import EvalRecord, Heartbeat, JobState, StepRecord

DEFAULT_PAGE = 1000
MAX_PAGE = 10_000
# What a job id looks like (`<name>-<8 hex digits>`, made by the coordinator). The API checks a path's id
# against it before any Redis key is built from it, so `<id>:lost` or `<id>:steps` can never name a key.
JOB_ID_PATTERN = JOB_NAME_PATTERN.removesuffix("+$") + "{1,128}-[0-9a-f]{8}$"


class FieldError(BaseModel):
    loc: list[str | int]
    field: str = Field(description="Dotted path of the invalid field in the request body.")
    msg: str
    type: str


class ErrorResponse(BaseModel):
    detail: str | list[FieldError]


class JobProgress(BaseModel):
    step: int
    steps: int
    policy_version: int
    prompts_released: int
    samples_released: int
    samples_trained: int
    samples_dropped_stale: int
    samples_dead_lettered: int
    max_staleness_trained: int
    last_loss: float | None
    last_kl: float | None = Field(description="Sampled KL of the behaviour policy to the teacher, last step.")
    last_eval: EvalRecord | None


class JobView(BaseModel):
    id: str
    name: str
    state: JobState
    reason: str | None = Field(None, description="Why a job failed or was cancelled.")
    queue_position: int | None = Field(None, description="1 = next to run; only while queued.")
    created_at: float
    started_at: float | None
    finished_at: float | None
    output_dir: str
    result_dir: str | None = Field(None, description="The distilled student (HF format) once succeeded.")
    progress: JobProgress
    spec: JobSpec | None = Field(description="The job spec; null when the stored record no longer validates "
                                 "(the job then shows as failed, with the reason).")


class JobList(BaseModel):
    jobs: list[JobView]


class StepPage(BaseModel):
    steps: list[StepRecord]
    next_after: int | None = Field(description="`after` of the next page; null on the last page.")


class EvalPage(BaseModel):
    evals: list[EvalRecord]
    next_after: int | None = Field(description="`after` of the next page; null on the last page.")


class Pool(BaseModel):
    live: int = Field(description="Instances heartbeating now.")
    instances: list[Heartbeat]
    desired: int | None = Field(None, description="The rollout pool's desired size (rollout only).")
    desired_error: str | None = Field(None, description="Why the pool backend could not say `desired`.")


class Pools(BaseModel):
    rollout: Pool
    teacher: Pool
    learner: Pool


class ScaleRequest(BaseModel):
    # Strict: `"2"` and `true` are not a number of replicas.
    model_config = ConfigDict(strict=True, extra="forbid")
    replicas: int = Field(ge=0, le=1024)


class ScaleResponse(BaseModel):
    replicas: int


class Status(BaseModel):
    status: str
    detail: str | None = None
