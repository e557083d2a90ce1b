"""The coordinator's control loop: start queued jobs, release prompts under the staleness budget, act on the
services' events (failed, completed), and export stream and job metrics.

Any failure to start a job (preflight, an unreadable stored spec, an output directory taken meanwhile, a
prompt file that is not text) fails that job with the reason; only Redis being away leaves it queued, first in
line, for the next tick. A job the learner completes without training a sample, or after losing more than
its `max_lost_fraction` of the samples to the dead-letter stream, fails instead of succeeding.
"""

from __future__ import annotations

import logging
import threading
import time
import zlib

import redis

from asyncopd import logs, outputs, phases, state, streams
from asyncopd.jobspec import JobSpec
from asyncopd.records import JOB_STATES, CompletedEvent, FailedEvent, RecordError, VersionEvent, parse_event
from asyncopd.streams import PromptEntry
from services.coordinator import admission
from services.coordinator.jobs import JobStore, describe
from services.coordinator.metrics import JOBS, RELEASED, STREAM_LENGTH, STREAM_PENDING
from services.coordinator.preflight import PreflightError, preflight

log = logging.getLogger(__name__)

EVENTS_GROUP = "coordinator"


def prompt_seed(job_seed: int, batch: int, index: int) -> int:
    return zlib.crc32(f"{job_seed}:{batch}:{index}".encode())


