"""The benchmark harness end to end at toy size: every suite runs through the real stack and writes its
tables and plots. It measures nothing (a few steps per job); `make bench` does."""

import csv

import pytest
import yaml

from asyncopd.tools.cli import main
from tests.helpers import tiny_job

pytestmark = pytest.mark.slow


def test_bench_smoke_writes_every_table_and_plot(tmp_path, tiny_models):
    prompts = {"path": str(tiny_models["train"]), "heldout_path": str(tiny_models["heldout"]), "heldout_limit": 8}
    spec = tiny_job(tiny_models, prompts=prompts)
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(spec))
    out = tmp_path / "results"
    main(["--run-dir", str(tmp_path / "run"), "bench", str(job_file), "--smoke", "--engine", "hf", "--out", str(out),
          "--budgets", "0", "1", "--objectives", "forward_kl_topk", "reverse_kl_recompute", "--findings-budgets", "0",
          "--seeds", "0"])
    for name in ("throughput", "throughput-runs", "throughput-overhead", "pipeline", "pipeline-overhead", "reload",
                 "reload-overhead", "findings", "findings-runs"):
        rows = list(csv.DictReader(open(out / f"{name}.csv")))
        assert rows and all(r.get("state", "succeeded") == "succeeded" for r in rows), name
        assert (out / f"{name}.md").read_text().startswith("# ")
    for png in ("throughput.png", "staleness.png", "findings.png"):
        assert (out / png).stat().st_size > 1000
    pipeline = list(csv.DictReader(open(out / "pipeline.csv")))
    assert float(pipeline[0]["ideal_speedup"]) == pytest.approx(0.45 / 0.20, rel=1e-3)
    # Every service's time is accounted by phase, through the real services' /metrics.
    for name in ("throughput-overhead", "pipeline-overhead", "reload-overhead"):
        rows = {(r["run"], r["service"]): r for r in csv.DictReader(open(out / f"{name}.csv"))}
        for run in {run for run, _ in rows}:
            assert float(rows[run, "rollout"]["engine_ms"]) > 0 and float(rows[run, "teacher"]["engine_ms"]) > 0
            assert float(rows[run, "rollout"]["serialize_ms"]) > 0 and float(rows[run, "teacher"]["redis_ms"]) > 0
            assert float(rows[run, "learner"]["weights_ms"]) > 0 and float(rows[run, "coordinator"]["redis_ms"]) > 0
