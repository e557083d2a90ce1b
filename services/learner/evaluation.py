"""Held-out evaluation of published versions at the job's `eval.every`: accuracy as the job judges it, KL to
the teacher, and a sample of completions a user can read, kept in `<output_dir>/evals/v<version>.jsonl`."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from asyncopd import phases
from asyncopd.jobspec import JobSpec
from asyncopd.records import EvalRecord

log = logging.getLogger(__name__)


class HeldoutEval:
    def __init__(self, spec: JobSpec, output_dir: str) -> None:
        from asyncopd.ml.evaluate import Evaluator

        self.spec = spec
        self.out = Path(output_dir) / "evals"
        self.evaluator = Evaluator.for_job(spec)
        if self.evaluator.rows and not any("answer" in r for r in self.evaluator.rows):
            log.warning("no held-out row has a `%s`: evaluations report the KL to the teacher only",
                        spec.prompts.answer_field)

    @classmethod
    def for_job(cls, spec: JobSpec, output_dir: str) -> HeldoutEval | None:
        return cls(spec, output_dir) if spec.eval.every else None

    def due(self, version: int) -> bool:
        return version % self.spec.eval.every == 0 or version == self.spec.train.steps

    def run(self, version: int, model_dir: str) -> EvalRecord:
        t0 = time.perf_counter()
        with phases.timed(phases.EVAL):
            result = self.evaluator.evaluate(model_dir)
        samples_path = None
        if result.samples:
            self.out.mkdir(parents=True, exist_ok=True)
            samples_path = self.out / f"v{version:08d}.jsonl"
            samples_path.write_text("".join(json.dumps(s) + "\n" for s in result.samples))
        record = EvalRecord(step=version, task=self.spec.eval.task, accuracy=result.accuracy, judged=result.judged,
                            kl_to_teacher=result.kl_to_teacher, eval_s=round(time.perf_counter() - t0, 3),
                            samples_path=str(samples_path) if samples_path else None, time=time.time())
        log.info("eval at version %d: accuracy %s over %d judged rows, KL to the teacher %s", version,
                 record.accuracy, record.judged, record.kl_to_teacher)
        return record
