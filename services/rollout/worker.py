"""The rollout loop: prompts stream → student engine → rollouts stream, reloading weights between requests.

A prompt entry carries `min_version`, the version fence the coordinator's admission control computed: the
worker never generates it with older weights, so a sample is at most η versions stale when trained.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from asyncopd import phases, streams
from asyncopd.ml.engine_service import EngineService
from asyncopd.ml.engines import Completion
from asyncopd.ml.weights.follow import Follower, WeightWaitTimeout
from asyncopd.ml.weights.transports import ADAPTER, setup_follower
from asyncopd.streams import PromptEntry, RolloutEntry
from services.rollout import metrics
from services.rollout.settings import RolloutSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sample:
    """The `index`-th completion of a prompt entry."""

    entry: PromptEntry
    prompt_ids: list[int]
    index: int
    completion: Completion


class RolloutWorker(EngineService):
    role = "rollout"
    stream = streams.PROMPTS
    entry_type = PromptEntry
    not_engine_failures = (*EngineService.not_engine_failures, WeightWaitTimeout)

    def __init__(self, settings: RolloutSettings, runtime) -> None:
        super().__init__(settings, runtime, settings.max_batch_prompts)
        self.weight_wait_s, self.reload_lag = settings.weight_wait_s, settings.reload_lag

    def model_name(self, job):
        return job.spec.student.model

    def lora_rank(self, job):
        return job.spec.student.lora.rank if job.spec.student.lora else None

    def weight_transfer(self, job) -> bool:
        # Adapter versions always come from files (the `adapter` transport).
        return self.settings.weights_transport == "nccl" and job.spec.student.lora is None

    def load(self, job) -> bool:
        # A fresh follower per job: lineage 0 (the job's initial student) and no cached delta base. A LoRA
        # student's versions are adapters over the base loaded here once, whatever the transport setting.
        kind = ADAPTER if job.spec.student.lora else self.settings.weights_transport
        s = self.settings
        transport = setup_follower(kind, redis=self.r, job_id=job.id, fallback=s.weights_fallback,
                                   join_s=s.weights_transfer_join_s, timeout_s=s.weights_transfer_timeout_s,
                                   stopped=self.rt.stop.is_set)
        self.follower = Follower(self.r, job.id, transport, reload_lag=self.reload_lag, wait_s=self.weight_wait_s,
                                 stop=self.rt.stop, on_load=self._loaded)
        return super().load(job)

    @property
    def lineage(self) -> int:
        return self.follower.lineage

    def _loaded(self, version: int) -> None:
        self.rt.info.policy_version = version

    def sync_weights(self, at_least: int) -> None:
        """Follow the learner's newest published (lineage, version) — backwards too, after a learner restart —
        and wait until the version reaches `at_least` (the entry's fence): `asyncopd.ml.weights.follow`."""
        self.follower.sync(self.engine, at_least)

    def render(self, entry: PromptEntry) -> list[int]:
        if entry.messages is not None:
            return self.tokenizer.apply_chat_template(entry.messages, add_generation_prompt=True, tokenize=True,
                                                      return_dict=False)
        return self.tokenizer(entry.prompt)["input_ids"]

    def monte_carlo(self, samples: list[Sample], temperature: float) -> list[dict]:
        """For reverse_kl_mc: extra tokens per position drawn from this same policy, with their log-probs."""
        m = self.job.spec.objective.mc_samples()
        if not m:
            return [{} for _ in samples]
        drawn = self.engine.sample_positions([s.prompt_ids for s in samples],
                                             [s.completion.token_ids for s in samples], m=m, temperature=temperature,
                                             seeds=[s.entry.seed * 1009 + s.index for s in samples])
        return [{"mc_samples": m, "mc_token_ids": [t for row in ids for t in row],
                 "mc_behavior_logprobs": [v for row in lps for v in row]} for ids, lps in drawn]

    def generate(self, rendered: list, first: PromptEntry, top_k: int) -> tuple[list, list]:
        """One engine call for the batch; (entries kept, their completions). When the engine rejects the batch,
        each entry is tried alone: those it rejects while others pass (a prompt over max_model_len) are
        dead-lettered one by one, so one bad entry never sinks its batch. If every one fails the engine itself is
        at fault: the error propagates and the entries stay pending, to be redelivered."""
        def call(batch):
            return self.engine.generate([ids for _, _, ids in batch], n=first.n, max_tokens=first.max_tokens,
                                        temperature=first.temperature, seeds=[e.seed for _, e, _ in batch],
                                        top_k=top_k)

        try:
            return rendered, call(rendered)
        except Exception:
            if len(rendered) == 1:
                raise
            log.warning("the engine rejected a batch of %d prompts; trying each alone", len(rendered), exc_info=True)
        kept, results, rejected = [], [], []
        for item in rendered:
            try:
                results.append(call([item])[0])
                kept.append(item)
            except Exception as exc:
                rejected.append((item, exc))
        if not kept:
            raise rejected[-1][1]
        for (msg, entry, _), exc in rejected:
            self.consumer.dead_letter(msg, f"the engine rejected the prompt: {exc}", entry)
        return kept, results

    def handle(self, work):
        self.sync_weights(max(e.min_version for _, e in work))
        rendered = []
        for msg, entry in work:
            try:
                with phases.timed(phases.TOKENIZE):
                    ids = self.render(entry)
            except Exception as exc:
                self.consumer.dead_letter(msg, f"cannot render prompt: {exc}", entry)
                continue
            rendered.append((msg, entry, ids))
        if not rendered:
            return
        # Within a job only the seed differs between entries, so one engine call serves the whole batch.
        first = rendered[0][1]
        t0 = time.perf_counter()
        spec = self.job.spec
        top_k = spec.scoring.top_k if spec.objective.needs_student_topk() else 0
        with phases.timed(phases.ENGINE):
            rendered, results = self.generate(rendered, first, top_k)
            metrics.GENERATE_SECONDS.observe(time.perf_counter() - t0)
            samples = [Sample(entry, prompt_ids, i, c)
                       for (_, entry, prompt_ids), completions in zip(rendered, results, strict=True)
                       for i, c in enumerate(completions)]
            extras = self.monte_carlo(samples, first.temperature)
        with phases.timed(phases.SERIALIZE):
            out = [RolloutEntry(job_id=s.entry.job_id, batch=s.entry.batch, sample_id=f"{s.entry.prompt_id}-s{s.index}",
                                prompt_token_ids=s.prompt_ids, completion_token_ids=s.completion.token_ids,
                                behavior_logprobs=s.completion.logprobs, policy_version=self.engine.version,
                                lineage=self.lineage,
                                student_topk_ids=[t for row in s.completion.topk_ids or [] for t in row],
                                finish_reason=s.completion.finish_reason, **mc)
                   for s, mc in zip(samples, extras, strict=True)]
        # The prompts are acked in the transaction that writes their rollouts: both happen or neither does.
        streams.write(self.r, streams.ROLLOUTS, out,
                      also=lambda pipe: self.consumer.ack_in(pipe, [m.id for m, _, _ in rendered]))
        metrics.TOKENS.inc(sum(len(s.completion.token_ids) for s in samples))
        metrics.SAMPLES.inc(len(samples))
