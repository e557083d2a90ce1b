"""Bad input, tried the way a careless user and an attacker would, against the real coordinator process and a
real Redis (no model services): no request breaks the API for others, a job writes only under the output
roots into a directory it made, and any failure to start a job fails that job with a reason."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import redis

from asyncopd import state
from asyncopd.ports import free_port
from tests.helpers import ROOT, submit, tiny_job, wait_job

JSON = {"content-type": "application/json"}
YAML = {"content-type": "application/yaml"}


def start_coordinator(redis_url: str, run: Path, **env: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    full = {k: v for k, v in os.environ.items() if k != "ASYNCOPD_API_TOKEN"}
    full.update({"ASYNCOPD_REDIS_URL": redis_url, "ASYNCOPD_HTTP_PORT": str(port), "ASYNCOPD_ROLLOUT_REPLICAS": "0",
                 "ASYNCOPD_DATA_DIR": str(run / "data"), "ASYNCOPD_LOG_DIR": str(run / "logs"), **env})
    proc = subprocess.Popen([sys.executable, "-m", "services.coordinator"], env=full, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(f"{url}/readyz").status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"coordinator exited with {proc.returncode}")
        time.sleep(0.1)
    proc.terminate()
    raise TimeoutError("coordinator not ready")


@pytest.fixture(scope="module")
def coordinator(redis_server, tmp_path_factory):
    run = tmp_path_factory.mktemp("coord-bad-input")
    proc, url = start_coordinator(redis_server, run)
    yield {"url": url, "jobs": (run / "data" / "jobs").resolve(), "run": run}
    proc.terminate()
    proc.wait(30)


@pytest.fixture
def api(coordinator, r):
    """Each test starts from an empty Redis (and the coordinator's event group)."""
    from services.coordinator.runner import EVENTS_GROUP

    try:
        r.xgroup_create(state.EVENTS, EVENTS_GROUP, id="$", mkstream=True)
    except redis.ResponseError as exc:  # the runner saw the flush first and recreated it
        assert "BUSYGROUP" in str(exc)
    return coordinator["url"]


def post_raw(api: str, body: str | bytes, headers=JSON, **kwargs) -> httpx.Response:
    return httpx.post(f"{api}/v1/jobs", content=body, headers=headers, timeout=30, **kwargs)


def fields_of(resp) -> set[str]:
    return {d["field"] for d in resp.json()["detail"]}


def assert_list_still_works(api: str, expected_jobs: int | None = 0) -> None:
    resp = httpx.get(f"{api}/v1/jobs")
    assert resp.status_code == 200, resp.text
    if expected_jobs is not None:
        assert len(resp.json()["jobs"]) == expected_jobs


# -- output_dir: only under the output roots, only into a new or empty directory -------------------------


@pytest.mark.parametrize("output_dir", ["/", "/etc", "../../somewhere", "/tmp/elsewhere", "..", ".", "a/../..",
                                        "/proc/self"])
def test_output_dir_outside_the_roots_is_a_422_naming_the_field(api, tiny_models, output_dir):
    resp = httpx.post(f"{api}/v1/jobs", json=tiny_job(tiny_models, output_dir=output_dir))
    assert resp.status_code == 422, resp.text
    assert fields_of(resp) == {"output_dir"} and "output roots" in resp.text
    assert_list_still_works(api)


def test_the_rest_of_the_data_directory_is_outside_the_roots(api, coordinator, tiny_models):
    weights = coordinator["jobs"].parent / "weights" / "someone-else"
    resp = httpx.post(f"{api}/v1/jobs", json=tiny_job(tiny_models, output_dir=str(weights)))
    assert resp.status_code == 422 and fields_of(resp) == {"output_dir"}


def test_a_symlink_out_of_the_root_is_followed_and_refused(api, coordinator, tiny_models, tmp_path):
    coordinator["jobs"].mkdir(parents=True, exist_ok=True)
    link = coordinator["jobs"] / "escape"
    link.unlink(missing_ok=True)
    link.symlink_to(tmp_path)
    try:
        resp = httpx.post(f"{api}/v1/jobs", json=tiny_job(tiny_models, output_dir="escape/out"))
        assert resp.status_code == 422 and fields_of(resp) == {"output_dir"}, resp.text
    finally:
        link.unlink()


def test_a_directory_holding_files_is_refused_and_nothing_in_it_is_touched(api, coordinator, tiny_models):
    taken = coordinator["jobs"] / "taken"
    (taken / "student").mkdir(parents=True, exist_ok=True)
    keep = taken / "student" / "model.safetensors"
    keep.write_text("not this job's")
    resp = httpx.post(f"{api}/v1/jobs", json=tiny_job(tiny_models, output_dir=str(taken)))
    assert resp.status_code == 422 and fields_of(resp) == {"output_dir"}
    assert "already holds files" in resp.text and keep.read_text() == "not this job's"


def test_a_relative_output_dir_goes_under_the_root_and_the_job_claims_it(api, coordinator, tiny_models):
    job = submit(api, tiny_job(tiny_models, output_dir="runs/first"))
    out = coordinator["jobs"] / "runs" / "first"
    assert job["output_dir"] == str(out)
    wait_job(api, job["id"], states=("running",))  # no services here: the first job stays running
    assert (out / ".asyncopd-job").read_text().strip() == job["id"]
    httpx.post(f"{api}/v1/jobs/{job['id']}/cancel")


def test_a_queued_jobs_directory_filled_meanwhile_fails_it_at_start_untouched(api, coordinator, tiny_models):
    first = submit(api, tiny_job(tiny_models))
    wait_job(api, first["id"], states=("running",))
    second = submit(api, tiny_job(tiny_models, output_dir="later"))
    intruder = coordinator["jobs"] / "later" / "checkpoints" / "latest"
    intruder.parent.mkdir(parents=True)
    intruder.write_text("v999")  # would be loaded on resume
    httpx.post(f"{api}/v1/jobs/{first['id']}/cancel")
    done = wait_job(api, second["id"], timeout_s=30)
    assert done["state"] == "failed" and "already holds files" in done["reason"]
    assert intruder.read_text() == "v999"


def test_a_queued_jobs_directory_swapped_for_a_link_out_of_the_root_fails_it(api, coordinator, tiny_models,
                                                                             tmp_path):
    first = submit(api, tiny_job(tiny_models))
    wait_job(api, first["id"], states=("running",))
    second = submit(api, tiny_job(tiny_models, output_dir="swapped"))
    outside = tmp_path / "outside"
    outside.mkdir()
    (coordinator["jobs"] / "swapped").symlink_to(outside)  # after the check at submission
    httpx.post(f"{api}/v1/jobs/{first['id']}/cancel")
    done = wait_job(api, second["id"], timeout_s=30)
    assert done["state"] == "failed" and "outside the output roots" in done["reason"]
    assert not any(outside.iterdir())


# -- every number bounded and finite; a stored record that stops validating never takes the list down -------


SPEC_WITH = {
    "grad_clip": '"train": {"grad_clip": %s}',
    "is_cap": '"objective": {"kind": "reverse_kl_sampled", "correction": "truncated_is", "is_cap": %s}',
    "behavior_cap": '"objective": {"kind": "decoupled_ppo", "behavior_cap": %s}',
    "learning_rate": '"train": {"learning_rate": %s}',
}


@pytest.mark.parametrize("value", ["Infinity", "-Infinity", "NaN", "1e999", '"inf"', '"nan"'])
@pytest.mark.parametrize("where", sorted(SPEC_WITH))
def test_non_finite_numbers_are_a_422_and_the_list_keeps_working(api, tiny_models, where, value):
    base = json.dumps(tiny_job(tiny_models))[:-1]
    resp = post_raw(api, base + ", " + SPEC_WITH[where] % value + "}")
    assert resp.status_code == 422, resp.text
    assert any(f.startswith(("train.grad_clip", "train.learning_rate", "objective")) for f in fields_of(resp))
    assert_list_still_works(api)


@pytest.mark.parametrize("text", ["train: {grad_clip: .inf}", "objective: {kind: decoupled_ppo, behavior_cap: .nan}"])
def test_yaml_infinities_are_a_422(api, tiny_models, text):
    import yaml

    spec = tiny_job(tiny_models)
    spec.pop("train")
    resp = post_raw(api, yaml.safe_dump(spec) + text + "\n", YAML)
    assert resp.status_code == 422, resp.text


@pytest.mark.parametrize("patch,field", [
    ({"train": {"seed": 2**70}}, "train.seed"),
    ({"train": {"warmup_steps": 10**15}}, "train.warmup_steps"),
    ({"train": {"checkpoint_every": 10**15}}, "train.checkpoint_every"),
    ({"train": {"grad_clip": 1e300}}, "train.grad_clip"),
    ({"max_lost_fraction": 2}, "max_lost_fraction"),
    ({"output_dir": "x" * 5000}, "output_dir"),
])
def test_numbers_and_lengths_are_bounded(api, tiny_models, patch, field):
    resp = httpx.post(f"{api}/v1/jobs", json=tiny_job(tiny_models, **patch))
    assert resp.status_code == 422 and field in fields_of(resp), resp.text


def test_a_stored_record_that_no_longer_validates_shows_as_a_failed_job(api, r, tiny_models):
    good = submit(api, tiny_job(tiny_models))
    spec = json.loads(r.hget(state.job_key(good["id"]), "spec"))
    spec["train"]["grad_clip"] = None  # what `Infinity` was stored as before specs were bounded
    broken = {"old-0000000a": {"spec": json.dumps(spec)}, "old-0000000b": {"spec": "{not json"},
              "old-0000000c": {"state": "exploded"}}
    for job_id, fields in broken.items():
        r.hset(state.job_key(job_id), mapping={"id": job_id, "name": "old", "state": "succeeded",
                                               "created_at": 1.0, "output_dir": "/x", **fields})
        r.zadd(state.JOBS, {job_id: 1.0})
    r.rpush(state.steps_key(good["id"]), "garbage", json.dumps({"schema": "asyncopd.step/99"}))
    resp = httpx.get(f"{api}/v1/jobs")
    assert resp.status_code == 200, resp.text
    views = {j["id"]: j for j in resp.json()["jobs"]}
    for job_id in broken:
        assert views[job_id]["state"] == "failed" and "no longer validates" in views[job_id]["reason"]
        assert views[job_id]["spec"] is None
        one = httpx.get(f"{api}/v1/jobs/{job_id}")
        assert one.status_code == 200 and one.json()["state"] == "failed"
    assert views[good["id"]]["spec"] is not None
    steps = httpx.get(f"{api}/v1/jobs/{good['id']}/steps")
    assert steps.status_code == 200 and steps.json()["steps"] == []


def test_a_queued_job_whose_record_no_longer_validates_fails_instead_of_blocking_the_queue(api, r, tiny_models):
    first = submit(api, tiny_job(tiny_models))
    wait_job(api, first["id"], states=("running",))
    queued = submit(api, tiny_job(tiny_models))
    after = submit(api, tiny_job(tiny_models))
    spec = json.loads(r.hget(state.job_key(queued["id"]), "spec"))
    spec["train"]["grad_clip"] = None
    r.hset(state.job_key(queued["id"]), "spec", json.dumps(spec))
    httpx.post(f"{api}/v1/jobs/{first['id']}/cancel")
    for _ in range(300):  # the view says failed at once (unreadable); the runner must record it
        if r.hget(state.job_key(queued["id"]), "state") == "failed":
            break
        time.sleep(0.1)
    done = httpx.get(f"{api}/v1/jobs/{queued['id']}").json()
    assert done["state"] == "failed" and "train.grad_clip" in done["reason"], done
    assert r.lpos(state.QUEUE, queued["id"]) is None
    assert wait_job(api, after["id"], states=("running",), timeout_s=30)["state"] == "running"
    httpx.post(f"{api}/v1/jobs/{after['id']}/cancel")


# -- job ids: a pattern the API owns, checked before any Redis key is built ----------------------------------


def job_keys(r) -> dict[str, str]:
    """Every key but the heartbeats (which come and go on their own)."""
    return {k: r.type(k) for k in r.keys("*") if not k.startswith("asyncopd:svc:")}


def test_ids_that_cannot_be_a_jobs_are_404_and_touch_nothing(api, r, tiny_models):
    job = submit(api, tiny_job(tiny_models))
    wait_job(api, job["id"], states=("running",))
    before = job_keys(r)
    view = httpx.get(f"{api}/v1/jobs/{job['id']}").json()
    tries = [f"{job['id']}:lost", f"{job['id']}:steps", f"{job['id']}:progress", f"{job['id']}:version", "*",
             "x" * 5000, "%2e%2e", "t-1234567", f"{job['id']}%0A", "t-ABCDEF12", "..%2F..%2Fetc"]
    for bad in tries:
        for method, path in (("GET", ""), ("GET", "/steps"), ("GET", "/evals"), ("POST", "/cancel")):
            resp = httpx.request(method, f"{api}/v1/jobs/{bad}{path}")
            assert resp.status_code == 404, (method, bad, path, resp.text)
    assert job_keys(r) == before
    again = httpx.get(f"{api}/v1/jobs/{job['id']}").json()
    assert again["state"] == view["state"] == "running" and again["progress"] == view["progress"]
    assert_list_still_works(api, expected_jobs=1)
    httpx.post(f"{api}/v1/jobs/{job['id']}/cancel")


# -- bodies: text only, bounded depth and size, parsed off the event loop, JSON or YAML only -----------------


@pytest.mark.parametrize("body", [
    '{"name": "\\ud800"}',
    '{"\\udc00": 1}',
    '{"prompts": {"path": "a\\udfffb"}}',
])
def test_lone_surrogate_escapes_are_a_400(api, body):
    resp = post_raw(api, body)
    assert resp.status_code == 400 and "surrogate" in resp.json()["detail"], resp.text


def test_a_surrogate_pair_is_one_character_and_answers_a_422(api, tiny_models):
    body = json.dumps(tiny_job(tiny_models))[:-1] + ', "output_dir": "\\ud83d\\ude00/out", "name": "\\ud83d\\ude00"}'
    resp = post_raw(api, body)
    assert resp.status_code == 422 and fields_of(resp) == {"name"}, resp.text


def test_a_yaml_surrogate_escape_is_a_400(api):
    resp = post_raw(api, 'name: "\\ud83d\\ude00"\n', YAML)
    assert resp.status_code == 400, resp.text


@pytest.mark.parametrize("body,headers", [
    ("[" * 100_000, JSON),
    ('{"objective": ' + "[" * 40 + "]" * 40 + "}", JSON),
    ("[" * 5000, YAML),
    ("a: &a [*a]\n", YAML),
    ("a: &a [x,x,x,x,x,x,x,x,x]\n" + "".join(f"{c}: &{c} [" + ",".join([f"*{p}"] * 9) + "]\n"
                                             for p, c in zip("abcdefghi", "bcdefghij", strict=True)), YAML),
], ids=["json-100k-deep", "json-40-deep-in-a-field", "yaml-5000-deep", "yaml-self-alias", "yaml-billion-laughs"])
def test_deep_recursive_and_exploding_bodies_are_a_400_quickly(api, body, headers):
    t0 = time.monotonic()
    resp = post_raw(api, body, headers)
    assert resp.status_code == 400, resp.text
    assert time.monotonic() - t0 < 5
    assert httpx.get(f"{api}/healthz").status_code == 200


@pytest.mark.parametrize("body", [b"\xff\xfe{}", b'{"name": "\xc3\x28"}'])
def test_bodies_that_are_not_utf8_are_a_400(api, body):
    assert post_raw(api, body).status_code == 400


def test_an_oversized_body_is_a_413_before_it_is_read(api):
    big = json.dumps(list(range(300_000))).encode()  # ~2 MB: blocked the event loop for 18 s before
    t0 = time.monotonic()
    assert post_raw(api, big).status_code == 413
    chunked = post_raw(api, iter([big[i:i + 65536] for i in range(0, len(big), 65536)]))
    assert chunked.status_code == 413 and "max_body_bytes" in chunked.text
    assert time.monotonic() - t0 < 5
    put = httpx.put(f"{api}/v1/pools/rollout", content=b'{"replicas": 1, "pad": "' + b"x" * 400_000 + b'"}',
                    headers=JSON)
    assert put.status_code == 413


def test_the_api_keeps_answering_while_a_large_body_is_parsed(api):
    body = "[" + ", ".join(["1"] * 80_000) + "]"  # ~240 KB of YAML: seconds of parsing, in a worker thread
    result = {}
    worker = threading.Thread(target=lambda: result.setdefault("resp", post_raw(api, body, YAML)))
    worker.start()
    time.sleep(0.2)
    latencies = []
    while worker.is_alive() and len(latencies) < 20:
        t0 = time.monotonic()
        assert httpx.get(f"{api}/healthz", timeout=5).status_code == 200
        latencies.append(time.monotonic() - t0)
        time.sleep(0.1)
    worker.join(60)
    assert result["resp"].status_code == 422  # a list, not a job spec
    assert max(latencies, default=0) < 1.0, latencies


@pytest.mark.parametrize("headers", [{"content-type": "text/plain"}, {},
                                     {"content-type": "application/x-www-form-urlencoded"},
                                     {"content-type": "multipart/form-data; boundary=x"},
                                     {"content-type": "text/html"}])
def test_only_json_and_yaml_media_types_are_taken(api, tiny_models, headers):
    resp = post_raw(api, json.dumps(tiny_job(tiny_models)), headers)
    assert resp.status_code == 415, resp.text
    assert_list_still_works(api)


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-8", "application/yaml", "text/yaml",
                                          "application/x-yaml"])
