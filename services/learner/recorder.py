"""Where a step's record goes: the job's Redis list and progress hash (one atomic step, so progress always
agrees with the records, and once, even when Redis restarts mid-reply), `steps.jsonl` in the job's output,
the Prometheus series and the heartbeat."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import redis

from asyncopd import phases, state
from asyncopd.records import EvalRecord, Progress, StepRecord
from asyncopd.runtime import ServiceRuntime
from services.learner import metrics
from services.learner.batches import Batch
from services.learner.trainer import StepResult


def step_record(batch: Batch, result: StepResult, version: int, publish_s: float) -> StepRecord:
    staleness = [batch.step - e.policy_version for e in batch.fresh]
    return StepRecord(
        step=batch.step + 1, version=version, samples=len(batch.fresh), dropped_stale=batch.dropped,
        lost=batch.lost, staleness={str(k): v for k, v in sorted(Counter(staleness).items())},
        max_staleness=max(staleness, default=0), mean_staleness=sum(staleness) / max(len(staleness), 1),
        loss=result.loss, behavior_kl=result.behavior_kl, tokens=result.tokens, objective=result.objective,
        step_s=result.step_s, wait_s=round(batch.wait_s, 4), publish_s=round(publish_s, 4), time=time.time())


class Recorder:
    def __init__(self, r: redis.Redis, job: state.ActiveJob, runtime: ServiceRuntime, resumed_at: int) -> None:
        self.r, self.job, self.rt = r, job, runtime
        metrics.OBJECTIVE.clear()  # the previous job's objective may have reported other metric names
        self.progress = self._restart(resumed_at)
        out = Path(job.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.file = open(out / "steps.jsonl", "a")  # noqa: SIM115 (open for the whole job; closed in close)

    def _restart(self, resumed_at: int) -> Progress:
        """Records past the checkpoint we resume from are about to be trained again: drop them, and rebuild
        the progress totals from the rest (once per learner start, the only read of the whole list)."""
        steps, evals = state.steps_key(self.job.id), state.evals_key(self.job.id)
        if not resumed_at:
            self.r.delete(steps, evals, state.progress_key(self.job.id))
            return Progress()
        self.r.ltrim(steps, 0, resumed_at - 1)
        progress = Progress()
        for text in self.r.lrange(steps, 0, -1):
            progress = progress.add(StepRecord.loads(text))
        self.r.hset(state.progress_key(self.job.id), mapping=progress.to_hash())
        return progress

    def step(self, record: StepRecord) -> None:
        self.progress = self.progress.add(record)
        text = record.dumps()
        with phases.timed(phases.REDIS):
            state.append_record(self.r, state.steps_key(self.job.id), text, state.progress_key(self.job.id),
                                self.progress.to_hash())
            self.file.write(text + "\n")
            self.file.flush()
        metrics.TRAINED.inc(record.samples)
        metrics.DROPPED_STALE.inc(record.dropped_stale)
        metrics.STEP_SECONDS.observe(record.step_s)
        metrics.LOSS.set(record.loss)
        metrics.KL.set(record.behavior_kl)
        metrics.VERSION.set(record.version)
        metrics.STEP.set(record.step)
        for name, value in record.objective.items():
            metrics.OBJECTIVE.labels(name).set(value)
        self.rt.info.policy_version = record.version
        self.rt.info.processed += record.samples

    def evaluation(self, record: EvalRecord) -> None:
        state.append_record(self.r, state.evals_key(self.job.id), record.dumps())
        for name in ("accuracy", "kl_to_teacher"):
            value = getattr(record, name)
            if value is not None:
                metrics.EVAL.labels(name).set(value)

    def close(self) -> None:
        self.file.close()
