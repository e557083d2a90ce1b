"""The teacher loop: rollouts stream → teacher prompt log-probs (sampled token + top-K; the student's Monte
Carlo tokens; draws from the teacher itself for forward_kl_mc) → scored stream."""

from __future__ import annotations

import time
import zlib

from asyncopd import phases, streams
from asyncopd.ml.engine_service import EngineService
from asyncopd.ml.engines import SequenceScores
from asyncopd.streams import RolloutEntry, ScoredEntry
from services.teacher import metrics
from services.teacher.settings import TeacherSettings


class TeacherScorer(EngineService):
    role = "teacher"
    stream = streams.ROLLOUTS
    entry_type = RolloutEntry

    def __init__(self, settings: TeacherSettings, runtime) -> None:
        super().__init__(settings, runtime, settings.max_batch_samples)

    def model_name(self, job):
        return job.spec.teacher.model

    def score_student_support(self, entry: RolloutEntry, s, top_k: int):
        """The teacher's log-probs of the rollout student's top-K ids, in place of the teacher's own top-K."""
        ids = entry.student_topk_ids
        rows = [ids[j * top_k : (j + 1) * top_k] for j in range(len(entry.completion_token_ids))]
        (lps,) = self.engine.score_tokens([entry.prompt_token_ids], [entry.completion_token_ids], [rows])
        return SequenceScores(s.sampled_logprobs, rows, lps)

    def score_monte_carlo(self, entries: list[RolloutEntry]) -> list[list[float]]:
        """Teacher log-probs of the rollout's extra Monte Carlo tokens, flattened like mc_token_ids."""
        with_mc = [e for e in entries if e.mc_samples]
        if not with_mc:
            return [[] for _ in entries]
        rows = [[e.mc_token_ids[j * e.mc_samples : (j + 1) * e.mc_samples] for j in range(len(e.completion_token_ids))]
                for e in with_mc]
        scored = iter(self.engine.score_tokens([e.prompt_token_ids for e in with_mc],
                                               [e.completion_token_ids for e in with_mc], rows))
        return [[v for row in next(scored) for v in row] if e.mc_samples else [] for e in entries]

    def sample_teacher(self, entries: list[RolloutEntry]) -> list[dict]:
        """For forward_kl_mc: tokens drawn from the teacher's own distribution (temperature 1) at every completion
        position, with their log-probs, flattened like mc_token_ids. Seeded from the sample id, so a redelivered
        rollout gets the same draws."""
        n = self.job.spec.objective.teacher_samples()
        if not n or not entries:
            return [{} for _ in entries]
        drawn = self.engine.sample_positions([e.prompt_token_ids for e in entries],
                                             [e.completion_token_ids for e in entries], m=n, temperature=1.0,
                                             seeds=[zlib.crc32(f"{e.job_id}/{e.sample_id}".encode()) for e in entries])
        return [{"teacher_samples": n, "teacher_sample_ids": [t for row in ids for t in row],
                 "teacher_sample_logprobs": [v for row in lps for v in row]} for ids, lps in drawn]

    def handle(self, work):
        top_k = self.job.spec.scoring.top_k
        t0 = time.perf_counter()
        with phases.timed(phases.ENGINE):
            scores = self.engine.score([e.prompt_token_ids for _, e in work],
                                       [e.completion_token_ids for _, e in work], top_k=top_k)
            mc = self.score_monte_carlo([e for _, e in work])
            drawn = self.sample_teacher([e for _, e in work])
            # support "student": the student's top-K, scored by the teacher, in place of the teacher's own
            scores = [self.score_student_support(e, s, top_k) if e.student_topk_ids else s
                      for (_, e), s in zip(work, scores, strict=True)]
        metrics.SCORE_SECONDS.observe(time.perf_counter() - t0)
        with phases.timed(phases.SERIALIZE):
            out = [ScoredEntry(**entry.model_dump(), top_k=top_k, teacher_sampled_logprobs=s.sampled_logprobs,
                               support_logprobs_dtype=self.job.spec.scoring.logprobs_dtype,
                               support_ids=[i for row in s.topk_ids for i in row],
                               teacher_support_logprobs=[v for row in s.topk_logprobs for v in row],
                               mc_teacher_logprobs=mc_logprobs, **teacher_draws)
                   for (_, entry), s, mc_logprobs, teacher_draws in zip(work, scores, mc, drawn, strict=True)]
        # The rollouts are acked in the transaction that writes their scores: both happen or neither does.
        streams.write(self.r, streams.SCORED, out,
                      also=lambda pipe: self.consumer.ack_in(pipe, [m.id for m, _ in work]))
        metrics.SAMPLES.inc(len(work))
