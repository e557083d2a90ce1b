"""A follower learner pod (rank != 0, LOCAL_RANK 0: pod 1.. of a multi-node torchrun) answers the probes the
chart gives every learner pod: grpc.health.v1 on ASYNCOPD_GRPC_PORT ("" SERVING from the start,
"asyncopd.v1.LearnerService" SERVING once it joined rank 0) and a metrics endpoint without asyncopd_* series.

Two real processes with torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT), as the
second pod's worker and the first pod's rank 0 would get it; gloo over loopback, a real Redis.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from asyncopd.ports import free_port
from tests.helpers import ROOT

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def health(port: int, service: str) -> int | None:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            return health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=2).status
        except grpc.RpcError:
            return None


def wait_for(predicate, timeout_s: float, what: str, procs=()) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        for p in procs:
            assert p.poll() is None, f"{what}: a learner rank exited with {p.returncode}"
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s}s"
        time.sleep(0.2)


@pytest.fixture
def spawn(redis_server, r, tmp_path):
    master_port, procs = free_port(), []

    def start(rank: int, local_rank: int, grpc_port: int, metrics_port: int) -> subprocess.Popen:
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(local_rank), "WORLD_SIZE": "2",
               "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(master_port),
               "ASYNCOPD_REDIS_URL": redis_server, "ASYNCOPD_DATA_DIR": str(tmp_path / "data"),
               "ASYNCOPD_GRPC_PORT": str(grpc_port), "ASYNCOPD_METRICS_PORT": str(metrics_port),
               "ASYNCOPD_INSTANCE": f"learner-rank{rank}", "OMP_NUM_THREADS": "1"}
        with open(tmp_path / f"rank{rank}.log", "wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "services.learner"], env=env, cwd=ROOT, stdout=log,
                                    stderr=subprocess.STDOUT)
        procs.append(proc)
        return proc

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait(10)


def test_follower_pod_serves_health_and_metrics_and_leaves_with_rank_0(spawn, tmp_path):
    grpc_port, metrics_port = free_port(), free_port()
    follower = spawn(1, 0, grpc_port, metrics_port)
    # Alive before rank 0 exists (the startup and liveness probes pass while it waits), not yet ready.
    wait_for(lambda: health(grpc_port, "") == SERVING, 60, "follower health", [follower])
    assert health(grpc_port, "asyncopd.v1.LearnerService") == NOT_SERVING
    metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
    assert "process_cpu_seconds_total" in metrics and "asyncopd_" not in metrics

    leader = spawn(0, 0, free_port(), free_port())
    wait_for(lambda: health(grpc_port, "asyncopd.v1.LearnerService") == SERVING, 60, "follower joined",
             [follower, leader])
    assert health(grpc_port, "") == SERVING

    # torchrun forwards SIGTERM to every rank: the follower ignores it and leaves when rank 0 says so.
    follower.send_signal(signal.SIGTERM)
    leader.send_signal(signal.SIGTERM)
    assert leader.wait(60) == 0, (tmp_path / "rank0.log").read_text()[-3000:]
    assert follower.wait(30) == 0, (tmp_path / "rank1.log").read_text()[-3000:]
    assert health(grpc_port, "") is None  # port closed with the process
