"""Settings every service shares. Each service subclasses `ServiceSettings` with its own fields.

All fields read the environment with the prefix ``ASYNCOPD_`` (``ASYNCOPD_REDIS_URL`` ...) and map 1:1 to the
Helm chart's per-service ``config`` block.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def default_instance() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ASYNCOPD_", extra="ignore")

    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis holding streams and job state.")
    redis_password: str | None = Field(None, description="Overrides the URL's password (from a Secret).")
    grpc_port: int = Field(0, ge=0, le=65535, description="gRPC control port; 0 picks a free port.")
    grpc_reflection: bool = Field(False, description="Serve gRPC server reflection.")
    metrics_port: int = Field(0, ge=0, le=65535, description="Prometheus /metrics port; 0 picks a free port.")
    log_level: str = Field("INFO", description="Python logging level.")
    instance: str = Field(default_factory=default_instance, description="Unique name of this process.")
    data_dir: Path = Field(Path(".run/data"), description="Shared volume: weights, checkpoints, job outputs.")
    poll_interval_s: float = Field(0.5, gt=0, description="How often idle services look for a new job.")
    heartbeat_ttl_s: float = Field(10.0, gt=0, description="A service missing heartbeats this long is gone.")


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
    reclaim_idle_ms: int = Field(60_000, gt=0, description="Reclaim entries a dead consumer held this long.")
    max_deliveries: int = Field(3, ge=1, description="Dead-letter an entry after this many deliveries.")
