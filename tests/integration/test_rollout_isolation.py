"""One over-long prompt must not sink its batch: the rollout worker (its real loop over a real Redis stream)
retries a batch the engine rejects entry by entry and dead-letters only the entries the engine rejects alone.
An engine that rejects everything is the engine's fault: nothing is dead-lettered, the entries stay pending."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from asyncopd import state, streams
from asyncopd.jobspec import JobSpec
from asyncopd.ml.engines.synthetic import SyntheticEngine
from asyncopd.runtime import ServiceRuntime
from asyncopd.streams import PromptEntry, RolloutEntry
from services.rollout.settings import RolloutSettings
from services.rollout.worker import RolloutWorker

MAX_MODEL_LEN = 64


class ContextLimitedEngine(SyntheticEngine):
    """Rejects the whole call when any prompt + max_tokens is over the context, as vLLM does."""

    def __init__(self, refuse_all: bool = False) -> None:
        super().__init__(vocab_size=50, latency_s=0.0, seed=0)
        self.refuse_all, self.calls = refuse_all, []

    def generate(self, prompts, *, n, max_tokens, temperature, seeds, top_k=0):
        self.calls.append(len(prompts))
        if self.refuse_all:
            raise RuntimeError("CUDA out of memory")
        for p in prompts:
            if len(p) + max_tokens > MAX_MODEL_LEN:
                raise ValueError(f"The decoder prompt (length {len(p)}) is longer than the maximum model length "
                                 f"of {MAX_MODEL_LEN}")
        return super().generate(prompts, n=n, max_tokens=max_tokens, temperature=temperature, seeds=seeds)


def worker(redis_url: str, engine, job_id: str) -> RolloutWorker:
    settings = RolloutSettings(redis_url=redis_url, instance="rollout-test", reclaim_idle_ms=60_000)
    w = RolloutWorker(settings, ServiceRuntime("rollout", "asyncopd.v1.RolloutService", settings))
    spec = JobSpec.model_validate({"name": "iso", "student": {"model": "s"}, "teacher": {"model": "t"},
                                   "prompts": {"path": "p.jsonl"}})
    w.job = state.ActiveJob(job_id, spec, "/nowhere")
    w.engine = engine
    w.tokenizer = lambda text: {"input_ids": list(text.encode())}  # one token per byte
    w.follower = SimpleNamespace(lineage=1)
    w.sync_weights = lambda at_least: None
    return w


def release(r, job_id: str, prompts: list[str], n: int = 2) -> None:
    streams.ensure_group(r, streams.PROMPTS)
    streams.write(r, streams.PROMPTS, [
        PromptEntry(job_id=job_id, batch=0, prompt_id=f"b0-p{i}", prompt=p, n=n, max_tokens=8, temperature=1.0,
                    seed=i, min_version=0) for i, p in enumerate(prompts)])


def test_one_over_long_prompt_is_dead_lettered_alone(r, redis_server):
    job_id = "iso-0000000a"
    prompts = ["Q: 1+1= A:", "x" * 200, "Q: 2+2= A:", "Q: 3+3= A:"]
    release(r, job_id, prompts)
    engine = ContextLimitedEngine()
    assert worker(redis_server, engine, job_id).step(block_ms=100) == 4
    assert engine.calls == [4, 1, 1, 1, 1]  # the batch, then each entry alone
    out = [RolloutEntry.from_fields(f) for _, f in r.xrange(streams.ROLLOUTS)]
    assert sorted(e.sample_id for e in out) == [f"b0-p{i}-s{j}" for i in (0, 2, 3) for j in (0, 1)]
    (dead,) = r.xrange(streams.DEAD_LETTER)
    assert "longer than the maximum model length" in dead[1]["reason"] and dead[1]["stream"] == streams.PROMPTS
    assert r.hgetall(streams.lost_key(job_id)) == {"0": "2"}  # its n samples, so the learner's batch completes
    assert r.xpending(streams.PROMPTS, "rollout")["pending"] == 0


def test_an_engine_that_rejects_everything_dead_letters_nothing(r, redis_server):
    job_id = "iso-0000000b"
    release(r, job_id, ["Q: 1+1= A:", "Q: 2+2= A:"])
    with pytest.raises(RuntimeError, match="out of memory"):
        worker(redis_server, ContextLimitedEngine(refuse_all=True), job_id).step(block_ms=100)
    assert r.xlen(streams.DEAD_LETTER) == 0 and r.xlen(streams.ROLLOUTS) == 0
    assert r.xpending(streams.PROMPTS, "rollout")["pending"] == 2  # redelivered later, dead-lettered by count
