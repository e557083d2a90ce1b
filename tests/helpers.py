"""Shared by the integration and end-to-end tests: job specs and polling against a live coordinator."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from asyncopd import state
from asyncopd.client import Client
from asyncopd.records import TERMINAL_STATES

ROOT = Path(__file__).resolve().parent.parent


def tiny_job(models: dict, **overrides) -> dict:
    spec = {
        "name": "t",
        "student": {"model": str(models["student"])},
        "teacher": {"model": str(models["teacher"])},
        "prompts": {"path": str(ROOT / "examples" / "arith-train.jsonl")},
        "max_staleness": 1,
        "generation": {"n": 2, "max_tokens": 8},
        "scoring": {"top_k": 4},
        "train": {"steps": 6, "prompts_per_step": 4, "learning_rate": 1e-3, "checkpoint_every": 3},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    return spec


def wait_job(api: str, job_id: str, states=TERMINAL_STATES, timeout_s: float = 300) -> dict:
    """The job's REST view (as JSON) once it is in one of `states`."""
    deadline = time.monotonic() + timeout_s
    with Client(api) as c:
        while (job := c.job(job_id)).state not in states:
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job.state} after {timeout_s}s: {job}")
            time.sleep(0.3)
    return job.model_dump(mode="json")


def submit(api: str, spec: dict) -> dict:
    with Client(api) as c:
        return c.submit(spec).model_dump(mode="json")


def steps(api: str, job_id: str) -> list[dict]:
    """Every step record of a job, all pages."""
    with Client(api) as c:
        return [s.model_dump(mode="json") for s in c.steps(job_id)]


def check_accounting(job: dict, steps: list[dict], eta: int) -> None:
    p = job["progress"]
    assert job["state"] == "succeeded", job
    assert p["policy_version"] == job["spec"]["train"]["steps"] == len(steps)
    # Nothing vanished: every released sample was trained, dropped as stale, or dead-lettered.
    trained, dropped = sum(s["samples"] for s in steps), sum(s["dropped_stale"] for s in steps)
    assert p["samples_released"] == trained + dropped + p["samples_dead_lettered"]
    assert trained > 0
    for s in steps:
        assert all(0 <= int(k) <= eta for k in s["staleness"]), s
        assert sum(s["staleness"].values()) == s["samples"]


def kill_learner_when(api: str, r, job_id: str, ready) -> int:
    """SIGKILL the learner as soon as `ready(step, lineage)` holds; the step it had reached. The learner is
    stopped (SIGSTOP) while each check reads its progress, so it cannot run past a short window (a restarted
    learner replays its batches in tens of milliseconds each) between a check and the kill."""
    step = 0
    with Client(api) as c:
        for _ in range(6000):
            live = state.live_services(r, "learner")
            if not live:  # restarting: nothing to stop yet
                time.sleep(0.01)
                continue
            learner = live[0]
            try:
                os.kill(learner.pid, signal.SIGSTOP)
            except ProcessLookupError:  # its heartbeat key outlived it
                time.sleep(0.01)
                continue
            step = c.job(job_id).progress.step
            if ready(step, int(r.get(state.lineage_key(job_id)) or 0)):
                break
            os.kill(learner.pid, signal.SIGCONT)
            time.sleep(0.01)
        else:
            raise AssertionError(f"the learner never reached the point to kill it at (step {step})")
    os.kill(learner.pid, signal.SIGKILL)
    for _ in range(500):  # gone from the registry once its heartbeat key is removed or expires
        if not any(s.pid == learner.pid for s in state.live_services(r, "learner")):
            break
        r.delete(state.service_key("learner", learner.instance))
        time.sleep(0.02)
    return step


def wait_until_ready(url: str, proc, log: Path, timeout_s: float = 60) -> None:
    """Until the coordinator at `url` answers /readyz with 200; fails with its log if it exits first."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        assert proc.poll() is None, log.read_text()
        try:
            if httpx.get(f"{url}/readyz").status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"coordinator not ready in {timeout_s:.0f} s"
        time.sleep(0.1)


def transport_stack(run_dir: Path, engine: str, env: dict[str, str]):
    """A local stack (one rollout worker) whose services all run with `env` (a weights transport's settings);
    a generator for a module-scoped fixture: yields the stack's info, tears it down after."""
    from asyncopd.ports import free_port
    from asyncopd.tools import localstack

    info = localstack.up(run_dir, http_port=free_port(), engine=engine, rollouts=1,
                         extra_env={"ASYNCOPD_RECLAIM_IDLE_MS": "5000", **env})
    info["engine"] = engine
    try:
        yield info
    finally:
        localstack.down(run_dir)


def learner_restarted_mid_job(stack: dict, models: dict, max_staleness: int, total_steps: int) -> tuple[dict, list]:
    """A job whose learner is SIGKILLed after step 7 and restarted: the finished job and its step records, with
    the accounting checked, every step recorded once, and the restarted learner on lineage 2."""
    import redis

    from asyncopd.tools import localstack

    api = stack["api_url"]
    r = redis.Redis.from_url(stack["redis_url"], decode_responses=True)
    job = submit(api, tiny_job(models, max_staleness=max_staleness,
                               train={"steps": total_steps, "checkpoint_every": 5}))
    killed_at = kill_learner_when(api, r, job["id"], lambda step, _: step >= 7)
    assert killed_at < total_steps, "the job finished before the learner could be killed"
    localstack.restart(Path(stack["run_dir"]), "learner", stack["engine"])
    done = wait_job(api, job["id"])
    records = steps(api, job["id"])
    check_accounting(done, records, max_staleness)
    assert [s["step"] for s in records] == list(range(1, total_steps + 1))
    assert int(r.get(state.lineage_key(job["id"]))) == 2
    return done, records
