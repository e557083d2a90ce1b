"""The coordinator's REST API on a real uvicorn process with a real Redis (no model services)."""

import os
import subprocess
import sys
import time

import httpx
import pytest
import redis
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

    try:
        r.xgroup_create(state.EVENTS, EVENTS_GROUP, id="$", mkstream=True)
    except redis.ResponseError as exc:  # the runner saw the flush first and recreated it
        assert "BUSYGROUP" in str(exc)


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
    yaml_body = {"content-type": "application/yaml"}
    assert httpx.post(f"{api}/v1/jobs", content=b"[1, 2]", headers=yaml_body).status_code == 422
    assert httpx.post(f"{api}/v1/jobs", content=b"{unclosed: [", headers=yaml_body).status_code == 400


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
    ({"prompts": {"path": "/nope.jsonl"}}, "prompts.path: prompt source /nope.jsonl does not exist"),
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


def test_health_metrics_openapi_and_pools(api, redis_server):
    assert httpx.get(f"{api}/healthz").json() == {"status": "ok"}
    metrics = httpx.get(f"{api}/metrics").text
    assert "asyncopd_stream_pending_entries" in metrics and "asyncopd_jobs" in metrics
    paths = httpx.get(f"{api}/openapi.json").json()["paths"]
    for p in ("/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/cancel", "/v1/pools", "/v1/pools/rollout"):
        assert p in paths
    from asyncopd import state
    from asyncopd.records import Heartbeat

    beat = Heartbeat(service="teacher", instance="t-1", seen=1.0, pid=4, grpc_port=1, metrics_port=2, ready=True)
    state.heartbeat(state.connect(redis_server), beat, ttl_s=30)
    pools = httpx.get(f"{api}/v1/pools").json()
    assert pools["rollout"]["desired"] == 0 and pools["rollout"]["live"] == 0
    assert pools["teacher"]["live"] == 1 and pools["teacher"]["instances"][0]["instance"] == "t-1"
    assert httpx.put(f"{api}/v1/pools/rollout", json={"replicas": -1}).status_code == 422


def test_request_times_are_labelled_by_route_template_never_by_job_id(api):
    """asyncopd_http_request_seconds: one series per (method, route template, status), however many job ids."""
    from prometheus_client.parser import text_string_to_metric_families

    def count(route: str, status: str) -> float:
        text = httpx.get(f"{api}/metrics").text
        return sum(s.value for f in text_string_to_metric_families(text) if f.name == "asyncopd_http_request_seconds"
                   for s in f.samples if s.name.endswith("_count")
                   and (s.labels["method"], s.labels["route"], s.labels["status"]) == ("GET", route, status))

    before = count("/v1/jobs/{job_id}", "404")
    for job_id in ("nope-00000001", "nope-00000002", "nope-00000003"):
        assert httpx.get(f"{api}/v1/jobs/{job_id}").status_code == 404
    assert count("/v1/jobs/{job_id}", "404") == before + 3
    unmatched = count("unmatched", "404")
    assert httpx.get(f"{api}/no/such/path").status_code == 404
    assert count("unmatched", "404") == unmatched + 1
    assert "nope-0000000" not in httpx.get(f"{api}/metrics").text


