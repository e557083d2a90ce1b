"""Shared by the integration and end-to-end tests: job specs and polling against a live coordinator."""

from __future__ import annotations

import time
from pathlib import Path

import httpx

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


def wait_job(api: str, job_id: str, states=("succeeded", "failed", "cancelled"), timeout_s: float = 300) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = httpx.get(f"{api}/v1/jobs/{job_id}").json()
        if job["state"] in states:
            return job
        time.sleep(0.3)
    raise TimeoutError(f"job {job_id} still {job['state']} after {timeout_s}s: {job}")


def submit(api: str, spec: dict) -> dict:
    resp = httpx.post(f"{api}/v1/jobs", json=spec)
    assert resp.status_code == 201, resp.text
    return resp.json()
