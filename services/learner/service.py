"""The learner's job loop (rank 0) and the follower loop of the other ranks.

Per step t: wait until batch t is complete, drop samples over the staleness budget (the hard filter;
admission control should leave none), train, publish version t+1, record the step. Entries are acked when
the step that trained them is checkpointed, so a restart resumes from the checkpoint and replays them.
"""

from __future__ import annotations

import json
import logging
import time

import torch.distributed as dist

from asyncopd import state
from asyncopd.runtime import ServiceRuntime
from services.learner import metrics
from services.learner.batches import BatchAssembler
from services.learner.settings import LearnerSettings
from services.learner.trainer import Trainer, staleness_tally

log = logging.getLogger(__name__)


class Comm:
    """Rank 0 calls trainer methods through `call`, which replays them on every other rank first."""

    def __init__(self) -> None:
        self.world = dist.get_world_size()
        self.trainer: Trainer | None = None

    def _send(self, message) -> None:
        if self.world > 1:
            dist.broadcast_object_list([message], src=0)

    def start(self, job: state.ActiveJob, settings: LearnerSettings) -> Trainer:
        self._send(("start", job))
        self.trainer = Trainer(job, settings)
        return self.trainer

    def call(self, method: str, *args):
        self._send(("call", method, args))
        return getattr(self.trainer, method)(*args)

    def end(self) -> None:
        self._send(("end",))
        self.trainer = None

    def shutdown(self) -> None:
        self._send(("shutdown",))

    @staticmethod
    def follow(settings: LearnerSettings) -> None:
        trainer = None
        while True:
            box = [None]
            dist.broadcast_object_list(box, src=0)
            message = box[0]
            if message[0] == "start":
                trainer = Trainer(message[1], settings)
            elif message[0] == "call":
                getattr(trainer, message[1])(*message[2])
            elif message[0] == "end":
                trainer = None
            else:
                return


