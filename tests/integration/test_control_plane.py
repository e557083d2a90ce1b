"""The gRPC control plane through its callers: `asyncopd status --services` and `asyncopd drain` against real
gRPC servers on loopback (ServiceRuntime in this process, and a real teacher process) found through the
heartbeat registry in a real Redis."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from asyncopd import state
from asyncopd.ports import free_port
from asyncopd.records import Heartbeat
from asyncopd.tools.cli import main
from tests.helpers import ROOT


def lines(text: str) -> dict[str, list[str]]:
    """Table rows by INSTANCE column."""
    rows = [line.split() for line in text.strip().splitlines()]
    assert rows[0] == ["SERVICE", "INSTANCE", "ADDRESS", "JOB", "MODEL", "VERSION", "PROCESSED", "STATE"]
    return {row[1]: row for row in rows[1:]}


def test_status_services_shows_each_instance_from_its_own_get_status(service_runtime, redis_server, tmp_path,
                                                                     monkeypatch, capsys):
    rollout = service_runtime("rollout", "rollout-a")
    rollout.set_model_loaded(True, "job-1")
    rollout.info.policy_version, rollout.info.processed = 3, 17
    service_runtime("learner", "learner-0")
    coordinator = service_runtime("coordinator", "coord-0")
    coordinator.set_ready(True)
    # The Redis URL of the local stack (`asyncopd up` writes it to RUN_DIR/stack.json).
    monkeypatch.delenv("ASYNCOPD_REDIS_URL", raising=False)
    (tmp_path / "stack.json").write_text(json.dumps({"redis_url": redis_server}))

    main(["--run-dir", str(tmp_path), "status", "--services"])

    rows = lines(capsys.readouterr().out)
    assert rows["rollout-a"] == ["rollout", "rollout-a", f"127.0.0.1:{rollout.grpc_port}", "job-1", "loaded",
                                 "3", "17", "ready"]
    assert rows["learner-0"][3:] == ["-", "-", "0", "0", "not", "ready"]
    # The coordinator serves no model: ready, without claiming one is loaded.
    assert rows["coord-0"][0] == "coordinator" and rows["coord-0"][3:] == ["-", "-", "0", "0", "ready"]


def test_drain_sets_the_stop_event_and_reports_draining(service_runtime, redis_server, capsys):
    rollout = service_runtime("rollout", "rollout-a")
    other = service_runtime("rollout", "rollout-b")

    main(["drain", "rollout-a", "--redis-url", redis_server])

    out = capsys.readouterr().out
    assert out.startswith(f"draining rollout/rollout-a at 127.0.0.1:{rollout.grpc_port}")
    assert lines(out.split("\n", 1)[1])["rollout-a"][-1] == "draining"
    assert rollout.stop.is_set() and not other.stop.is_set()


def test_drain_makes_a_real_service_finish_and_exit(redis_server, r, tmp_path, capsys):
    env = {**os.environ, "ASYNCOPD_REDIS_URL": redis_server, "ASYNCOPD_INSTANCE": "teacher-t",
           "ASYNCOPD_DATA_DIR": str(tmp_path / "data"), "ASYNCOPD_ENGINE": "hf", "ASYNCOPD_POD_IP": ""}
    with open(tmp_path / "teacher.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "services.teacher"], env=env, cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not state.live_services(r, "teacher"):
            assert proc.poll() is None, (tmp_path / "teacher.log").read_text()
            assert time.monotonic() < deadline, "the teacher never registered"
            time.sleep(0.1)

        main(["drain", "teacher/teacher-t", "--redis-url", redis_server, "--wait", "60"])

        out = capsys.readouterr().out
        assert "draining teacher/teacher-t" in out and out.rstrip().endswith("teacher/teacher-t exited")
        assert proc.wait(30) == 0
        assert state.live_services(r) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_an_instance_that_does_not_answer_is_named_with_a_non_zero_exit(service_runtime, redis_server, r, capsys):
    service_runtime("rollout", "rollout-a")
    dead_port = free_port()  # registered, nothing listening: a process that died within its heartbeat TTL
    state.heartbeat(r, Heartbeat(service="rollout", instance="ghost", seen=time.time(), pid=1, host="127.0.0.1",
                                 grpc_port=dead_port, metrics_port=0), ttl_s=30)

    with pytest.raises(SystemExit) as exit_:
        main(["status", "--services", "--redis-url", redis_server, "--timeout", "2"])

    assert exit_.value.code == 1
    captured = capsys.readouterr()
    rows = lines(captured.out)
    assert rows["rollout-a"][-2:] == ["not", "ready"]  # the instances that answer are listed all the same
    assert rows["ghost"][-2:] == ["NO", "ANSWER"]
    assert captured.err.startswith(f"error: rollout/ghost at 127.0.0.1:{dead_port}: unreachable")

    with pytest.raises(SystemExit) as exit_:
        main(["drain", "rollout/ghost", "--redis-url", redis_server, "--timeout", "2"])
    assert str(exit_.value.code).startswith(f"error: rollout/ghost at 127.0.0.1:{dead_port}: unreachable")


@pytest.mark.parametrize(("argv", "message"), [
    (["drain", "nobody"], "error: no live instance 'nobody' in the registry (live: coordinator/coord-0)"),
    (["drain", "coordinator/coord-0"], "error: coordinator/coord-0: the coordinator has no Drain"),
    (["drain", "pool/coord-0"], "error: 'pool/coord-0': unknown service 'pool'"),
])
def test_drain_names_what_is_wrong_with_the_target(service_runtime, redis_server, argv, message):
    service_runtime("coordinator", "coord-0")
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--redis-url", redis_server])
    assert str(exit_.value.code).startswith(message)


def test_errors_reach_the_shell_as_one_line_and_exit_status_1_not_a_traceback(redis_server, r):
    dead_redis = f"redis://127.0.0.1:{free_port()}/0"
    for argv in (["drain", "ghost", "--redis-url", redis_server],
                 ["status", "--services", "--redis-url", dead_redis]):
        done = subprocess.run([sys.executable, "-m", "asyncopd.tools.cli", *argv], cwd=ROOT, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 1, done
        assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(f"error: cannot read the service registry from Redis at {dead_redis}")
