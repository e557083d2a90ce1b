"""`asyncopd up` restarts what dies, as Kubernetes would: a SIGKILLed teacher and a SIGKILLed Redis come back
on their own, a second `up` on a running stack is refused, and a job runs afterwards."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from asyncopd import state
from asyncopd.ports import free_port
from asyncopd.tools import localstack
from tests.helpers import check_accounting, submit, tiny_job, wait_job
from tests.helpers import steps as job_steps

pytestmark = pytest.mark.slow


def wait_restarted(run_dir, name: str, old_pid: int, timeout_s: float = 60) -> int:
    deadline = time.monotonic() + timeout_s
    while True:
        localstack.reap_children()  # this test process is their parent
        pid = localstack.load(run_dir)["pids"][name]
        if pid != old_pid and localstack.pid_alive(pid):
            return pid
        assert time.monotonic() < deadline, f"{name} not restarted within {timeout_s}s"
        time.sleep(0.2)


def test_the_supervisor_restarts_what_dies(tmp_path, tiny_models):
    run_dir = tmp_path / "stack"
    info = localstack.up(run_dir, http_port=free_port(), engine="hf", rollouts=1, supervised=True,
                         service_env={"teacher": {"ASYNCOPD_MAX_ENGINE_FAILURES": "7"}})
    try:
        assert localstack.pid_alive(info["supervisor"])
        with pytest.raises(RuntimeError, match="already running"):
            localstack.up(run_dir, http_port=free_port(), engine="hf", rollouts=1)
        r = state.connect(info["redis_url"], outage_s=30)
        teacher = info["pids"]["teacher"]
        os.kill(teacher, signal.SIGKILL)
        new_teacher = wait_restarted(run_dir, "teacher", teacher)
        # Restarted with the environment `up` gave it, not only the base one.
        assert "ASYNCOPD_MAX_ENGINE_FAILURES=7" in Path(f"/proc/{new_teacher}/environ").read_text().split("\0")
        os.kill(info["pids"]["redis"], signal.SIGKILL)
        wait_restarted(run_dir, "redis", info["pids"]["redis"])
        deadline = time.monotonic() + 60
        while not any(s.pid == new_teacher for s in state.live_services(r, "teacher")):
            assert time.monotonic() < deadline, "the restarted teacher never registered"
            time.sleep(0.2)
        api = info["api_url"]
        job = wait_job(api, submit(api, tiny_job(tiny_models, train={"steps": 3}))["id"])
        check_accounting(job, job_steps(api, job["id"]), 1)
    finally:
        localstack.down(run_dir)
    assert not localstack.pid_alive(info["supervisor"])
