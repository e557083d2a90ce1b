"""Job records in Redis: the queue, states and the summary `GET /v1/jobs/{id}` returns.

States: queued → running → succeeded | failed | cancelled (and queued → cancelled). Progress comes from the
hash the learner writes in the transaction that appends each step record (`records.Progress`), so a view
costs a fixed number of Redis reads however long the job has run.

A stored record that no longer validates (written by another release, or edited by hand) shows as a failed
job with the reason; it never makes the list fail for everyone.
"""

from __future__ import annotations

import functools
import logging
import time
import uuid
from pathlib import Path

import redis
from pydantic import ValidationError

from asyncopd import outputs, state, streams
from asyncopd.api_models import EvalPage, JobProgress, JobView, StepPage
from asyncopd.jobspec import JobSpec
from asyncopd.records import JOB_STATES, TERMINAL_STATES, EvalRecord, Progress, RecordError, StepRecord

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1024)
def parse_spec(text: str) -> JobSpec:
    """A stored spec never changes: every status read of a job would validate the same text again."""
    return JobSpec.model_validate_json(text)


class JobNotFound(KeyError):
    pass


class JobConflict(ValueError):
    pass


class JobStore:
    CREATE = """
    local t = redis.call('TIME')
    local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
    redis.call('HSET', KEYS[1], 'created_at', string.format('%.6f', now), unpack(ARGV, 2))
    redis.call('ZADD', KEYS[2], now, ARGV[1])
    redis.call('RPUSH', KEYS[3], ARGV[1])
    """

    def __init__(self, r: redis.Redis, data_dir: Path, output_roots: list[Path] | None = None) -> None:
        self.r, self.data_dir = r, data_dir
        self.output_roots = list(output_roots or []) or outputs.default_roots(data_dir)
        self._create = r.register_script(self.CREATE)

    def create(self, spec: JobSpec) -> str:
        """Queue a job; `outputs.OutputDirError` (nothing stored) when its output_dir is not allowed."""
        job_id = f"{spec.name}-{uuid.uuid4().hex[:8]}"
        output_dir = outputs.resolve(spec.output_dir, job_id, self.output_roots)
        fields = {"id": job_id, "name": spec.name, "spec": spec.model_dump_json(), "state": "queued",
                  "output_dir": str(output_dir), "released_batches": "0"}
        # One script, stamped with Redis's clock: jobs submitted at the same moment queue in created_at order.
        self._create(keys=[state.job_key(job_id), state.JOBS, state.QUEUE],
                     args=[job_id, *[x for kv in fields.items() for x in kv]])
        return job_id

    def exists(self, job_id: str) -> bool:
        return bool(self.r.exists(state.job_key(job_id)))

    def spec(self, job_id: str) -> JobSpec:
        return parse_spec(self.r.hget(state.job_key(job_id), "spec"))

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
                    if pipe.hget(state.job_key(job_id), "state") in TERMINAL_STATES:
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

    def cancel(self, job_id: str) -> JobView:
        if not self.exists(job_id):
            raise JobNotFound(job_id)
        if not self.finish(job_id, "cancelled", reason="cancelled by request"):
            raise JobConflict(f"job {job_id} is already {self.field(job_id, 'state')}")
        return self.view(job_id)

    def next_queued(self) -> str | None:
        """The job first in the queue, left there: `start` or `finish` takes it out."""
        return self.r.lindex(state.QUEUE, 0)

    def start(self, job_id: str) -> bool:
        """queued -> running, out of the queue and active, in one transaction; False if it is no longer queued
        (cancelled while it was being checked)."""
        with self.r.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(state.job_key(job_id))
                    if pipe.hget(state.job_key(job_id), "state") != "queued":
                        pipe.unwatch()
                        pipe.multi()
                        pipe.lrem(state.QUEUE, 0, job_id)
                        pipe.execute()
                        return False
                    pipe.multi()
                    pipe.hset(state.job_key(job_id), mapping={"state": "running", "started_at": time.time()})
                    pipe.lrem(state.QUEUE, 0, job_id)
                    pipe.set(state.ACTIVE, job_id)
                    pipe.execute()
                    return True
                except redis.WatchError:
                    continue

    def ids(self) -> list[str]:
        return self.r.zrange(state.JOBS, 0, -1)

    def view(self, job_id: str) -> JobView:
        pipe = self.r.pipeline(transaction=False)
        pipe.hgetall(state.job_key(job_id))
        pipe.hgetall(state.progress_key(job_id))
        pipe.hgetall(streams.lost_key(job_id))
        pipe.lpos(state.QUEUE, job_id)
        pipe.lrange(state.evals_key(job_id), -1, -1)
        pipe.get(state.version_key(job_id))
        h, progress_hash, lost, queue_index, last_eval, version = pipe.execute()
        if not h:
            raise JobNotFound(job_id)
        try:
            return self._view(job_id, h, progress_hash, lost, queue_index, last_eval, version)
        except (ValidationError, RecordError, ValueError, KeyError, TypeError) as exc:
            log.warning("job %s: stored record does not validate: %s", job_id, exc)
            return self._unreadable(job_id, h, exc)

    def _unreadable(self, job_id: str, h: dict, exc: Exception) -> JobView:
        def number(key: str) -> float | None:
            try:
                return float(h[key])
            except (KeyError, ValueError):
                return None

        reason = h.get("reason") if h.get("state") == "failed" else None
        return JobView(
            id=job_id, name=h.get("name") or job_id, state="failed",
            reason=reason or f"the stored job record no longer validates: {describe(exc)}",
            created_at=number("created_at") or 0.0, started_at=number("started_at"),
            finished_at=number("finished_at"), output_dir=h.get("output_dir", ""), result_dir=h.get("result_dir"),
            progress=JobProgress(step=0, steps=0, policy_version=0, prompts_released=0, samples_released=0,
                                 samples_trained=0, samples_dropped_stale=0, samples_dead_lettered=0,
                                 max_staleness_trained=0, last_loss=None, last_kl=None, last_eval=None),
            spec=None)

    def _view(self, job_id, h, progress_hash, lost, queue_index, last_eval, version) -> JobView:
        if h.get("state") not in JOB_STATES:
            raise ValueError(f"unknown state {h.get('state')!r}")
        spec = parse_spec(h["spec"])
        progress = Progress.from_hash(progress_hash)
        released_batches = int(h.get("released_batches", 0))
        return JobView(
            id=job_id, name=h["name"], state=h["state"], reason=h.get("reason"),
            queue_position=queue_index + 1 if queue_index is not None else None,
            created_at=float(h["created_at"]),
            started_at=float(h["started_at"]) if "started_at" in h else None,
            finished_at=float(h["finished_at"]) if "finished_at" in h else None,
            output_dir=h["output_dir"], result_dir=h.get("result_dir"),
            progress=JobProgress(
                step=progress.step, steps=spec.train.steps, policy_version=int(version or 0),
                prompts_released=released_batches * spec.train.prompts_per_step,
                samples_released=released_batches * spec.samples_per_step(),
                samples_trained=progress.samples_trained, samples_dropped_stale=progress.samples_dropped_stale,
                samples_dead_lettered=sum(int(v) for v in lost.values()),
                max_staleness_trained=progress.max_staleness_trained, last_loss=progress.last_loss,
                last_kl=progress.last_kl, last_eval=EvalRecord.loads(last_eval[0]) if last_eval else None),
            spec=spec)

    def steps(self, job_id: str, after: int, limit: int) -> StepPage:
        """Step records after step `after` (steps are numbered 1, 2, ...: record i is step i + 1)."""
        texts = self._page(job_id, state.steps_key(job_id), after, limit)
        return StepPage(steps=_readable(StepRecord, texts[:limit], job_id),
                        next_after=after + limit if len(texts) > limit else None)

    def evals(self, job_id: str, after: int, limit: int) -> EvalPage:
        """Held-out evaluations after the first `after` ones."""
        texts = self._page(job_id, state.evals_key(job_id), after, limit)
        return EvalPage(evals=_readable(EvalRecord, texts[:limit], job_id),
                        next_after=after + limit if len(texts) > limit else None)

    def _page(self, job_id: str, key: str, after: int, limit: int) -> list[str]:
        """One more than a page, so the caller knows whether another follows."""
        if not self.exists(job_id):
            raise JobNotFound(job_id)
        return self.r.lrange(key, after, after + limit)


def describe(exc: Exception) -> str:
    """An exception as one short line for a job's reason; a validation error names each field."""
    if isinstance(exc, ValidationError):
        return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or e['type']}: {e['msg']}" for e in exc.errors()[:5])
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text[:300]}"


def _readable(cls, texts: list[str], job_id: str) -> list:
    """The records that parse; one that does not is logged and left out of the page, not a failed request."""
    out = []
    for text in texts:
        try:
            out.append(cls.loads(text))
        except RecordError as exc:
            log.warning("job %s: skipping an unreadable %s record: %s", job_id, cls.SCHEMA, exc)
    return out