class JobRunner:
    def __init__(self, r: redis.Redis, store: JobStore, tick_s: float, consumer: str,
                 max_model_len: int | None = None) -> None:
        self.r, self.store, self.tick_s, self.consumer = r, store, tick_s, consumer
        self.max_model_len = max_model_len  # the engines' limit on prompt + completion, checked at preflight
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True, name="job-runner")
        self.prompts: tuple[str, list[dict]] | None = None  # (job id, prompts) of the active job
        self.last_tick = 0.0
        self.ensure_events_group()

    def ensure_events_group(self) -> None:
        try:
            self.r.xgroup_create(state.EVENTS, EVENTS_GROUP, id="$", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)

    def alive(self) -> bool:
        return self.thread.is_alive() and time.time() - self.last_tick < 30

    def _loop(self) -> None:
        last_metrics = 0.0
        while not self.stop.is_set():
            self.last_tick = time.time()
            try:
                self.tick()
                if time.time() - last_metrics > 2:
                    self.export_metrics()
                    last_metrics = time.time()
                # Until the next tick or the next event: a published version releases what it admits at once.
                self.handle_events(block_ms=max(1, int(self.tick_s * 1000)))
            except redis.ConnectionError:
                log.warning("redis unreachable; retrying")
                self.stop.wait(self.tick_s)
            except Exception:
                log.exception("runner tick failed")
                self.stop.wait(self.tick_s)

    def tick(self) -> None:
        with phases.timed(phases.REDIS):
            self.handle_events()
            job_id = self.r.get(state.ACTIVE)
            running = job_id is not None and self.store.field(job_id, "state") == "running"
        logs.set_context(job_id=job_id)  # the runner's lines name the active job; None: there is none
        if job_id is None:
            self.start_next()
        elif running:
            self.release(job_id)

    def start_next(self) -> None:
        job_id = self.store.next_queued()
        if job_id is None:
            return
        logs.set_context(job_id=job_id)
        if not self.store.exists(job_id):  # its record is gone: nothing to start or to fail
            self.r.lrem(state.QUEUE, 0, job_id)
            return
        try:
            spec = self.store.spec(job_id)
            prompts = preflight(spec, self.max_model_len)
            # Confined again: the roots may have changed since it was queued, or a path component became a link.
            out = outputs.confine(self.store.field(job_id, "output_dir"), job_id, self.store.output_roots)
            outputs.claim(out, job_id)
        except redis.RedisError:
            raise  # nothing changed: the job is still first in the queue and the next tick tries again
        except Exception as exc:  # whatever it is, it fails this job (with the reason), never the queue
            self.fail(job_id, exc, "could not start")
            return
        for stream in streams.DATA_STREAMS:
            streams.ensure_group(self.r, stream)
        if not self.store.start(job_id):
            return  # cancelled while it was being checked
        self.prompts = (job_id, prompts)
        log.info("job %s running (%d prompts, max_staleness %d)", job_id, len(prompts), spec.max_staleness)

    def fail(self, job_id: str, exc: Exception, doing: str) -> None:
        known = isinstance(exc, PreflightError | outputs.OutputDirError)
        reason = str(exc) if known else f"{doing}: {describe(exc)}"
        log.warning("job %s failed: %s", job_id, reason, exc_info=not known)
        self.store.finish(job_id, "failed", reason=reason)

    def release(self, job_id: str) -> None:
        try:
            with phases.timed(phases.REDIS):
                spec: JobSpec = self.store.spec(job_id)
                released = int(self.store.field(job_id, "released_batches") or 0)
                version = state.policy_version(self.r, job_id)
            if self.prompts is None or self.prompts[0] != job_id:  # coordinator restarted mid-job
                self.prompts = (job_id, preflight(spec, self.max_model_len))
        except redis.RedisError:
            raise
        except Exception as exc:  # its record or its prompts became unreadable: the job cannot go on
            self.fail(job_id, exc, "could not release prompts")
            return
        prompts = self.prompts[1]
        for batch in admission.releasable_batches(version, released, spec.max_staleness, spec.train.steps):
            fence = admission.version_fence(batch, spec.max_staleness)
            with phases.timed(phases.SERIALIZE):
                entries = [
                    PromptEntry(
                        job_id=job_id, batch=batch, prompt_id=f"b{batch}-p{i}", **prompts[idx], n=spec.generation.n,
                        max_tokens=spec.generation.max_tokens, temperature=spec.generation.temperature,
                        seed=prompt_seed(spec.train.seed, batch, i), min_version=fence,
                    )
                    for i, idx in enumerate(admission.prompt_indices(batch, spec.train.prompts_per_step, len(prompts)))
                ]
            streams.write(self.r, streams.PROMPTS, entries,
                          also=lambda pipe, b=batch: pipe.hset(state.job_key(job_id), "released_batches", b + 1))
            RELEASED.inc(spec.train.prompts_per_step)

    def handle_events(self, block_ms: int | None = None) -> None:
        try:
            reply = self.r.xreadgroup(EVENTS_GROUP, self.consumer, {state.EVENTS: ">"}, count=100, block=block_ms)
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            log.warning("the events stream or its group is gone (Redis flushed or restarted empty); recreating it")
            self.ensure_events_group()
            return
        for _, entries in reply or []:
            for event_id, ev in entries:
                self._apply(ev)
                self.r.xack(state.EVENTS, EVENTS_GROUP, event_id)

    def _apply(self, fields: dict) -> None:
        try:
            ev = parse_event(fields)
        except RecordError as exc:
            log.warning("ignoring a malformed job event: %s", exc)
            return
        if isinstance(ev, VersionEvent) or not self.store.exists(ev.job_id):
            return
        with logs.bind(job_id=ev.job_id):  # the job the event ends, whichever is active
            if isinstance(ev, FailedEvent):
                if self.store.finish(ev.job_id, "failed", reason=ev.reason):
                    log.warning("job %s failed: %s", ev.job_id, ev.reason)
            elif (reason := self.lost_too_much(ev)) is not None:
                if self.store.finish(ev.job_id, "failed", reason=reason, result_dir=ev.result_dir):
                    log.warning("job %s failed: %s", ev.job_id, reason)
            elif self.store.finish(ev.job_id, "succeeded", result_dir=ev.result_dir):
                log.info("job %s succeeded: %s", ev.job_id, ev.result_dir)

    def lost_too_much(self, ev: CompletedEvent) -> str | None:
        """Why a job the learner completed has not succeeded: it trained nothing, or more than its
        max_lost_fraction of the released samples was dead-lettered. None: it succeeded."""
        job = self.store.view(ev.job_id)
        p, spec = job.progress, job.spec
        if spec is None:
            return job.reason
        where = f"see the dead-letter stream {streams.DEAD_LETTER} for why"
        if p.samples_trained == 0:
            return (f"trained no sample: of {p.samples_released} released, {p.samples_dead_lettered} were "
                    f"dead-lettered and {p.samples_dropped_stale} dropped as stale; {where}")
        share = p.samples_dead_lettered / max(p.samples_released, 1)
        if share > spec.max_lost_fraction:
            return (f"{p.samples_dead_lettered} of {p.samples_released} released samples ({share:.0%}) were "
                    f"dead-lettered, more than max_lost_fraction {spec.max_lost_fraction:g}; {where}")
        return None

    def export_metrics(self) -> None:
        for stream in streams.DATA_STREAMS:
            stats = streams.stream_stats(self.r, stream)
            STREAM_LENGTH.labels(stream).set(stats["length"])
            STREAM_PENDING.labels(stream).set(stats["pending"])
        STREAM_LENGTH.labels(streams.DEAD_LETTER).set(self.r.xlen(streams.DEAD_LETTER))
        counts = dict.fromkeys(JOB_STATES, 0)
        for job_id in self.store.ids():
            s = self.store.field(job_id, "state")
            if s in counts:
                counts[s] += 1
        for s, n in counts.items():
            JOBS.labels(s).set(n)
