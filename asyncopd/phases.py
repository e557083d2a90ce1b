"""Where a service's time goes: seconds per phase of its work loop, one Prometheus counter per process.

`rate(asyncopd_phase_seconds_total[1m])` is the fraction of wall time a process spends in each phase; the
bench divides the increase over one job by that job's steps. The data path is Redis streams only (gRPC is the
control plane: no gRPC call happens per step), so its overhead is `redis` + `serialize`.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

from prometheus_client import Counter

ENGINE = "engine"  # generate / score / the learner's forward + backward + optimizer step
REDIS = "redis"  # stream reads that found work, writes, acks, job state
SERIALIZE = "serialize"  # stream entry encode / decode (pydantic + JSON + packed arrays)
TOKENIZE = "tokenize"  # rendering prompts to token ids
WEIGHTS = "weights"  # publishing a version (learner) / loading one (rollout)
IDLE = "idle"  # blocked waiting for work or for a version; not overhead
EVAL = "eval"  # held-out evaluation in the learner
CHECKPOINT = "checkpoint"  # the learner's DeepSpeed checkpoints
PHASES = (ENGINE, REDIS, SERIALIZE, TOKENIZE, WEIGHTS, IDLE, EVAL, CHECKPOINT)

PHASE_SECONDS = Counter("asyncopd_phase_seconds_total", "Seconds spent in each phase of the work loop.", ["phase"])
for _phase in PHASES:  # present from start-up, so rate() has the series before the first job
    PHASE_SECONDS.labels(_phase)


@contextmanager
def timed(phase: str):
    t0 = time.perf_counter()
    try:
        yield
    finally:
        PHASE_SECONDS.labels(phase).inc(time.perf_counter() - t0)
