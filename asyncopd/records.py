"""Typed records that cross a process boundary outside the data streams: the learner's step and evaluation
records, job progress, job events and service heartbeats. Torch-free; the learner writes them, the
coordinator, the CLI and the bench read them, each through these models and never by string keys.

Step and evaluation records are stored as JSON (a Redis list per job, and `steps.jsonl` in the job's output)
with a `schema` field, `asyncopd.step/1` and so on, versioned like the stream entries: a reader refuses a
record of another schema instead of misreading it.
"""

from __future__ import annotations

import json
from typing import Annotated, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
JOB_STATES: tuple[JobState, ...] = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL_STATES: tuple[JobState, ...] = ("succeeded", "failed", "cancelled")


class RecordError(ValueError):
    """A stored record that does not parse into its schema."""


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    SCHEMA: ClassVar[str]
    VERSION: ClassVar[int] = 1

    def dumps(self) -> str:
        return json.dumps({"schema": f"{self.SCHEMA}/{self.VERSION}", **self.model_dump(mode="json")},
                          separators=(",", ":"))

    @classmethod
    def loads(cls: type[R], text: str) -> R:
        try:
            body = json.loads(text)
            schema = body.pop("schema", None)
        except (TypeError, ValueError, AttributeError) as exc:
            raise RecordError(f"malformed {cls.SCHEMA} record: {exc}") from exc
        if schema != f"{cls.SCHEMA}/{cls.VERSION}":
            raise RecordError(f"expected schema {cls.SCHEMA}/{cls.VERSION}, got {schema!r}")
        try:
            return cls.model_validate(body)
        except ValidationError as exc:
            raise RecordError(f"malformed {cls.SCHEMA} record: {exc}") from exc


R = TypeVar("R", bound=Record)


class StepRecord(Record):
    """One learner step: what it trained, what it dropped, how stale, how long, and the objective's view."""

    SCHEMA = "asyncopd.step"
    step: int = Field(description="Steps completed (1-based): step t trained batch t - 1.")
    version: int = Field(description="Policy version published after this step.")
    samples: int = Field(description="Samples trained on.")
    dropped_stale: int = Field(description="Samples of this batch over the staleness budget, not trained.")
    lost: int = Field(description="Samples of this batch dead-lettered upstream.")
    staleness: dict[str, int] = Field(description="Trained samples by staleness (policy versions).")
    max_staleness: int
    mean_staleness: float
    loss: float = Field(description="Objective value, token mean over the batch.")
    behavior_kl: float = Field(description="Sampled KL(behaviour policy || teacher), token mean: the policy that "
                                           "generated the batch, not the trained one.")
    tokens: int = Field(description="Completion tokens trained on.")
    objective: dict[str, float] = Field(default_factory=dict, description="The objective's diagnostics.")
    step_s: float = Field(description="Forward + backward + optimizer step.")
    wait_s: float = Field(description="Waiting for the batch to be complete.")
    publish_s: float = Field(description="Seconds the step waited to publish the new version: its snapshot (the "
                             "write follows in the background), or the whole write with weights_async_publish off.")
    time: float = Field(description="Unix time the step ended.")


class EvalRecord(Record):
    """Held-out evaluation of one published version."""

    SCHEMA = "asyncopd.eval"
    step: int = Field(description="The policy version evaluated (0: the initial student).")
    task: str = Field("exact_match", description="How answers were judged (`eval.task`).")
    accuracy: float | None = Field(description="Mean judged score of greedy completions on the held-out rows "
                                               "with an answer; None when no row has one (KL only).")
    judged: int = Field(0, description="Held-out rows with an answer.")
    kl_to_teacher: float | None = Field(description="Exact KL(student || teacher) per token on the student's "
                                                    "samples; None when the job turned it off.")
    samples_path: str | None = Field(None, description="JSONL of held-out completions (prompt, student, teacher, "
                                                       "answer, score) of this evaluation.")
    eval_s: float
    time: float


class Progress(BaseModel):
    """A job's running totals, kept by the learner in a Redis hash written in the transaction that appends
    each step record, so reading them costs the same at step 10 and at step 10^6."""

    step: int = 0
    samples_trained: int = 0
    samples_dropped_stale: int = 0
    max_staleness_trained: int = 0
    last_loss: float | None = None
    last_kl: float | None = None

    def add(self, record: StepRecord) -> Progress:
        return Progress(step=record.step, samples_trained=self.samples_trained + record.samples,
                        samples_dropped_stale=self.samples_dropped_stale + record.dropped_stale,
                        max_staleness_trained=max(self.max_staleness_trained, record.max_staleness),
                        last_loss=record.loss, last_kl=record.behavior_kl)

    def to_hash(self) -> dict[str, str]:
        return {k: json.dumps(v) for k, v in self.model_dump().items()}

    @classmethod
    def from_hash(cls, h: dict[str, str]) -> Progress:
        return cls.model_validate({k: json.loads(v) for k, v in h.items() if k in cls.model_fields})


class _Event(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    job_id: str
    service: str


class VersionEvent(_Event):
    """The learner published a policy version: wakes the coordinator's admission control."""

    kind: Literal["version"] = "version"
    version: int


class FailedEvent(_Event):
    kind: Literal["failed"] = "failed"
    reason: str


class CompletedEvent(_Event):
    kind: Literal["completed"] = "completed"
    result_dir: str


JobEvent = Annotated[VersionEvent | FailedEvent | CompletedEvent, Field(discriminator="kind")]
_EVENT = TypeAdapter(JobEvent)
EVENT_SCHEMA = "asyncopd.event/1"


def event_fields(event: VersionEvent | FailedEvent | CompletedEvent) -> dict[str, str]:
    """A job event as the fields of an `asyncopd:events` stream entry."""
    return {"schema": EVENT_SCHEMA, "body": event.model_dump_json()}


def parse_event(fields: dict[str, str]) -> VersionEvent | FailedEvent | CompletedEvent:
    if fields.get("schema") != EVENT_SCHEMA:
        raise RecordError(f"expected schema {EVENT_SCHEMA}, got {fields.get('schema')!r}")
    try:
        return _EVENT.validate_json(fields.get("body", ""))
    except ValidationError as exc:
        raise RecordError(f"malformed job event: {exc}") from exc


class Heartbeat(BaseModel):
    """What a live service instance reports about itself in the registry (a Redis hash with a TTL)."""

    model_config = ConfigDict(extra="ignore")
    service: str
    instance: str
    seen: float = Field(description="Unix time of the last beat.")
    pid: int
    host: str = Field("", description="Where its gRPC port is reached: the pod IP, else the hostname.")
    grpc_port: int
    metrics_port: int
    draining: bool = False
    ready: bool = Field(False, description="Able to do its work (data-path services: a job's model loaded).")
    job_id: str = ""
    model_loaded: bool = False
    policy_version: int = 0
    processed: int = Field(0, description="Work items done: samples generated, scored or trained.")

    def to_hash(self) -> dict[str, str]:
        return {k: json.dumps(v) for k, v in self.model_dump().items()}

    @classmethod
    def from_hash(cls, h: dict[str, str]) -> Heartbeat:
        return cls.model_validate({k: json.loads(v) for k, v in h.items()})
