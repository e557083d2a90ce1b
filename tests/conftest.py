"""Fixtures that start real things: a redis-server on a free port, the whole local stack as processes."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
import redis

from asyncopd.ports import free_port
from asyncopd.tools.localstack import redis_binary

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    port = free_port()
    data = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen([redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(data)], stdout=subprocess.DEVNULL)
    client = redis.Redis(port=port, decode_responses=True)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def r(redis_server):
    client = redis.Redis.from_url(redis_server, decode_responses=True)
    client.flushall()
    yield client
    client.close()


@pytest.fixture(scope="session")
def tiny_models():
    from asyncopd.ml.tinymodels import QUICK, build_all

    return build_all(ROOT / ".cache" / "models", QUICK, link=False)


@pytest.fixture(scope="module")
def distributed():
    """A gloo group of one in this process, for tests that build the learner's DeepSpeed Trainer; the
    environment it needs is put back afterwards (the e2e tests start learners that must not inherit this
    process's MASTER_PORT). Never host an in-process vLLM engine in this process: closing one tears down
    torch.distributed (tests that need vLLM next to a learner run it in a spawned process)."""
    saved = dict(os.environ)
    from services.learner.distributed import init_distributed
    from services.learner.settings import LearnerSettings

    init_distributed(LearnerSettings())
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def service_runtime(redis_server, r):
    """start(service, instance, **settings): a ServiceRuntime serving its gRPC control RPCs on loopback and
    registered in the heartbeat registry (no work loop); stopped at the end of the test."""
    from asyncopd.runtime import ServiceRuntime
    from asyncopd.settings import ServiceSettings
    from asyncopd.v1 import coordinator_pb2_grpc, learner_pb2_grpc, rollout_pb2_grpc, teacher_pb2_grpc

    adders = {"rollout": rollout_pb2_grpc.add_RolloutServiceServicer_to_server,
              "teacher": teacher_pb2_grpc.add_TeacherServiceServicer_to_server,
              "learner": learner_pb2_grpc.add_LearnerServiceServicer_to_server,
              "coordinator": coordinator_pb2_grpc.add_CoordinatorServiceServicer_to_server}
    started = []

    def start(service: str, instance: str, **settings) -> ServiceRuntime:
        s = ServiceSettings(redis_url=redis_server, instance=instance, grpc_port=0, metrics_port=0, pod_ip="",
                            **settings)
        rt = ServiceRuntime(service, f"asyncopd.v1.{service.title()}Service", s)
        rt.start(adders[service], handle_signals=False)
        rt.beat()
        started.append(rt)
        return rt

    yield start
    for rt in started:
        rt.stop.set()
        rt.shutdown()
