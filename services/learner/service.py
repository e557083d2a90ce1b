"""The learner's job loop on rank 0.

Per step t: wait until batch t is complete, drop samples over the staleness budget (the hard filter;
admission control should leave none), train on every rank, publish version t+1, record the step. Entries
are acked when the step that trained them is checkpointed, so a restart resumes from the checkpoint and
replays them.
"""

from __future__ import annotations

import logging
import time

import redis

from asyncopd import logs, phases, state
from asyncopd.records import CompletedEvent, FailedEvent
from asyncopd.runtime import ServiceRuntime
from services.learner.batches import BatchAssembler
from services.learner.evaluation import HeldoutEval
from services.learner.ranks import RankDriver
from services.learner.recorder import Recorder, step_record
from services.learner.settings import LearnerSettings

log = logging.getLogger(__name__)


class Learner:
    def __init__(self, settings: LearnerSettings, runtime: ServiceRuntime, driver: RankDriver) -> None:
        self.settings, self.rt, self.r, self.driver = settings, runtime, runtime.redis, driver
        self.finished_job: str | None = None  # done (or failed) here; active until the coordinator notices

    def run(self) -> None:
        while not self.rt.stop.is_set():
            try:
                job = state.active_job(self.r)
            except redis.ConnectionError:  # longer than redis_outage_s: keep trying
                log.warning("redis unreachable for longer than %.0f s; still retrying", self.settings.redis_outage_s)
                self.rt.stop.wait(self.settings.poll_interval_s)
                continue
            if job is None or job.id == self.finished_job:
                self.rt.stop.wait(self.settings.poll_interval_s)
                continue
            try:
                with logs.bind(job_id=job.id):
                    self.train(job)
                self.finished_job = job.id
            except Exception as exc:
                log.exception("job %s failed in the learner", job.id)
                state.add_event(self.r, FailedEvent(job_id=job.id, service="learner", reason=f"learner: {exc}"))
                self.finished_job = job.id
            finally:
                self.driver.end()
                self.rt.set_model_loaded(False)
        self.driver.shutdown()

    def train(self, job: state.ActiveJob) -> None:
        spec = job.spec
        trainer = self.driver.start(job)
        self.rt.set_model_loaded(True, job.id)
        lineage = self.begin_lineage(job, trainer.version)
        recorder = Recorder(self.r, job, self.rt, resumed_at=trainer.version)
        source = BatchAssembler(self.r, self.settings.consumer, job.id, spec.samples_per_step(),
                                self.settings.read_count, self.settings.max_deliveries, trainer.version)
        evaluator = HeldoutEval.for_job(spec, job.output_dir)
        if evaluator and trainer.version == 0:
            recorder.evaluation(evaluator.run(0, spec.student.model))
        for t in range(trainer.version, spec.train.steps):
            logs.set_context(step=t + 1)  # the step in progress, as its record will number it
            batch = source.next(t, spec.max_staleness, lambda: self.still_active(job))
            if batch is None:
                log.info("job %s is no longer active; stopping at step %d", job.id, t)
                return
            with phases.timed(phases.ENGINE):
                result = self.driver.step(batch.fresh)
                self.pad_step(result.step_s)
            publish_s = self.publish(job, lineage)
            recorder.step(step_record(batch, result, trainer.version, publish_s))
            if evaluator and evaluator.due(trainer.version):
                recorder.evaluation(evaluator.run(trainer.version, self.driver.published()))
            if trainer.version % spec.train.checkpoint_every == 0 or trainer.version == spec.train.steps:
                with phases.timed(phases.CHECKPOINT):
                    self.driver.checkpoint()
                source.ack(checkpointed=trainer.version)
        result_dir = self.driver.export()
        recorder.close()
        state.add_event(self.r, CompletedEvent(job_id=job.id, service="learner", result_dir=str(result_dir)))
        log.info("job %s done: %d steps, student at %s", job.id, spec.train.steps, result_dir)

    def begin_lineage(self, job: state.ActiveJob, version: int) -> int:
        """A restarted learner resumes from its checkpoint: the versions it had published after that are
        discarded weights. It republishes its checkpoint as the head of a new lineage, which rollouts follow
        back; the samples the discarded versions made are kept within the budget (`batches.trainable`)."""
        lineage = state.new_lineage(self.r, job.id)
        if lineage > 1:
            self.publish(job, lineage)
            self.driver.published()
            log.info("job %s: learner restarted, lineage %d from version %d", job.id, lineage, version)
        return lineage

    def publish(self, job: state.ActiveJob, lineage: int) -> float:
        """Publish the trainer's current version; the seconds the learner waited (the snapshot, or the whole
        write with weights_async_publish off, or the previous write still in flight)."""
        t0 = time.perf_counter()
        with phases.timed(phases.WEIGHTS):
            self.driver.publish(lambda version, path: state.publish_version(self.r, job.id, version, path, lineage))
        return time.perf_counter() - t0

    def pad_step(self, step_s: float) -> None:
        """The benchmark instrument `synthetic_step_s`: a step at least this long (a bigger model's step)."""
        if self.settings.synthetic_step_s > step_s:
            time.sleep(self.settings.synthetic_step_s - step_s)

    @phases.timed(phases.REDIS)
    def still_active(self, job: state.ActiveJob) -> bool:
        current = state.active_job(self.r, known=job)
        return current is not None and current.id == job.id and not self.rt.stop.is_set()
