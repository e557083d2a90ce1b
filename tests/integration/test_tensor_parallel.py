"""`ASYNCOPD_TENSOR_PARALLEL_SIZE` (the chart sets a rollout or teacher pod's `gpus`): a model vLLM cannot shard
that many ways fails its job at load with a reason naming the numbers, before vLLM is imported or started; the
HF engine, which serves on one device, refuses the setting when the service starts. Real parts only: a
redis-server, the coordinator and a rollout worker as processes, transformers configs, the rendered chart."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from transformers import AutoConfig, LlamaConfig

from asyncopd import state
from asyncopd.ml.engines import build_engine
from asyncopd.ml.engines.vllm_engine import check_tensor_parallel
from asyncopd.ports import free_port
from asyncopd.tools.localstack import base_env
from tests.helpers import ROOT, submit, tiny_job, wait_job, wait_until_ready


def spawn(name: str, env: dict[str, str], log: Path) -> subprocess.Popen:
    full = {k: v for k, v in os.environ.items() if k != "ASYNCOPD_API_TOKEN"} | env
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", f"services.{name}"], env=full, cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT)


def test_a_student_whose_heads_do_not_divide_fails_its_job_at_load_without_starting_vllm(
        r, redis_server, tiny_models, tmp_path):
    student = str(tiny_models["student"])
    assert AutoConfig.from_pretrained(student).num_attention_heads == 2  # the QUICK student
    env = base_env(tmp_path, redis_server)
    port = free_port()
    coordinator = spawn("coordinator", env | {"ASYNCOPD_HTTP_PORT": str(port), "ASYNCOPD_ROLLOUT_REPLICAS": "0"},
                        tmp_path / "coordinator.log")
    rollout = spawn("rollout", env | {"ASYNCOPD_ENGINE": "vllm", "ASYNCOPD_INSTANCE": "rollout-tp3",
                                      "ASYNCOPD_TENSOR_PARALLEL_SIZE": "3"}, tmp_path / "rollout.log")
    try:
        api = f"http://127.0.0.1:{port}"
        wait_until_ready(api, coordinator, tmp_path / "coordinator.log")
        deadline = time.monotonic() + 120
        while not state.live_services(r, "rollout"):  # the worker's own start is not what is timed
            assert rollout.poll() is None and time.monotonic() < deadline, (tmp_path / "rollout.log").read_text()
            time.sleep(0.1)
        t0 = time.monotonic()
        job = submit(api, tiny_job(tiny_models))
        done = wait_job(api, job["id"], timeout_s=120)
        elapsed = time.monotonic() - t0
        logs = (tmp_path / "rollout.log").read_text(errors="replace")
        assert done["state"] == "failed", logs[-3000:]
        assert done["reason"] == (f"rollout could not load {student!r}: tensor_parallel_size 3 does not divide the "
                                  "model's 2 attention heads (vLLM gives each GPU a whole number of heads)")
        # vLLM was not asked: its engine logs "non-default args" and "Initializing a V1 LLM engine" first thing.
        assert "non-default args" not in logs and "Initializing a V1 LLM engine" not in logs, logs[-3000:]
        assert elapsed < 30, f"the job took {elapsed:.0f} s to fail"  # measured: 3.4 s on a busy 2-core machine
        assert done["progress"]["samples_trained"] == 0
        assert rollout.poll() is None, logs[-3000:]  # the worker outlives the job
    finally:
        for proc in (rollout, coordinator):
            proc.terminate()
        for proc in (rollout, coordinator):
            proc.wait(60)


@pytest.mark.parametrize(("config", "tp", "message"), [
    # 6 heads over 2: fine; 3 kv heads over 2 is neither a sharding nor a replication (vLLM: an assert in its
    # workers, "WorkerProc initialization failed" after ~50 s here).
    (LlamaConfig(num_attention_heads=6, num_key_value_heads=3, hidden_size=192, vocab_size=259), 2,
     "tensor_parallel_size 2 and the model's 3 key-value heads: one must divide the other"),
    # A vocabulary padded to 320 = 5 x 64 does not split 3 ways.
    (LlamaConfig(num_attention_heads=6, num_key_value_heads=6, hidden_size=192, vocab_size=259), 3,
     "tensor_parallel_size 3 does not divide the model's vocabulary of 259 padded to 320"),
    (LlamaConfig(num_attention_heads=12, num_key_value_heads=2, hidden_size=768, vocab_size=32000), 8,
     "tensor_parallel_size 8 does not divide the model's 12 attention heads"),
    (LlamaConfig(num_attention_heads=4, num_key_value_heads=4, hidden_size=128, intermediate_size=302,
                 vocab_size=256), 4,
     r"tensor_parallel_size 4 does not divide the model's MLP width \(intermediate_size 302"),
])
def test_what_vllm_cannot_shard_is_named(config, tp, message):
    with pytest.raises(ValueError, match=message):
        check_tensor_parallel(config, tp)


@pytest.mark.parametrize(("config", "tp"), [
    (LlamaConfig(num_attention_heads=12, num_key_value_heads=2, hidden_size=768, vocab_size=65536), 4),  # 1.5b
    (LlamaConfig(num_attention_heads=32, num_key_value_heads=8, hidden_size=4096, vocab_size=32000), 8),
    (LlamaConfig(num_attention_heads=2, num_key_value_heads=1, hidden_size=64, vocab_size=259), 2),  # kv replicated
    (LlamaConfig(num_attention_heads=6, num_key_value_heads=6, hidden_size=192, vocab_size=259), 1),
])
def test_what_vllm_can_shard_passes(config, tp):
    check_tensor_parallel(config, tp)


@pytest.mark.parametrize("service", ["rollout", "teacher"])
def test_the_hf_engine_refuses_tensor_parallelism_when_the_service_starts(service, redis_server, tmp_path):
    env = base_env(tmp_path, redis_server) | {"ASYNCOPD_ENGINE": "hf", "ASYNCOPD_TENSOR_PARALLEL_SIZE": "2"}
    proc = spawn(service, env, tmp_path / "service.log")
    try:
        assert proc.wait(60) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
    log = (tmp_path / "service.log").read_text(errors="replace")
    assert "tensor_parallel_size 2 needs engine=vllm: the HF engine serves on one device" in log, log[-3000:]


def test_build_engine_refuses_tensor_parallelism_on_the_hf_engine(tiny_models):
    with pytest.raises(ValueError, match="tensor_parallel_size 2 needs the vllm engine"):
        build_engine("hf", str(tiny_models["student"]), device="cpu", dtype="float32", seed=0, max_model_len=128,
                     kv_cache_bytes=0, gpu_memory_utilization=0.5, tensor_parallel_size=2)


@pytest.fixture(scope="module")
def chart():
    from tests.deploy.chart_support import chartcheck

    chartcheck.ensure_tools()
    return chartcheck


def engine_env(chart, *args: str) -> dict[str, str]:
    """component -> ASYNCOPD_TENSOR_PARALLEL_SIZE of its container, rendered with the default values + args."""
    p = chart.helm_template(list(args))
    assert p.returncode == 0, p.stderr
    out = {}
    for m in chart.manifests(p.stdout):
        component = m.get("metadata", {}).get("labels", {}).get("app.kubernetes.io/component")
        if m["kind"] == "Deployment" and component in ("rollout", "teacher"):
            env = {e["name"]: e.get("value") for e in m["spec"]["template"]["spec"]["containers"][0]["env"]}
            out[component] = env["ASYNCOPD_TENSOR_PARALLEL_SIZE"]
    return out


def test_the_chart_shards_over_the_pods_gpus(chart):
    assert engine_env(chart) == {"rollout": "1", "teacher": "1"}
    assert engine_env(chart, "--set", "teacher.gpus=4", "--set", "rollout.gpus=2") == {"rollout": "2",
                                                                                        "teacher": "4"}
    assert engine_env(chart, "--set", "rollout.gpus=0", "--set", "rollout.config.device=cpu") == {
        "rollout": "1", "teacher": "1"}
    p = chart.helm_template(["--set", "teacher.gpus=2", "--set", "teacher.config.engine=hf"])
    assert p.returncode != 0
    assert ("teacher.gpus=2 runs vLLM with tensor parallelism over the pod's GPUs, but teacher.config.engine=hf "
            "serves on one device: set teacher.config.engine=vllm or teacher.gpus=1") in p.stderr, p.stderr