def test_json_and_yaml_media_types_are_taken(api, tiny_models, content_type):
    resp = post_raw(api, json.dumps(tiny_job(tiny_models)), {"content-type": content_type})
    assert resp.status_code == 201, resp.text


@pytest.mark.parametrize("body", ['{"replicas": "2"}', '{"replicas": true}', '{"replicas": 2.0}', '{"replicas": 2.5}',
                                  '{"replicas": -1}', '{"replicas": 100000}', '{"replicas": 1, "extra": 1}',
                                  '{"replicas": 1e999}', "[]", "2", '{"replicas": null}', "{"])
def test_scaling_takes_an_integer_and_nothing_else(api, body):
    resp = httpx.put(f"{api}/v1/pools/rollout", content=body, headers=JSON)
    assert resp.status_code in (400, 422), resp.text
    detail = resp.json()["detail"]
    assert isinstance(detail, str) or all({"loc", "field", "msg", "type"} <= d.keys() for d in detail)
    assert httpx.get(f"{api}/v1/pools").json()["rollout"]["desired"] == 0


def test_scaling_needs_a_json_body(api):
    resp = httpx.put(f"{api}/v1/pools/rollout", content='{"replicas": 1}', headers={"content-type": "text/plain"})
    assert resp.status_code == 415
    assert httpx.put(f"{api}/v1/pools/rollout", content='{"replicas": 0}', headers=JSON).json() == {"replicas": 0}


