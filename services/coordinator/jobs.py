"""Job records in Redis: the queue, states and the summary `GET /v1/jobs/{id}` returns.

States: queued → running → succeeded | failed | cancelled (and queued → cancelled). Progress figures are
derived from the learner's per-step records, never kept as separate counters that could drift.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import redis

from asyncopd import state, streams
from asyncopd.jobspec import JobSpec, output_dir_for

TERMINAL = ("succeeded", "failed", "cancelled")


class JobNotFound(KeyError):
    pass


class JobConflict(ValueError):
    pass


class JobStore:
    def __init__(self, r: redis.Redis, data_dir: Path) -> None:
        self.r, self.data_dir = r, data_dir

    def create(self, spec: JobSpec) -> str:
        job_id = f"{spec.name}-{uuid.uuid4().hex[:8]}"
        now = time.time()
        pipe = self.r.pipeline()
        pipe.hset(state.job_key(job_id), mapping={
            "id": job_id, "name": spec.name, "spec": spec.model_dump_json(), "state": "queued",
            "created_at": now, "output_dir": str(output_dir_for(spec, job_id, self.data_dir).absolute()),
            "released_batches": 0,
        })
        pipe.zadd(state.JOBS, {job_id: now})
        pipe.rpush(state.QUEUE, job_id)
        pipe.execute()
        return job_id

    def exists(self, job_id: str) -> bool:
        return bool(self.r.exists(state.job_key(job_id)))

    def spec(self, job_id: str) -> JobSpec:
        return JobSpec.model_validate_json(self.r.hget(state.job_key(job_id), "spec"))

    def field(self, job_id: str, name: str) -> str | None:
        return self.r.hget(state.job_key(job_id), name)

    def set(self, job_id: str, **fields) -> None:
        self.r.hset(state.job_key(job_id), mapping={k: v for k, v in fields.items() if v is not None})

    def finish(self, job_id: str, final: str, **fields) -> bool:
        """Move a running or queued job to a terminal state once; False if it already was terminal."""
        with self.r.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(state.job_key(job_id), state.ACTIVE)
                    if pipe.hget(state.job_key(job_id), "state") in TERMINAL:
                        pipe.unwatch()
                        return False
                    active = pipe.get(state.ACTIVE)
                    pipe.multi()
                    pipe.hset(state.job_key(job_id), mapping={"state": final, "finished_at": time.time(),
                                                              **{k: str(v) for k, v in fields.items()}})
                    pipe.lrem(state.QUEUE, 0, job_id)
                    if active == job_id:
                        pipe.delete(state.ACTIVE)
                    pipe.execute()
                    return True
                except redis.WatchError:
                    continue

    def cancel(self, job_id: str) -> dict:
        if not self.exists(job_id):
            raise JobNotFound(job_id)
        if not self.finish(job_id, "cancelled", reason="cancelled by request"):
            raise JobConflict(f"job {job_id} is already {self.field(job_id, 'state')}")
        return self.view(job_id)

    def next_queued(self) -> str | None:
        return self.r.lpop(state.QUEUE)

    def ids(self) -> list[str]:
        return self.r.zrange(state.JOBS, 0, -1)

    def view(self, job_id: str) -> dict:
        h = self.r.hgetall(state.job_key(job_id))
        if not h:
            raise JobNotFound(job_id)
        spec = JobSpec.model_validate_json(h["spec"])
        steps = [json.loads(s) for s in self.r.lrange(state.steps_key(job_id), 0, -1)]
        released_batches = int(h.get("released_batches", 0))
        lost = sum(int(v) for v in self.r.hgetall(streams.lost_key(job_id)).values())
        queue = self.r.lrange(state.QUEUE, 0, -1)
        last = steps[-1] if steps else {}
        evals = self.r.lrange(state.evals_key(job_id), -1, -1)
        return {
            "id": job_id,
            "name": h["name"],
            "state": h["state"],
            "reason": h.get("reason"),
            "queue_position": queue.index(job_id) + 1 if job_id in queue else None,
            "created_at": float(h["created_at"]),
            "started_at": float(h["started_at"]) if "started_at" in h else None,
            "finished_at": float(h["finished_at"]) if "finished_at" in h else None,
            "output_dir": h["output_dir"],
            "result_dir": h.get("result_dir"),
            "progress": {
                "step": last.get("step", 0),
                "steps": spec.train.steps,
                "policy_version": state.policy_version(self.r, job_id),
                "prompts_released": released_batches * spec.train.prompts_per_step,
                "samples_released": released_batches * spec.samples_per_step(),
                "samples_trained": sum(s["samples"] for s in steps),
                "samples_dropped_stale": sum(s["dropped_stale"] for s in steps),
                "samples_dead_lettered": lost,
                "max_staleness_trained": max((s["max_staleness"] for s in steps), default=0),
                "last_loss": last.get("loss"),
                "last_kl": last.get("kl"),
                "last_eval": json.loads(evals[0]) if evals else None,
            },
            "spec": spec.model_dump(mode="json"),
        }

    def records(self, job_id: str) -> dict[str, list[dict]]:
        """The learner's per-step records and its held-out evaluations."""
        if not self.exists(job_id):
            raise JobNotFound(job_id)
        return {name: [json.loads(s) for s in self.r.lrange(key(job_id), 0, -1)]
                for name, key in (("steps", state.steps_key), ("evals", state.evals_key))}
