"""The loop rollout and teacher share: follow the active job, load its model into an engine, consume a
stream in batches, skip entries of other jobs, and report a model that cannot load, or that loads but fails
`max_engine_failures` batches in a row, as the job's failure."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod

import redis

from asyncopd import logs, phases, state, streams
from asyncopd.ml.engines import Engine, build_engine
from asyncopd.records import FailedEvent
from asyncopd.runtime import ServiceRuntime
from asyncopd.settings import EngineSettings

log = logging.getLogger(__name__)


class EngineService(ABC):
    role: str  # "rollout" | "teacher": names the model it serves in failure reasons
    stream: str
    entry_type: type[streams.Entry]
    # Step failures that say nothing about the engine: an unreachable or refusing Redis is an outage.
    not_engine_failures: tuple[type[Exception], ...] = (redis.RedisError,)

    def __init__(self, settings: EngineSettings, runtime: ServiceRuntime, batch_size: int) -> None:
        self.settings, self.rt, self.r = settings, runtime, runtime.redis
        self.batch_size = batch_size
        self.engine: Engine | None = None
        self.tokenizer = None
        self.job: state.ActiveJob | None = None
        self.failed_job: str | None = None
        self.engine_failures = 0  # consecutive failed steps of the loaded job
        self.consumer = streams.StreamConsumer(
            self.r, self.stream, settings.instance, max_deliveries=settings.max_deliveries,
            reclaim_idle_ms=settings.reclaim_idle_ms,
        )

    @abstractmethod
    def model_name(self, job: state.ActiveJob) -> str: ...

    def lora_rank(self, job: state.ActiveJob) -> int | None:
        """The rank of LoRA adapters this service's engine must serve (the rollout of a LoRA student)."""
        return None

    def weight_transfer(self, job: state.ActiveJob) -> bool:
        """Whether this service's engine receives weight versions by transfer (the rollout, `nccl` transport)."""
        return False

    @abstractmethod
    def handle(self, work: list[tuple[streams.Message, streams.Entry]]) -> None:
        """Process entries of the active job; write downstream, then ack."""

    def run(self) -> None:
        while not self.rt.stop.is_set():
            try:
                with phases.timed(phases.REDIS):
                    job = state.active_job(self.r, known=self.job)
            except redis.ConnectionError:  # longer than redis_outage_s: keep trying, the engine stays loaded
                log.warning("redis unreachable for longer than %.0f s; still retrying", self.settings.redis_outage_s)
                self.rt.stop.wait(self.settings.poll_interval_s)
                continue
            if self.job is not None and (job is None or job.id != self.job.id):
                self.unload()
            logs.set_context(job_id=job.id if job is not None else None)  # each line below names its job
            if job is None or job.id == self.failed_job or (self.job is None and not self.load(job)):
                self.rt.stop.wait(self.settings.poll_interval_s)
                continue
            try:
                if self.step(block_ms=int(self.settings.poll_interval_s * 1000)):
                    self.engine_failures = 0  # only a batch the engine got through: an empty read proves nothing
            except Exception as exc:
                # Entries stay pending: reclaimed after reclaim_idle_ms, dead-lettered if they keep failing.
                log.exception("%s step failed", self.role)
                if not self.engine_failed(exc):
                    self.rt.stop.wait(1.0)
        self.unload()

    def engine_failed(self, exc: Exception) -> bool:
        """Count a failed step against the engine; True once that failed the job. A model can load and then fail
        every call (an attention kernel without its head size, a sampler missing its compiler): without this the
        job would stay running while redelivery burns its prompts one by one, with no reason given."""
        if isinstance(exc, self.not_engine_failures) or self.rt.stop.is_set():  # a shutdown interrupted it
            return False
        self.engine_failures += 1
        if self.engine_failures < self.settings.max_engine_failures:
            return False
        reason = (f"{self.role} engine failed {self.engine_failures} consecutive batches of "
                  f"{self.model_name(self.job)!r}: {type(exc).__name__}: {exc}")
        self.fail(self.job.id, reason)
        self.unload()
        return True

    def fail(self, job_id: str, reason: str) -> None:
        """Report the job's failure (the coordinator ends it with this reason) and stop serving it."""
        state.add_event(self.r, FailedEvent(job_id=job_id, service=self.role, reason=reason))
        self.failed_job = job_id

    def load(self, job: state.ActiveJob) -> bool:
        from transformers import AutoTokenizer

        logs.adopt_library_loggers()  # transformers and torch are imported now: their loggers go to the root
        s, model = self.settings, self.model_name(job)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model)
            engine = build_engine(s.engine, model, device=s.device, dtype=s.dtype, seed=job.spec.train.seed,
                                  max_model_len=s.max_model_len, kv_cache_bytes=s.kv_cache_bytes,
                                  gpu_memory_utilization=s.gpu_memory_utilization,
                                  synthetic_latency_s=s.synthetic_latency_s, lora_rank=self.lora_rank(job),
                                  tensor_parallel_size=s.tensor_parallel_size,
                                  weight_transfer=self.weight_transfer(job))
        except Exception as exc:  # a bad model path fails the job, never the worker
            log.exception("loading %s %s failed", self.role, model)
            self.fail(job.id, f"{self.role} could not load {model!r}: {exc}")
            return False
        self.engine, self.job = engine, job
        self.rt.set_model_loaded(True, job.id)
        log.info("loaded %s for job %s", model, job.id)
        return True

    def unload(self) -> None:
        if self.engine is not None:
            self.engine.close()
        self.engine, self.tokenizer, self.job = None, None, None
        self.engine_failures = 0
        self.rt.set_model_loaded(False)
        self.rt.info.policy_version = 0

    def step(self, block_ms: int) -> int:
        messages = self.consumer.read(self.batch_size, block_ms)
        work, leftovers, newer = [], [], False
        for msg, entry in self.consumer.decode(messages, self.entry_type):
            if entry.job_id == self.job.id:
                work.append((msg, entry))
            elif state.is_active(self.r, entry.job_id):
                newer = True  # the next job started before this worker noticed: keep it pending for later
            else:
                leftovers.append(msg.id)  # of a finished or cancelled job
        self.consumer.ack(leftovers)
        if newer:
            self.consumer.replay_pending()
        if work:
            self.handle(work)
            self.rt.info.processed += len(work)
        return len(work)
