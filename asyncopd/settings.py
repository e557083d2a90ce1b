"""Settings every service shares. Each service subclasses `ServiceSettings` with its own fields.

All fields read the environment with the prefix ``ASYNCOPD_`` (``ASYNCOPD_REDIS_URL`` ...) and map 1:1 to the
Helm chart's per-service ``config`` block.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def default_instance() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ASYNCOPD_", extra="ignore")

    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis holding streams and job state.")
    redis_password: str | None = Field(None, description="Overrides the URL's password (from a Secret).")
    grpc_host: str = Field("127.0.0.1", description="gRPC bind address: loopback unless deployed (the chart sets "
                           "0.0.0.0 and a NetworkPolicy).")
    grpc_port: int = Field(0, ge=0, le=65535, description="gRPC control port; 0 picks a free port.")
    grpc_token: str | None = Field(None, description="If set, gRPC calls that change state (Drain) need the metadata "
                                   "`authorization: Bearer <token>`; GetStatus and health stay open.")
    grpc_reflection: bool = Field(False, description="Serve gRPC server reflection.")
    metrics_host: str = Field("127.0.0.1", description="Prometheus /metrics bind address: loopback unless deployed "
                              "(the chart sets 0.0.0.0).")
    metrics_port: int = Field(0, ge=0, le=65535, description="Prometheus /metrics port; 0 picks a free port.")
    log_level: str = Field("INFO", description="Python logging level.")
    log_format: str = Field("text", pattern="^(text|json)$",
                            description="Log lines as text (for people) or JSON objects (for a log pipeline); "
                            "both carry service, instance, job and step (asyncopd.logs).")
    instance: str = Field(default_factory=default_instance, description="Unique name of this process.")
    pod_ip: str = Field("", description="Address the control CLI reaches this process at, advertised in its "
                        "heartbeat (the chart sets the pod IP); empty: the hostname.")
    data_dir: Path = Field(Path(".run/data"), description="Shared volume: weights, checkpoints, job outputs.")
    poll_interval_s: float = Field(0.5, gt=0, description="How often idle services look for a new job.")
    heartbeat_ttl_s: float = Field(10.0, gt=0, description="A service missing heartbeats this long is gone.")
    redis_outage_s: float = Field(60.0, ge=0, description="How long the service rides out an unreachable Redis "
                                  "(a restart, a failover), retrying with backoff, before a call fails.")


class EngineSettings(ServiceSettings):
    """Settings of the services that host a model engine (rollout, teacher)."""

    engine: str = Field("vllm", pattern="^(vllm|hf|synthetic)$",
                        description="Model engine: vllm or hf (transformers); synthetic is a benchmark instrument.")
    synthetic_latency_s: float = Field(0.0, ge=0, description="Fixed time per call of the synthetic engine.")
    device: str = Field("cpu", pattern="^(cpu|cuda)$", description="Device the engine runs on.")
    dtype: str = Field("float32", pattern="^(float32|bfloat16|float16)$", description="Engine dtype.")
    kv_cache_bytes: int = Field(64 << 20, ge=0, description="vLLM KV cache size; 0 lets vLLM decide (GPU).")
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1, description="vLLM GPU memory fraction.")
    max_model_len: int = Field(1024, gt=0, description="Longest prompt + completion the engine accepts.")
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM tensor parallelism: shard the model over this many "
                                      "GPUs of the pod (the chart sets the component's `gpus`); data-parallel "
                                      "replicas are separate pods. The model's attention heads must divide by it "
                                      "(checked when a job loads it); the HF engine serves on one device only.")
    reclaim_idle_ms: int = Field(60_000, gt=0, description="Reclaim entries a dead consumer held this long.")
    max_deliveries: int = Field(3, ge=1, description="Dead-letter an entry after this many deliveries.")
    max_engine_failures: int = Field(3, ge=1, description="Fail the active job, with the engine's error as its "
                                     "reason, after this many consecutive batches the engine failed (a model that "
                                     "loads but cannot run); a batch that succeeds resets the count.")

    @model_validator(mode="after")
    def _one_device_for_hf(self):
        # A deployment error, not a job's: the service refuses to start, as with any other invalid setting.
        if self.engine == "hf" and self.tensor_parallel_size > 1:
            raise ValueError(f"tensor_parallel_size {self.tensor_parallel_size} needs engine=vllm: the HF engine "
                             "serves on one device (set ASYNCOPD_TENSOR_PARALLEL_SIZE=1 or ASYNCOPD_ENGINE=vllm)")
        return self


class WeightsTransportSettings(BaseModel):
    """Mixed into the settings of the learner (which publishes weight versions) and of the rollout workers
    (which follow them): both must name the same transport (asyncopd.ml.weights.transports)."""

    weights_transport: Literal["filesystem", "delta", "nccl"] = Field(
        "filesystem", description="How policy versions reach rollout workers: filesystem (a full HF directory per "
        "version on the shared volume), delta (XOR deltas against the last full version, zstd, per-tensor "
        "checksums; the learner's weights_full_every sets how often a full version is written) or nccl (vLLM "
        "rollout engines receive each version from the learner through vLLM's weight transfer: NCCL on GPUs, gloo "
        "on CPUs; every version is also published through weights_fallback, which serves whoever a transfer "
        "cannot: the HF engine, workers joining late, failed rounds).")
    weights_fallback: Literal["filesystem", "delta"] = Field(
        "delta", description="nccl transport: the transport every version is also published through.")
    weights_transfer_timeout_s: float = Field(
        60.0, gt=0, description="nccl transport: bound on each step of a transfer round (forming the group, the "
        "broadcast and reload); past it the round is aborted and its followers load the version from "
        "weights_fallback.")
