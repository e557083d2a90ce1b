"""Fixtures of the images check (`make images-check`): the four images built here, and containers started
from them the way the chart starts its pods (deploy/imagescheck.py). Not part of `make test`: building needs
podman, buildah and debootstrap, which `.ci/run` installs."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from asyncopd.ports import free_port
from tests.deploy.chart_support import ROOT, deploy_script

imagescheck = deploy_script("imagescheck")

UID = 10001
# The CPU scenario of the chart (deploy/helm/ci/cpu.yaml) with vLLM serving rollout and teacher, as the GPU
# values do; a 64 MiB KV cache (vLLM's CPU default would take ~11 GiB); versions over the `nccl` transport
# (vLLM's weight transfer on gloo here), which needs vLLM in the learner's image and its plugin in the rollout's.
CHART_ARGS = ("-f", str(ROOT / "deploy" / "helm" / "ci" / "cpu.yaml"),
              "--set", "rollout.config.engine=vllm", "--set", "teacher.config.engine=vllm",
              "--set", "teacher.config.kvCacheBytes=67108864",
              "--set", "learner.config.weightsTransport=nccl", "--set", "rollout.config.weightsTransport=nccl")


@pytest.fixture(scope="session")
def images() -> dict[str, float]:
    if missing := imagescheck.missing_tools():
        pytest.fail(f"the images check needs {', '.join(missing)} (apt-get install podman buildah debootstrap)")
    return imagescheck.build_all()


@pytest.fixture(scope="session")
def chart_env() -> dict[str, dict[str, str]]:
    return imagescheck.chart_env(*CHART_ARGS)


class Pods:
    """Containers started from the images, each with the chart's environment adapted to the host network
    (the pod IP is 127.0.0.1, every port a free one, Redis the test's), stopped at the end of the test."""

    def __init__(self, base: Path, redis_url: str, chart: dict[str, dict[str, str]]) -> None:
        self.base, self.redis_url, self.chart = base, redis_url, chart
        self.data = base / "data"  # the shared volume (the chart's PVC), owned by the pods' user (fsGroup)
        self.data.mkdir(parents=True, exist_ok=True)
        os.chown(self.data, UID, UID)
        self.started: list[imagescheck.Container] = []
        self.ports: dict[str, dict[str, int]] = {}

    def put(self, source: Path, dest: str) -> Path:
        """Copy a file or directory onto the shared volume, owned by the pods' user (as `kubectl cp` into a
        running pod would leave it)."""
        target = self.data / dest
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target)
        else:
            shutil.copy(source, target)
        for p in [target, *target.rglob("*")]:
            os.chown(p, UID, UID)
        for p in target.relative_to(self.data).parents:
            os.chown(self.data / p, UID, UID)
        return target

    def env(self, service: str, **overrides: str) -> dict[str, str]:
        ports = self.ports.setdefault(service, {"GRPC": free_port(), "METRICS": free_port(), "HTTP": free_port()})
        env = dict(self.chart[service])
        env.update({"ASYNCOPD_REDIS_URL": self.redis_url, "ASYNCOPD_POD_IP": "127.0.0.1",
                    **{f"ASYNCOPD_{k}_PORT": str(v) for k, v in ports.items()}})
        if "ASYNCOPD_WEIGHTS_TRANSFER_PORT" in env:  # the chart's fixed port could be taken on the host network
            env["ASYNCOPD_WEIGHTS_TRANSFER_PORT"] = "0"
        if service == "coordinator":
            # No Kubernetes API here: the rollout worker is a container of its own, not one the pool scales.
            env.update({"ASYNCOPD_POOL_BACKEND": "local", "ASYNCOPD_ROLLOUT_REPLICAS": "0"})
        env.update(overrides)
        return env

    def start(self, service: str, *, data: bool = True, read_only_root: bool = True,
              command: list[str] | None = None, **overrides: str) -> imagescheck.Container:
        mounts = imagescheck.pod_dirs(self.base / "pods", service, UID)
        if data:
            mounts.insert(0, imagescheck.Mount(self.data, "/data"))
        c = imagescheck.Container(imagescheck.image(service), self.env(service, **overrides), mounts,
                                  self.base / "logs" / f"{service}.log", read_only_root=read_only_root,
                                  command=command)
        self.started.append(c.start())
        return c

    def api(self) -> str:
        return f"http://127.0.0.1:{self.ports['coordinator']['HTTP']}"

    def stop_all(self) -> dict[str, int | None]:
        return {c.log.stem: c.stop() for c in reversed(self.started)}


@pytest.fixture
def pods(images, chart_env, redis_server, r, tmp_path):
    p = Pods(tmp_path, redis_server, chart_env)
    yield p
    p.stop_all()
    for c in p.started:  # the logs of the last run, readable after tmp_path is gone
        if c.log.exists():
            shutil.copy(c.log, ROOT / ".cache" / "images" / f"last-{c.log.name}")
