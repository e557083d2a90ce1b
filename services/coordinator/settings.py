from pathlib import Path

from pydantic import Field

from asyncopd.settings import ServiceSettings


class CoordinatorSettings(ServiceSettings):
    """Coordinator: REST API, admission control, rollout pool. Env prefix ASYNCOPD_ (Helm: coordinator.config)."""

    http_host: str = Field("127.0.0.1", description="REST API bind address.")
    http_port: int = Field(8000, ge=0, le=65535, description="REST API port (also serves /metrics).")
    api_token: str | None = Field(None, description="If set, /v1/* requires `Authorization: Bearer <token>`.")
    pool_backend: str = Field("local", pattern="^(local|kubernetes)$",
                              description="How the rollout pool scales: local processes or a k8s Deployment.")
    rollout_replicas: int = Field(1, ge=0, le=1024, description="Rollout workers started with the local backend.")
    k8s_namespace: str = Field("default", description="Namespace of the rollout Deployment.")
    k8s_rollout_deployment: str = Field("asyncopd-rollout", description="Deployment scaled by PUT /v1/pools/rollout.")
    log_dir: Path = Field(Path(".run/logs"), description="Logs of locally started rollout workers.")
    tick_s: float = Field(0.1, gt=0, description="Admission-control loop period.")
