"""The stack started from its own images: Redis here, the four services from the CPU variants of their images
(non-root, read-only root filesystem, the chart's mounts and environment), a job submitted over REST runs to
the end and exports a student that loads and differs from the one it started from, its versions received by
the rollout over the `nccl` transport (vLLM's weight transfer, gloo on CPUs)."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import torch
from safetensors.torch import load_file

from tests.helpers import ROOT, check_accounting, steps, submit, tiny_job, wait_job
from tests.images.conftest import UID


def wait_ready(api: str, containers, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        for c in containers:
            assert c.proc.poll() is None, f"{c.log.stem} exited {c.proc.returncode}:\n{c.output()[-3000:]}"
        try:
            pools = httpx.get(f"{api}/v1/pools").json()
            if httpx.get(f"{api}/readyz").status_code == 200 and pools["rollout"]["live"] >= 1:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "the stack from the images was not ready in time"
        time.sleep(0.5)


def tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_a_job_runs_end_to_end_from_the_images(pods, tiny_models, r):
    pods.put(tiny_models["student"], "models/student")
    pods.put(tiny_models["teacher"], "models/teacher")
    pods.put(ROOT / "examples" / "arith-train.jsonl", "prompts/train.jsonl")
    containers = [pods.start(s) for s in ("coordinator", "teacher", "learner", "rollout")]
    api = pods.api()
    wait_ready(api, containers)

    spec = tiny_job({"student": "/data/models/student", "teacher": "/data/models/teacher"},
                    prompts={"path": "/data/prompts/train.jsonl"},
                    train={"steps": 8, "prompts_per_step": 4, "learning_rate": 1e-3, "checkpoint_every": 4})
    job = submit(api, spec)
    done = wait_job(api, job["id"], timeout_s=600)
    check_accounting(done, steps(api, job["id"]), eta=spec["max_staleness"])
    learner = next(c for c in containers if c.log.stem == "learner").output()
    assert "sent to 1 follower" in learner, learner[-3000:]  # the learner image's vLLM, the rollout's plugin

    # The exported student: written by the pods' user under the shared volume, a loadable HF model, trained.
    result = pods.data / Path(done["result_dir"]).relative_to("/data")
    assert result.stat().st_uid == UID
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(result)
    before, after = tensors(tiny_models["student"]), tensors(result)
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k].to(before[k].dtype)) for k in before)

    # A graceful stop: SIGTERM to each service (PID 1 in its container) ends it with status 0.
    codes = pods.stop_all()
    assert codes == dict.fromkeys(("rollout", "learner", "teacher", "coordinator"), 0), codes
