"""The coordinator's REST API on a real uvicorn process with a real Redis (no model services)."""

import os
import subprocess
import sys
import time

import httpx
import pytest
import yaml

from asyncopd.ports import free_port
from tests.helpers import ROOT, submit, tiny_job, wait_job


@pytest.fixture(scope="module")
def api(redis_server, tmp_path_factory):
    port = free_port()
    run = tmp_path_factory.mktemp("coord")
    env = {**os.environ, "ASYNCOPD_REDIS_URL": redis_server, "ASYNCOPD_HTTP_PORT": str(port),
           "ASYNCOPD_ROLLOUT_REPLICAS": "0", "ASYNCOPD_DATA_DIR": str(run / "data"),
           "ASYNCOPD_LOG_DIR": str(run / "logs")}
    proc = subprocess.Popen([sys.executable, "-m", "services.coordinator"], env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            if httpx.get(f"{url}/readyz").status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    yield url
    proc.terminate()
    proc.wait(30)


@pytest.fixture(autouse=True)
def clean(r):
    """Each test starts from empty Redis (the coordinator re-creates its groups lazily)."""
    from asyncopd import state
    from services.coordinator.runner import EVENTS_GROUP

    r.xgroup_create(state.EVENTS, EVENTS_GROUP, id="$", mkstream=True)


def fields_of(resp):
    return {d["field"] for d in resp.json()["detail"]}


@pytest.mark.parametrize("patch,field", [
    ({"max_staleness": -1}, "max_staleness"),
    ({"train": {"steps": 0}}, "train.steps"),
    ({"generation": {"temperature": 0}}, "generation.temperature"),
    ({"objective": {"kind": "nope"}}, "objective"),
    ({"unknown_field": 1}, "unknown_field"),
    ({"student": {}}, "student.model"),
])
def test_invalid_spec_is_422_naming_the_field(api, tiny_models, patch, field):
    spec = tiny_job(tiny_models)
    for k, v in patch.items():
        spec[k] = v
    resp = httpx.post(f"{api}/v1/jobs", json=spec)
    assert resp.status_code == 422, resp.text
    assert any(f.startswith(field) for f in fields_of(resp)), resp.text


def test_non_mapping_and_garbage_bodies_are_4xx(api):
    assert httpx.post(f"{api}/v1/jobs", content=b"[1, 2]").status_code == 422
    assert httpx.post(f"{api}/v1/jobs", content=b"{unclosed: [").status_code == 400


def test_example_yaml_is_a_valid_body(api):
    raw = (ROOT / "examples" / "tiny-job.yaml").read_bytes()
    resp = httpx.post(f"{api}/v1/jobs", content=raw, headers={"content-type": "application/yaml"})
    assert resp.status_code == 201, resp.text
    job = resp.json()
    assert job["name"] == yaml.safe_load(raw)["name"] and job["spec"]["train"]["steps"] == 1000
    # Its models may not be built on this machine: it either starts (no services here) or fails preflight.
    done = wait_job(api, job["id"], states=("running", "failed"))
    if done["state"] == "running":
        assert httpx.post(f"{api}/v1/jobs/{job['id']}/cancel").json()["state"] == "cancelled"


def test_jobs_queue_in_order_and_cancel(api, tiny_models):
    # No services run here: the first job stays running, the next waits with its queue position.
    first = submit(api, tiny_job(tiny_models))
    second = submit(api, tiny_job(tiny_models))
    wait_job(api, first["id"], states=("running",))
    view = httpx.get(f"{api}/v1/jobs/{second['id']}").json()
    assert view["state"] == "queued" and view["queue_position"] == 1
    assert httpx.post(f"{api}/v1/jobs/{second['id']}/cancel").json()["state"] == "cancelled"
    assert httpx.post(f"{api}/v1/jobs/{second['id']}/cancel").status_code == 409
    assert httpx.post(f"{api}/v1/jobs/{first['id']}/cancel").json()["state"] == "cancelled"
    assert httpx.get(f"{api}/v1/jobs/nope").status_code == 404
    ids = [j["id"] for j in httpx.get(f"{api}/v1/jobs").json()["jobs"]]
    assert first["id"] in ids and second["id"] in ids


@pytest.mark.parametrize("patch,needle", [
    ({"student": {"model": "/does/not/exist"}}, "student.model: model path /does/not/exist does not exist"),
    ({"prompts": {"path": "/nope.jsonl"}}, "prompts.path: prompt file /nope.jsonl does not exist"),
])
def test_missing_paths_fail_the_job_with_a_reason(api, tiny_models, patch, needle):
    job = submit(api, tiny_job(tiny_models, **patch))
    done = wait_job(api, job["id"])
    assert done["state"] == "failed" and needle in done["reason"]


def test_different_tokenizers_fail_at_once(api, tiny_models, tmp_path):
    from asyncopd.ml.tinymodels import DEFAULT, build_tokenizer, new_model

    other = tmp_path / "other"
    tok = build_tokenizer(tmp_path / "tok", vocab_size=300)
    new_model(DEFAULT.student, tok).save_pretrained(other)
    tok.save_pretrained(other)
    job = submit(api, tiny_job(tiny_models, teacher={"model": str(other)}))
    done = wait_job(api, job["id"], timeout_s=30)
    assert done["state"] == "failed" and "tokenizers differ" in done["reason"]


def test_malformed_prompt_lines_fail_with_line_number(api, tiny_models, tmp_path):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"messages": "not a list"}\n')
    job = submit(api, tiny_job(tiny_models, prompts={"path": str(bad)}))
    done = wait_job(api, job["id"])
    assert done["state"] == "failed" and "line 2" in done["reason"]


def test_health_metrics_openapi_and_pools(api):
    assert httpx.get(f"{api}/healthz").json() == {"status": "ok"}
    metrics = httpx.get(f"{api}/metrics").text
    assert "asyncopd_stream_pending_entries" in metrics and "asyncopd_jobs" in metrics
    paths = httpx.get(f"{api}/openapi.json").json()["paths"]
    for p in ("/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/cancel", "/v1/pools", "/v1/pools/rollout"):
        assert p in paths
    pools = httpx.get(f"{api}/v1/pools").json()
    assert pools["rollout"]["desired"] == 0
    assert httpx.put(f"{api}/v1/pools/rollout", json={"replicas": -1}).status_code == 422
