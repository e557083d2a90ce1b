from asyncopd.v1 import common_pb2 as _common_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class LearnerProgress(_message.Message):
    __slots__ = ("job_id", "step", "policy_version", "samples_trained", "samples_dropped_stale", "last_loss", "last_kl")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_TRAINED_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_DROPPED_STALE_FIELD_NUMBER: _ClassVar[int]
    LAST_LOSS_FIELD_NUMBER: _ClassVar[int]
    LAST_KL_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    step: int
    policy_version: int
    samples_trained: int
    samples_dropped_stale: int
    last_loss: float
    last_kl: float
    def __init__(self, job_id: _Optional[str] = ..., step: _Optional[int] = ..., policy_version: _Optional[int] = ..., samples_trained: _Optional[int] = ..., samples_dropped_stale: _Optional[int] = ..., last_loss: _Optional[float] = ..., last_kl: _Optional[float] = ...) -> None: ...