class Learner:
    def __init__(self, settings: LearnerSettings, runtime: ServiceRuntime, comm: Comm) -> None:
        self.settings, self.rt, self.r, self.comm = settings, runtime, runtime.redis, comm
        self.finished_job: str | None = None  # done (or failed) here; active until the coordinator notices
        self.progress: dict = {}

    def run(self) -> None:
        while not self.rt.stop.is_set():
            job = state.active_job(self.r)
            if job is None or job.id == self.finished_job:
                self.rt.stop.wait(self.settings.poll_interval_s)
                continue
            try:
                self.train(job)
                self.finished_job = job.id
            except Exception as exc:
                log.exception("job %s failed in the learner", job.id)
                state.report_event(self.r, job.id, "failed", "learner", reason=f"learner: {exc}")
                self.finished_job = job.id
            finally:
                if self.comm.trainer is not None:
                    self.comm.end()
                self.rt.set_model_loaded(False)
        self.comm.shutdown()

    def still_active(self, job: state.ActiveJob) -> bool:
        current = state.active_job(self.r)
        return current is not None and current.id == job.id and not self.rt.stop.is_set()

    def train(self, job: state.ActiveJob) -> None:
        spec = job.spec
        trainer = self.comm.start(job, self.settings)
        self.rt.set_model_loaded(True, job.id)
        metrics.OBJECTIVE.clear()  # the previous job's objective may have reported other metric names
        # Records past the checkpoint we resumed from are about to be trained again.
        if trainer.version:
            self.r.ltrim(state.steps_key(job.id), 0, trainer.version - 1)
        else:
            self.r.delete(state.steps_key(job.id), state.evals_key(job.id))
        assembler = BatchAssembler(self.r, self.settings.consumer, job.id, spec.samples_per_step(),
                                   self.settings.read_count, self.settings.max_deliveries)
        unacked: list[str] = []
        records = open_records(job)
        self.progress = {"job_id": job.id, "step": trainer.version, "policy_version": trainer.version}
        evaluator = HeldoutEval(self.r, job) if spec.eval.every else None
        if evaluator and trainer.version == 0:
            evaluator.run(0, spec.student.model)
        for t in range(trainer.version, spec.train.steps):
            t_wait = time.perf_counter()
            while not assembler.complete(t):
                if not self.still_active(job):
                    log.info("job %s is no longer active; stopping at step %d", job.id, t)
                    return
                assembler.poll(t, block_ms=500)
            wait_s = time.perf_counter() - t_wait
            metrics.WAIT_SECONDS.observe(wait_s)
            items = assembler.take(t)
            entries = [e for _, e in items]
            fresh = [e for e in entries if t - e.policy_version <= spec.max_staleness]
            dropped = len(entries) - len(fresh)
            for e in fresh:
                metrics.STALENESS.observe(t - e.policy_version)
            if fresh:
                result = self.comm.call("step", fresh)
            else:  # an all-stale batch still advances the schedule, with no update applied
                result = self.comm.call("skip")
            t_pub = time.perf_counter()
            path = self.comm.call("publish")
            state.publish_version(self.r, job.id, trainer.version, path)
            publish_s = time.perf_counter() - t_pub
            record = {
                "step": t + 1, "version": trainer.version, "samples": len(fresh), "dropped_stale": dropped,
                "lost": assembler.lost(t), "staleness": staleness_tally(fresh, t),
                "max_staleness": max((t - e.policy_version for e in fresh), default=0),
                "mean_staleness": sum(t - e.policy_version for e in fresh) / max(len(fresh), 1),
                "wait_s": round(wait_s, 4), "publish_s": round(publish_s, 4), "time": time.time(), **result,
            }
            self.r.rpush(state.steps_key(job.id), json.dumps(record))
            records.write(json.dumps(record) + "\n")
            records.flush()
            self._observe(record)
            if evaluator and (trainer.version % spec.eval.every == 0 or trainer.version == spec.train.steps):
                evaluator.run(trainer.version, path)
            unacked += [m.id for m, _ in items]
            if trainer.version % spec.train.checkpoint_every == 0 or trainer.version == spec.train.steps:
                self.comm.call("checkpoint")
                assembler.ack(unacked)
                unacked = []
        result_dir = self.comm.call("export")
        records.close()
        state.report_event(self.r, job.id, "completed", "learner", result_dir=str(result_dir))
        log.info("job %s done: %d steps, student at %s", job.id, spec.train.steps, result_dir)

    def _observe(self, record: dict) -> None:
        metrics.TRAINED.inc(record["samples"])
        metrics.DROPPED_STALE.inc(record["dropped_stale"])
        metrics.STEP_SECONDS.observe(record["step_s"])
        metrics.PUBLISH_SECONDS.observe(record["publish_s"])
        metrics.LOSS.set(record["loss"])
        metrics.KL.set(record["kl"])
        metrics.VERSION.set(record["version"])
        metrics.STEP.set(record["step"])
        for name, value in record.get("objective", {}).items():
            metrics.OBJECTIVE.labels(name).set(value)
        self.rt.info["policy_version"] = record["version"]
        self.rt.info["processed"] += record["samples"]
        self.progress.update(step=record["step"], policy_version=record["version"], last_loss=record["loss"],
                             last_kl=record["kl"])


class HeldoutEval:
    """Held-out accuracy and KL to the teacher of published versions, recorded in the job's results."""

    def __init__(self, r, job: state.ActiveJob) -> None:
        from asyncopd.evaluate import Evaluator, read_rows

        spec = job.spec
        self.r, self.job = r, job
        rows = read_rows(spec.prompts.heldout_path, spec.prompts.heldout_limit)
        self.evaluator = Evaluator(spec.teacher.model, rows, max_tokens=spec.generation.max_tokens,
                                   seed=spec.train.seed, with_kl=spec.eval.kl)

    def run(self, version: int, model_dir: str) -> None:
        t0 = time.perf_counter()
        scores = self.evaluator.evaluate(model_dir)
        result = {"step": version, **scores, "eval_s": round(time.perf_counter() - t0, 3), "time": time.time()}
        self.r.rpush(state.evals_key(self.job.id), json.dumps(result))
        for name in ("accuracy", "kl_to_teacher"):
            if result.get(name) is not None:
                metrics.EVAL.labels(name).set(result[name])
        log.info("job %s eval at version %d: %s", self.job.id, version, result)


def open_records(job: state.ActiveJob):
    from pathlib import Path

    out = Path(job.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    return open(out / "steps.jsonl", "a")
