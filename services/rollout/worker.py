"""The rollout loop: prompts stream → student engine → rollouts stream, reloading weights between requests.

A prompt entry carries `min_version`, the version fence the coordinator's admission control computed: the
worker never generates it with older weights, so a sample is at most η versions stale when trained.
"""

from __future__ import annotations

import logging
import time

from asyncopd import phases, state, streams
from asyncopd.ml.engine_service import EngineService
from asyncopd.streams import PromptEntry, RolloutEntry
from services.rollout import metrics
from services.rollout.settings import RolloutSettings

log = logging.getLogger(__name__)


def needs_reload(loaded: tuple[int, int], head: tuple[int, int], fence: int, lag: int) -> bool:
    """Whether to load the newest published (lineage, version) before generating a batch fenced at `fence`."""
    if head[0] != loaded[0] or head[1] < loaded[1]:
        return True  # a restarted learner's new lineage: its head may lie behind what is loaded
    return head[1] > loaded[1] and (loaded[1] < fence or head[1] - loaded[1] > lag)


class RolloutWorker(EngineService):
    role = "rollout"
    stream = streams.PROMPTS
    entry_type = PromptEntry

    def __init__(self, settings: RolloutSettings, runtime) -> None:
        super().__init__(settings, runtime, settings.max_batch_prompts)
        self.weight_wait_s, self.reload_lag = settings.weight_wait_s, settings.reload_lag

    def model_name(self, job):
        return job.spec.student.model

    def load(self, job) -> bool:
        self.lineage = 0  # the job's initial student until the learner publishes
        return super().load(job)

    def sync_weights(self, at_least: int) -> None:
        """Follow the learner's newest published (lineage, version) — backwards too, after a learner restart —
        and wait until the version reaches `at_least` (the entry's fence)."""
        deadline = time.monotonic() + self.weight_wait_s
        while True:
            with phases.timed(phases.REDIS):
                lineage, version, path = state.policy_head(self.r, self.job.id)
            if path and needs_reload((self.lineage, self.engine.version), (lineage, version), at_least,
                                     self.reload_lag):
                t0 = time.perf_counter()
                with phases.timed(phases.WEIGHTS):
                    self.engine.load_weights(path, version)
                self.lineage = lineage
                metrics.RELOAD_SECONDS.observe(time.perf_counter() - t0)
                self.rt.info["policy_version"] = version
            if self.engine.version >= at_least:
                return
            if time.monotonic() > deadline or self.rt.stop.is_set():
                raise TimeoutError(f"policy version {at_least} not published within {self.weight_wait_s}s")
            with phases.timed(phases.IDLE):
                time.sleep(0.01)

    def render(self, entry: PromptEntry) -> list[int]:
        if entry.messages is not None:
            return self.tokenizer.apply_chat_template(entry.messages, add_generation_prompt=True, tokenize=True,
                                                      return_dict=False)
        return self.tokenizer(entry.prompt)["input_ids"]

    def monte_carlo(self, samples: list, temperature: float) -> list[dict]:
        """For reverse_kl_mc: extra tokens per position drawn from this same policy, with their log-probs."""
        m = self.job.spec.objective.mc_samples()
        if not m:
            return [{} for _ in samples]
        drawn = self.engine.sample_positions([p for _, p, _, _ in samples], [c.token_ids for *_, c in samples], m=m,
                                             temperature=temperature,
                                             seeds=[e.seed * 1009 + i for e, _, i, _ in samples])
        return [{"mc_samples": m, "mc_token_ids": [t for row in ids for t in row],
                 "mc_behavior_logprobs": [v for row in lps for v in row]} for ids, lps in drawn]

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
            results = self.engine.generate([ids for _, _, ids in rendered], n=first.n, max_tokens=first.max_tokens,
                                           temperature=first.temperature, seeds=[e.seed for _, e, _ in rendered],
                                           top_k=top_k)
            metrics.GENERATE_SECONDS.observe(time.perf_counter() - t0)
            samples = [(entry, prompt_ids, i, c)
                       for (_, entry, prompt_ids), completions in zip(rendered, results, strict=True)
                       for i, c in enumerate(completions)]
            extras = self.monte_carlo(samples, first.temperature)
        with phases.timed(phases.SERIALIZE):
            out = [RolloutEntry(job_id=entry.job_id, batch=entry.batch, sample_id=f"{entry.prompt_id}-s{i}",
                                prompt_token_ids=prompt_ids, completion_token_ids=c.token_ids,
                                behavior_logprobs=c.logprobs, policy_version=self.engine.version,
                                lineage=self.lineage, student_topk_ids=[t for row in c.topk_ids or [] for t in row],
                                finish_reason=c.finish_reason, **mc)
                   for (entry, prompt_ids, i, c), mc in zip(samples, extras, strict=True)]
        # The prompts are acked in the transaction that writes their rollouts: both happen or neither does.
        streams.write(self.r, streams.ROLLOUTS, out,
                      also=lambda pipe: self.consumer.ack_in(pipe, [m.id for m, _, _ in rendered]))
        metrics.TOKENS.inc(sum(len(c.token_ids) for *_, c in samples))
        metrics.SAMPLES.inc(len(samples))
