"""`asyncopd up` with an API token and a Redis password, as a user would export them: the stack comes up (its
readiness probe sends the token), only the coordinator holds the token, Redis requires the password and never
shows it on a command line, every port listens on loopback only, and a job runs end to end."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import httpx
import pytest
import redis

from asyncopd import state
from asyncopd.ports import free_port
from asyncopd.tools import localstack
from tests.helpers import ROOT, submit, tiny_job, wait_job
from tests.integration.test_access import listening

TOKEN = "local-api-token"
PASSWORD = 'redis "pass" word'


@pytest.fixture(scope="module")
def secured(tmp_path_factory, tiny_models):
    run_dir = tmp_path_factory.mktemp("stack-secured")
    mp = pytest.MonkeyPatch()
    mp.setenv("ASYNCOPD_API_TOKEN", TOKEN)  # what the user exported: the CLI and the test client read it too
    mp.setenv("ASYNCOPD_REDIS_PASSWORD", PASSWORD)
    try:
        info = localstack.up(run_dir, http_port=free_port(), engine="hf", rollouts=1)
        yield info
    finally:
        localstack.down(run_dir)
        mp.undo()


def environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode(errors="replace").split("=", 1) for item in raw if b"=" in item)


def test_the_stack_comes_up_with_a_token_and_guards_v1(secured):
    api = secured["api_url"]
    resp = httpx.get(f"{api}/v1/pools")
    assert resp.status_code == 401 and resp.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{api}/v1/pools", headers={"authorization": f"Bearer {TOKEN}"}).status_code == 200
    cli = subprocess.run([str(ROOT / ".venv" / "bin" / "asyncopd"), "--run-dir", secured["run_dir"], "status"],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert cli.returncode == 0, cli.stderr


def test_only_the_coordinator_holds_the_api_token(secured):
    r = redis.Redis.from_url(secured["redis_url"], password=PASSWORD, decode_responses=True)
    pids = {name: pid for name, pid in secured["pids"].items() if name != "redis"}
    pids.update({f"rollout/{s.instance}": s.pid for s in state.live_services(r, "rollout")})
    assert any(name.startswith("rollout/") for name in pids)
    for name, pid in pids.items():
        env = environ(pid)
        assert ("ASYNCOPD_API_TOKEN" in env) == (name == "coordinator"), name
        assert TOKEN not in Path(f"/proc/{pid}/cmdline").read_text()


def test_redis_needs_the_password_and_never_shows_it(secured):
    url = secured["redis_url"]
    with pytest.raises(redis.AuthenticationError):
        redis.Redis.from_url(url).ping()
    assert redis.Redis.from_url(url, password=PASSWORD).ping()
    assert PASSWORD not in Path(f"/proc/{secured['pids']['redis']}/cmdline").read_bytes().decode(errors="replace")
    conf = Path(secured["run_dir"]) / "redis" / "redis.conf"
    assert stat.S_IMODE(conf.stat().st_mode) == 0o600


def test_every_port_of_the_stack_listens_on_loopback_only(secured):
    r = redis.Redis.from_url(secured["redis_url"], password=PASSWORD, decode_responses=True)
    ports = {"api": int(secured["api_url"].rsplit(":", 1)[1]), "redis": int(secured["redis_url"].split(":")[2][:-2])}
    for s in state.live_services(r):
        ports[f"{s.service}/{s.instance} grpc"] = s.grpc_port
        ports[f"{s.service}/{s.instance} metrics"] = s.metrics_port
    assert len(ports) >= 2 + 2 * 4, ports
    for name, port in ports.items():
        assert listening(port) == "loopback", name


def test_a_job_runs_through_the_secured_stack(secured, tiny_models):
    assert os.environ["ASYNCOPD_API_TOKEN"] == TOKEN  # the helpers' client sends it
    api = secured["api_url"]
    job = wait_job(api, submit(api, tiny_job(tiny_models, train={"steps": 2}))["id"])
    assert job["state"] == "succeeded", job
    assert job["progress"]["samples_trained"] > 0
    out = Path(job["output_dir"])
    assert (out / ".asyncopd-job").read_text().strip() == job["id"] and (out / "student" / "config.json").exists()