def test_query_parameter_errors_use_the_one_error_shape(api, tiny_models):
    job = submit(api, tiny_job(tiny_models))
    resp = httpx.get(f"{api}/v1/jobs/{job['id']}/steps", params={"limit": "lots"})
    assert resp.status_code == 422
    assert resp.json()["detail"][0]["field"] == "limit" and resp.json()["detail"][0]["loc"] == ["query", "limit"]


# -- a failure while starting a job fails that job, with a reason -------------------------------------------


def test_a_prompt_file_that_is_not_utf8_fails_the_job(api, tiny_models, tmp_path):
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes('{"prompt": "caf\xe9"}\n'.encode("latin-1"))
    job = wait_job(api, submit(api, tiny_job(tiny_models, prompts={"path": str(bad)}))["id"], timeout_s=30)
    assert job["state"] == "failed" and "not UTF-8" in job["reason"]


def test_a_prompt_line_nested_too_deeply_fails_the_job(api, tiny_models, tmp_path):
    bad = tmp_path / "deep.jsonl"
    bad.write_text('{"prompt": "ok"}\n' + "[" * 100_000 + "\n")
    job = wait_job(api, submit(api, tiny_job(tiny_models, prompts={"path": str(bad)}))["id"], timeout_s=30)
    assert job["state"] == "failed" and "line 2" in job["reason"]