def test_step_records_come_in_pages_and_progress_reads_the_learners_hash(api, r, tiny_models):
    """The coordinator reads progress from the hash the learner writes with each record (never the records),
    and serves the records page by page; the client walks every page."""
    from asyncopd import state
    from asyncopd.client import Client
    from asyncopd.records import EvalRecord, Progress
    from tests.unit.test_records import step

    with Client(api) as c:
        job = c.submit(tiny_job(tiny_models, name="paged"))
        c.cancel(job.id)
        records = [step(n, samples=4, max_staleness=n % 3) for n in range(1, 2502)]
        progress = Progress()
        for rec in records:
            progress = progress.add(rec)
        r.rpush(state.steps_key(job.id), *[rec.dumps() for rec in records])
        r.hset(state.progress_key(job.id), mapping=progress.to_hash())
        r.rpush(state.evals_key(job.id), EvalRecord(step=0, accuracy=0.2, kl_to_teacher=2.0, eval_s=1, time=1).dumps(),
                EvalRecord(step=100, accuracy=0.5, kl_to_teacher=0.9, eval_s=1, time=2).dumps())
        view = c.job(job.id)
        assert view.progress.step == 2501 and view.progress.samples_trained == 4 * 2501
        assert view.progress.max_staleness_trained == 2 and view.progress.last_eval.accuracy == 0.5
        assert list(c.steps(job.id)) == records  # three pages of the default 1000
        assert [e.step for e in c.evals(job.id)] == [0, 100]
    page = httpx.get(f"{api}/v1/jobs/{job.id}/steps", params={"after": 2000, "limit": 400}).json()
    assert [s["step"] for s in page["steps"]] == list(range(2001, 2401)) and page["next_after"] == 2400
    last = httpx.get(f"{api}/v1/jobs/{job.id}/steps", params={"after": 2400, "limit": 400}).json()
    assert len(last["steps"]) == 101 and last["next_after"] is None
    assert httpx.get(f"{api}/v1/jobs/{job.id}/steps", params={"limit": 0}).status_code == 422
    assert httpx.get(f"{api}/v1/jobs/{job.id}/steps", params={"limit": 10**6}).status_code == 422
    assert httpx.get(f"{api}/v1/jobs/{job.id}/steps", params={"after": -1}).status_code == 422
    assert httpx.get(f"{api}/v1/jobs/nope/steps").status_code == 404
    assert httpx.get(f"{api}/v1/jobs/nope/evals").status_code == 404


def test_openapi_declares_every_response_shape_and_the_one_error_shape(api):
    doc = httpx.get(f"{api}/openapi.json").json()
    ref = {(path, method): op["responses"] for path, ops in doc["paths"].items() for method, op in ops.items()}
    expected = {("/v1/jobs", "post"): ("201", "JobView"), ("/v1/jobs", "get"): ("200", "JobList"),
                ("/v1/jobs/{job_id}", "get"): ("200", "JobView"),
                ("/v1/jobs/{job_id}/steps", "get"): ("200", "StepPage"),
                ("/v1/jobs/{job_id}/evals", "get"): ("200", "EvalPage"),
                ("/v1/jobs/{job_id}/cancel", "post"): ("200", "JobView"),
                ("/v1/pools", "get"): ("200", "Pools"), ("/v1/pools/rollout", "put"): ("200", "ScaleResponse")}
    for (path, method), (code, model) in expected.items():
        schema = ref[(path, method)][code]["content"]["application/json"]["schema"]
        assert schema["$ref"].endswith(f"/{model}"), (path, method, schema)
        assert ref[(path, method)]["404"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    assert {"StepRecord", "EvalRecord", "Heartbeat", "JobProgress", "FieldError"} <= doc["components"]["schemas"].keys()


def test_concurrent_submissions_queue_in_created_at_order(api):
    """Twenty clients submit at once: the queue order and the creation times agree (one Redis-stamped script
    per submission, never a time taken before the transaction)."""
    from concurrent.futures import ThreadPoolExecutor

    from asyncopd.client import ApiError, Client

    spec = {"name": "burst", "student": {"model": "/nope/s"}, "teacher": {"model": "/nope/t"},
            "prompts": {"path": "/nope.jsonl"}}
    with Client(api) as c, ThreadPoolExecutor(20) as pool:
        jobs = list(pool.map(lambda _: c.submit(spec), range(20)))
        views = [c.job(j.id) for j in jobs]
        queued = sorted((v for v in views if v.queue_position is not None), key=lambda v: v.queue_position)
        assert [v.created_at for v in queued] == sorted(v.created_at for v in queued)
        assert len({v.created_at for v in views}) == 20
        for j in jobs:  # the runner fails them one by one meanwhile (no such model): a 409 is that race
            try:
                c.cancel(j.id)
            except ApiError as exc:
                assert exc.status_code == 409 and "already failed" in exc.message, exc
