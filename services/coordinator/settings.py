from pathlib import Path

from pydantic import Field

from asyncopd.settings import ServiceSettings


class CoordinatorSettings(ServiceSettings):
    """Coordinator: REST API, admission control, rollout pool. Env prefix ASYNCOPD_ (Helm: coordinator.config)."""

    http_host: str = Field("127.0.0.1", description="REST API bind address.")
    http_port: int = Field(8000, ge=0, le=65535, description="REST API port (also serves /metrics).")
    api_token: str | None = Field(None, description="If set, /v1/* requires `Authorization: Bearer <token>`.")
    max_body_bytes: int = Field(256 << 10, ge=1024, le=64 << 20, description="Largest request body accepted; "
                                "larger ones are refused with 413 before they are read.")
    output_roots: list[Path] = Field(default_factory=list, description="Directories job outputs may be written "
                                     "under (a job's output_dir must lie inside one); empty: <data_dir>/jobs.")
    max_model_len: int = Field(1024, gt=0, description="Longest prompt + completion the rollout and teacher engines "
                               "accept (their ASYNCOPD_MAX_MODEL_LEN): a job with a longer prompt fails at start, "
                               "naming the line.")
    pool_backend: str = Field("local", pattern="^(local|kubernetes)$",
                              description="How the rollout pool scales: local processes or a k8s Deployment.")
    rollout_replicas: int = Field(1, ge=0, le=1024, description="Rollout workers started with the local backend.")
    k8s_namespace: str = Field("default", description="Namespace of the rollout Deployment.")
    k8s_rollout_deployment: str = Field("asyncopd-rollout", description="Deployment scaled by PUT /v1/pools/rollout.")
    k8s_api_url: str | None = Field(None, description="Kubernetes API server; default in a pod: "
                                    "https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT.")
    k8s_token_file: Path = Field(Path("/var/run/secrets/kubernetes.io/serviceaccount/token"),
                                 description="Bearer token for the Kubernetes API (re-read at every call).")
    k8s_ca_file: Path | None = Field(Path("/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"),
                                     description="CA bundle verifying an https Kubernetes API server.")
    log_dir: Path = Field(Path(".run/logs"), description="Logs of locally started rollout workers.")
    tick_s: float = Field(0.1, gt=0, description="Admission-control loop period when no event arrives (a published "
                          "version wakes it at once; this bounds how soon new and cancelled jobs are noticed).")