def test_a_prompt_longer_than_the_engines_context_fails_at_preflight_naming_its_line(api, tiny_models, tmp_path):
    prompts = tmp_path / "long.jsonl"
    prompts.write_text('{"prompt": "Q: 1+1= A:"}\n\n{"prompt": "Q: 2+2= A:"}\n'
                       + json.dumps({"prompt": "Q: " + "12+34 " * 800 + "= A:"}) + "\n")
    job = wait_job(api, submit(api, tiny_job(tiny_models, prompts={"path": str(prompts)}))["id"], timeout_s=60)
    assert job["state"] == "failed" and "line 4" in job["reason"] and "max_model_len of 1024" in job["reason"]


def test_a_generation_budget_over_the_context_fails_at_preflight(api, tiny_models):
    job = submit(api, tiny_job(tiny_models, generation={"max_tokens": 4096}))
    done = wait_job(api, job["id"], timeout_s=30)
    assert done["state"] == "failed" and "generation.max_tokens" in done["reason"]


# -- a job that trained nothing, or lost too much, fails instead of succeeding -----------------------------


def complete_as_the_learner_would(r, job: dict, trained: int, lost: int, batches: int) -> None:
    from asyncopd.records import CompletedEvent, Progress
    from asyncopd.streams import lost_key

    r.hset(state.job_key(job["id"]), "released_batches", batches)
    r.hset(state.progress_key(job["id"]), mapping=Progress(step=batches, samples_trained=trained).to_hash())
    if lost:
        r.hset(lost_key(job["id"]), "0", lost)
    state.add_event(r, CompletedEvent(job_id=job["id"], service="learner", result_dir="/nowhere"))


@pytest.mark.parametrize("trained,lost,final,needle", [
    (0, 48, "failed", "trained no sample"),
    (24, 24, "failed", "more than max_lost_fraction 0.1"),
    (46, 2, "succeeded", None),
])
def test_a_job_that_lost_its_samples_fails(api, r, tiny_models, trained, lost, final, needle):
    job = submit(api, tiny_job(tiny_models, train={"steps": 6}))  # 4 prompts x 2 samples = 8 per step
    wait_job(api, job["id"], states=("running",))
    complete_as_the_learner_would(r, job, trained, lost, batches=6)
    done = wait_job(api, job["id"], timeout_s=30)
    assert done["state"] == final, done
    if needle:
        assert needle in done["reason"] and "asyncopd:dead-letter" in done["reason"]
