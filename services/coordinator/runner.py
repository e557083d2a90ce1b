"""The coordinator's control loop: start queued jobs, release prompts under the staleness budget, act on the
services' events (failed, completed), and export stream and job metrics."""

from __future__ import annotations

import logging
import threading
import time
import zlib

import redis
from prometheus_client import Counter, Gauge

from asyncopd import phases, state, streams
from asyncopd.jobspec import JobSpec
from asyncopd.streams import PromptEntry
from services.coordinator import admission
from services.coordinator.jobs import JobStore
from services.coordinator.preflight import PreflightError, preflight

log = logging.getLogger(__name__)

RELEASED = Counter("asyncopd_prompts_released_total", "Prompts released to the rollout pool.")
STREAM_LENGTH = Gauge("asyncopd_stream_length_entries", "Entries in a stream.", ["stream"])
STREAM_PENDING = Gauge("asyncopd_stream_pending_entries", "Entries delivered but not acked.", ["stream"])
JOBS = Gauge("asyncopd_jobs", "Jobs by state.", ["state"])
JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled")
# Every labelled series exists at zero from start-up, so dashboards and alerts see 0, not "no data".
for _state in JOB_STATES:
    JOBS.labels(_state)
for _stream in streams.DATA_STREAMS:
    STREAM_LENGTH.labels(_stream)
    STREAM_PENDING.labels(_stream)
STREAM_LENGTH.labels(streams.DEAD_LETTER)
EVENTS_GROUP = "coordinator"


def prompt_seed(job_seed: int, batch: int, index: int) -> int:
    return zlib.crc32(f"{job_seed}:{batch}:{index}".encode())


class JobRunner:
    def __init__(self, r: redis.Redis, store: JobStore, tick_s: float, consumer: str) -> None:
        self.r, self.store, self.tick_s, self.consumer = r, store, tick_s, consumer
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True, name="job-runner")
        self.prompts: tuple[str, list[dict]] | None = None  # (job id, prompts) of the active job
        self.last_tick = 0.0
        try:
            r.xgroup_create(state.EVENTS, EVENTS_GROUP, id="$", mkstream=True)
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
        if job_id is None:
            self.start_next()
        elif running:
            self.release(job_id)

    def start_next(self) -> None:
        job_id = self.store.next_queued()
        if job_id is None:
            return
        spec = self.store.spec(job_id)
        try:
            prompts = preflight(spec)
        except PreflightError as exc:
            log.warning("job %s failed preflight: %s", job_id, exc)
            self.store.finish(job_id, "failed", reason=str(exc))
            return
        self.prompts = (job_id, prompts)
        for stream in streams.DATA_STREAMS:
            streams.ensure_group(self.r, stream)
        self.store.set(job_id, state="running", started_at=time.time())
        self.r.set(state.ACTIVE, job_id)
        log.info("job %s running (%d prompts, max_staleness %d)", job_id, len(prompts), spec.max_staleness)

    def release(self, job_id: str) -> None:
        with phases.timed(phases.REDIS):
            spec: JobSpec = self.store.spec(job_id)
            released = int(self.store.field(job_id, "released_batches") or 0)
            version = state.policy_version(self.r, job_id)
        if self.prompts is None or self.prompts[0] != job_id:  # coordinator restarted mid-job
            self.prompts = (job_id, preflight(spec))
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
        reply = self.r.xreadgroup(EVENTS_GROUP, self.consumer, {state.EVENTS: ">"}, count=100, block=block_ms)
        for _, entries in reply or []:
            for event_id, ev in entries:
                self._apply(ev)
                self.r.xack(state.EVENTS, EVENTS_GROUP, event_id)

    def _apply(self, ev: dict) -> None:
        job_id = ev.get("job_id", "")
        if ev.get("kind") not in ("failed", "completed") or not self.store.exists(job_id):
            return
        if ev.get("kind") == "failed":
            if self.store.finish(job_id, "failed", reason=ev.get("reason", "unknown")):
                log.warning("job %s failed: %s", job_id, ev.get("reason"))
        elif ev.get("kind") == "completed":
            if self.store.finish(job_id, "succeeded", result_dir=ev.get("result_dir", "")):
                log.info("job %s succeeded: %s", job_id, ev.get("result_dir"))

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
