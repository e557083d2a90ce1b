"""Images started the wrong way: without Redis, without the data volume, with model files their user cannot
read. Each fails with a message that says what is wrong, or works; nothing hangs."""

from __future__ import annotations

import os
import time

import pytest

from asyncopd.ports import free_port
from tests.helpers import submit, tiny_job, wait_job
from tests.images.conftest import imagescheck

SERVICES = imagescheck.SERVICES


def wait_exit(c, timeout_s: float) -> int:
    try:
        return c.wait(timeout_s)
    except Exception as exc:
        raise AssertionError(f"{c.log.stem} still running after {timeout_s:.0f} s:\n{c.output()[-3000:]}") from exc


@pytest.mark.parametrize("service", SERVICES)
def test_without_redis_a_service_exits_naming_the_url(pods, service):
    dead = f"redis://127.0.0.1:{free_port()}/0"
    c = pods.start(service, ASYNCOPD_REDIS_URL=dead, ASYNCOPD_REDIS_OUTAGE_S="2")
    t0 = time.monotonic()
    code = wait_exit(c, 120)
    out = c.output()
    assert code != 0, out
    assert f"{service}: Redis at {dead} did not answer within 2 s of start-up" in out, out[-3000:]
    print(f"{service}: exited {code} after {time.monotonic() - t0:.1f} s")


def test_a_learner_without_the_data_volume_exits_saying_so(pods):
    c = pods.start("learner", data=False)
    assert wait_exit(c, 60) != 0
    assert "ASYNCOPD_DATA_DIR=/data is not writable by uid 10001 (Read-only file system)" in c.output(), c.output()


def test_a_coordinator_without_the_data_volume_fails_jobs_naming_the_missing_model(pods):
    pods.start("coordinator", data=False)
    wait_api(pods)
    job = submit(pods.api(), tiny_job({"student": "/data/models/student", "teacher": "/data/models/teacher"}))
    done = wait_job(pods.api(), job["id"], timeout_s=30)
    assert done["state"] == "failed"
    assert done["reason"] == "student.model: model path /data/models/student does not exist", done


@pytest.mark.parametrize("service", ["rollout", "teacher"])
def test_engines_start_without_the_data_volume(pods, service):
    """They only read from it (models, weight versions); a job whose files are missing fails at load, with the
    reason (tests/integration/test_bad_input.py)."""
    c = pods.start(service, data=False)
    deadline = time.monotonic() + 60
    while "INFO asyncopd.runtime: " + service not in c.output():
        assert c.proc.poll() is None and time.monotonic() < deadline, c.output()
        time.sleep(0.2)


def test_model_files_the_services_user_cannot_read_fail_the_job_at_preflight(pods, tiny_models):
    student = pods.put(tiny_models["student"], "models/student")
    pods.put(tiny_models["teacher"], "models/teacher")
    (student / "model.safetensors").chmod(0o600)
    os.chown(student / "model.safetensors", 0, 0)  # copied in by root, as a `kubectl cp` run as root leaves it
    pods.start("coordinator")
    wait_api(pods)
    job = submit(pods.api(), tiny_job({"student": "/data/models/student", "teacher": "/data/models/teacher"}))
    done = wait_job(pods.api(), job["id"], timeout_s=30)
    assert done["state"] == "failed"
    assert done["reason"].startswith("student.model: model.safetensors in /data/models/student not readable by "
                                      "uid 10001"), done


def test_the_root_filesystem_is_read_only_and_the_coordinator_image_has_no_torch(pods):
    """What the chart's securityContext sets (readOnlyRootFilesystem) holds in these runs, and the coordinator
    image carries no ML stack (it installs the base dependencies only)."""
    probe = ("import importlib.util, pathlib, sys\n"
             "missing = [m for m in ('torch', 'transformers', 'vllm', 'deepspeed') "
             "if importlib.util.find_spec(m) is None]\n"
             "try:\n    pathlib.Path(sys.prefix, 'x').touch()\nexcept OSError as e:\n    print('root:', e.strerror)\n"
             "pathlib.Path('/tmp/x').touch(); pathlib.Path('/data/x').touch()\n"
             "print('absent:', ' '.join(missing))\n")
    c = pods.start("coordinator", command=["python", "-c", probe])
    assert c.wait(60) == 0, c.output()
    out = c.output()
    assert "root: Read-only file system" in out
    assert "absent: torch transformers vllm deepspeed\n" in out, out


def wait_api(pods, timeout_s: float = 60) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{pods.api()}/readyz").status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, pods.started[-1].output()
        time.sleep(0.2)
