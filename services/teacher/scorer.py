"""The teacher loop: rollouts stream → teacher prompt log-probs (sampled token + top-K) → scored stream."""

from __future__ import annotations

import time

from prometheus_client import Counter, Histogram

from asyncopd import streams
from asyncopd.engine_service import EngineService
from asyncopd.streams import RolloutEntry, ScoredEntry
from services.teacher.settings import TeacherSettings

SCORE_SECONDS = Histogram("asyncopd_teacher_score_seconds", "Teacher engine time per scoring call.")
SAMPLES = Counter("asyncopd_teacher_samples_total", "Rollouts scored and written to the scored stream.")


class TeacherScorer(EngineService):
    role = "teacher"
    stream = streams.ROLLOUTS
    entry_type = RolloutEntry

    def __init__(self, settings: TeacherSettings, runtime) -> None:
        super().__init__(settings, runtime, settings.max_batch_samples)

    def model_name(self, job):
        return job.spec.teacher.model

    def handle(self, work):
        top_k = self.job.spec.scoring.top_k
        t0 = time.perf_counter()
        scores = self.engine.score([e.prompt_token_ids for _, e in work], [e.completion_token_ids for _, e in work],
                                   top_k=top_k)
        SCORE_SECONDS.observe(time.perf_counter() - t0)
        pipe = self.r.pipeline()
        for (_, entry), s in zip(work, scores, strict=True):
            scored = ScoredEntry(
                **entry.model_dump(), top_k=top_k, teacher_sampled_logprobs=s.sampled_logprobs,
                teacher_topk_ids=[i for row in s.topk_ids for i in row],
                teacher_topk_logprobs=[v for row in s.topk_logprobs for v in row],
            )
            pipe.xadd(streams.SCORED, scored.to_fields())
        pipe.execute()
        self.consumer.ack([m.id for m, _ in work])
        SAMPLES.inc(len(work))
