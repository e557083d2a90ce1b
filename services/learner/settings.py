from typing import Literal

from pydantic import Field

from asyncopd.settings import ServiceSettings, WeightsTransportSettings


class LearnerSettings(ServiceSettings, WeightsTransportSettings):
    """DeepSpeed learner. Env prefix ASYNCOPD_ (Helm: learner.config)."""

    device: str = Field("cpu", pattern="^(cpu|cuda)$", description="cpu uses gloo, cuda uses NCCL.")
    dtype: str = Field("float32", pattern="^(float32|bfloat16)$", description="Training dtype (bf16 on GPU).")
    zero_stage: int = Field(0, ge=0, le=3, description="DeepSpeed ZeRO stage.")
    consumer: str = Field("learner", description="Consumer name in the scored stream's group; stable across "
                          "restarts so a restarted learner replays what it had not finished.")
    read_count: int = Field(256, ge=1, description="Scored entries fetched per read.")
    max_deliveries: int = Field(5, ge=1, description="Dead-letter a scored entry after this many deliveries.")
    keep_versions: int = Field(2, ge=1, description="Published weight versions kept beyond the staleness budget.")
    weights_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype of published weight versions: the rollout engines' dtype (bfloat16 on GPU).")
    weights_full_every: int = Field(8, ge=1, description="delta transport: write a full version every this many "
                                    "versions (the rest are deltas against the last full one).")
    weights_async_publish: bool = Field(True, description="Write each version (and announce it) on a background "
                                        "thread while the next step runs; the step waits only for a host snapshot "
                                        "in the served dtype. false: the step waits for the whole write.")
    weights_transfer_port: int = Field(0, ge=0, le=65535, description="nccl transport: the port transfer groups "
                                       "meet at on the learner (rank 0, at pod_ip); 0 picks a free one per round.")
    loss_chunk_tokens: int = Field(1024, ge=1, description="Completion positions per log-softmax chunk.")
    synthetic_step_s: float = Field(0.0, ge=0, description="Benchmark instrument, never a default: pad every "
                                    "step to this duration, so pipeline efficiency is measured with fixed stages.")
