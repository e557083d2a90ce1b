"""Cost of `GET /v1/jobs/{id}` (the coordinator's `JobStore.view`) as a job's step records grow.

    .venv/bin/python benchmarks/job_view.py [--records 10 1000 100000] [--repeat 20]

Fills a real redis-server (started here on a free port) with one job and N step records, then times the
view in process (median of --repeat calls; the HTTP layer adds a constant). Run it from another checkout
(`git worktree add /tmp/before <commit>`, then `cd /tmp/before && /work/main/.venv/bin/python
/work/main/benchmarks/job_view.py`) to compare with an older view: only `services.coordinator.jobs.JobStore`
and `asyncopd.jobspec.JobSpec` are imported from the working directory.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from asyncopd.tools.scratch_redis import scratch_redis

sys.path.insert(0, str(Path.cwd()))

STEP = {"schema": "asyncopd.step/1", "step": 0, "version": 0, "samples": 64, "dropped_stale": 0, "lost": 0,
        "staleness": {"1": 64}, "max_staleness": 1, "mean_staleness": 1.0, "loss": 0.5, "behavior_kl": 0.3,
        "kl": 0.3, "tokens": 384, "objective": {"kl_estimate": 0.3}, "step_s": 0.05, "wait_s": 0.01,
        "publish_s": 0.01, "time": 0.0}


def main() -> None:
    from asyncopd.jobspec import JobSpec
    from services.coordinator.jobs import JobStore

    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, nargs="+", default=[10, 1000, 100_000])
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    with scratch_redis(decode_responses=True) as (r, data):
        store = JobStore(r, Path(data))
        spec = JobSpec.model_validate({"student": {"model": "s"}, "teacher": {"model": "t"},
                                       "prompts": {"path": "p.jsonl"}, "train": {"steps": 10**7}})
        print("| step records | GET /v1/jobs/{id} (JobStore.view), median ms |\n|---|---|")
        for n in args.records:
            r.flushall()
            job_id = store.create(spec)
            for start in range(0, n, 10_000):
                chunk = range(start, min(n, start + 10_000))
                r.rpush(f"asyncopd:job:{job_id}:steps", *[json.dumps({**STEP, "step": i + 1}) for i in chunk])
            times = []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                store.view(job_id)
                times.append(time.perf_counter() - t0)
            print(f"| {n:,} | {statistics.median(times) * 1000:.2f} |")


if __name__ == "__main__":
    main()
