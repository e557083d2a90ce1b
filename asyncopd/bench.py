"""`asyncopd bench` / `make bench`: experiments through the real local stack, written to docs/results/.

Suites (each runs its jobs one after another on one stack, so ratios compare like with like):
- throughput: the example job at max_staleness 0 (strict sync), 1, 2, 4 — samples/s, wall time to a target
  held-out accuracy, final accuracy, and where the time goes (learner wait / step / publish, rollout reload).
- pipeline: the synthetic engine and a padded learner step (benchmark instruments, never defaults) with fixed
  stage latencies; achieved async/sync speed-up against the ideal Σ stage / max stage, and the overhead left.
- findings: the paper's questions at toy scale — objective × staleness × seed, final accuracy and KL.
Benchmarks are not tests: nothing here asserts a speed. `--smoke` runs each suite tiny (that is a test).
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import httpx
import yaml

from asyncopd import localstack, state
from asyncopd.ports import free_port

TERMINAL = ("succeeded", "failed", "cancelled")


class Stack:
    def __init__(self, run_dir: Path, engine: str, **kwargs) -> None:
        self.run_dir = run_dir
        self.info = localstack.up(run_dir, http_port=free_port(), engine=engine, rollouts=1, **kwargs)
        self.api = self.info["api_url"]

    def run(self, spec: dict) -> dict:
        job = httpx.post(f"{self.api}/v1/jobs", json=spec, timeout=30).json()
        if "id" not in job:
            raise RuntimeError(f"job refused: {job}")
        while (job := httpx.get(f"{self.api}/v1/jobs/{job['id']}", timeout=30).json())["state"] not in TERMINAL:
            time.sleep(0.5)
        records = httpx.get(f"{self.api}/v1/jobs/{job['id']}/steps", timeout=30).json()
        return {"job": job, **records, "reload": self.reload_stats()}

    def reload_stats(self) -> tuple[float, int]:
        """Sum and count of asyncopd_weight_reload_seconds over the live rollout workers."""
        r = state.connect(self.info["redis_url"])
        total, count = 0.0, 0
        for svc in state.live_services(r, "rollout"):
            text = httpx.get(f"http://127.0.0.1:{svc['metrics_port']}/metrics", timeout=5).text
            for line in text.splitlines():
                if line.startswith("asyncopd_weight_reload_seconds_sum"):
                    total += float(line.split()[-1])
                elif line.startswith("asyncopd_weight_reload_seconds_count"):
                    count += int(float(line.split()[-1]))
        return total, count

    def close(self) -> None:
        localstack.down(self.run_dir)


def base_spec(job_file: Path, **overrides) -> dict:
    from asyncopd.cli import absolutize

    spec = absolutize(yaml.safe_load(job_file.read_text()), Path.cwd())
    for key, value in overrides.items():
        # Settings blocks merge; an objective is replaced whole (its parameters depend on its kind).
        merge = isinstance(value, dict) and isinstance(spec.get(key), dict) and key != "objective"
        spec[key] = {**spec[key], **value} if merge else value
    return spec


def summarize(result: dict, target: float | None, reload_before: tuple[float, int]) -> dict:
    job, steps, evals = result["job"], result["steps"], result["evals"]
    wall = job["finished_at"] - job["started_at"]
    n = max(len(steps), 1)
    reloads = result["reload"][1] - reload_before[1]
    reached = next((e for e in evals if target is not None and e["accuracy"] is not None
                    and e["accuracy"] >= target), None)
    return {
        "max_staleness": job["spec"]["max_staleness"], "objective": job["spec"]["objective"]["kind"],
        "seed": job["spec"]["train"]["seed"], "state": job["state"], "steps": len(steps),
        "samples_trained": job["progress"]["samples_trained"],
        "dropped_stale": job["progress"]["samples_dropped_stale"],
        "wall_s": round(wall, 1), "samples_per_s": round(job["progress"]["samples_trained"] / wall, 1),
        "step_period_s": round(wall / n, 4),
        "learner_step_s": round(sum(s["step_s"] for s in steps) / n, 4),
        "learner_wait_s": round(sum(s["wait_s"] for s in steps) / n, 4),
        "publish_s": round(sum(s["publish_s"] for s in steps) / n, 4),
        "reload_s": round((result["reload"][0] - reload_before[0]) / reloads, 4) if reloads else None,
        "mean_staleness": round(sum(s.get("mean_staleness", 0) * s["samples"] for s in steps)
                                / max(sum(s["samples"] for s in steps), 1), 3),
        "final_accuracy": evals[-1]["accuracy"] if evals else None,
        "final_kl": round(evals[-1]["kl_to_teacher"], 4) if evals and evals[-1]["kl_to_teacher"] is not None else None,
        "time_to_target_s": round(reached["time"] - job["started_at"], 1) if reached else None,
    }


def write_table(out: Path, name: str, title: str, command: str, rows: list[dict], notes: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{name}.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = [f"# {title}", "", f"Command: `{command}` ({time.strftime('%Y-%m-%d')}, this repository's 2-core "
             "CPU machine unless noted).", "", "| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join("" if v is None else str(v) for v in row.values()) + " |" for row in rows]
    (out / f"{name}.md").write_text("\n".join(lines + [""] + notes) + "\n")
    print("\n".join(lines + [""] + notes))


def suite_throughput(stack: Stack, job_file: Path, budgets: list[int], target: float, out: Path,
                     smoke: bool, command: str) -> list[dict]:
    rows, results = [], {}
    for eta in budgets:
        before = stack.reload_stats()
        over = {"max_staleness": eta, "name": f"throughput-eta{eta}"}
        if smoke:
            over["train"] = {"steps": 3, "checkpoint_every": 3}
            over["eval"] = {"every": 3}
        result = stack.run(base_spec(job_file, **over))
        results[eta] = result
        rows.append(summarize(result, target, before))
    sync = rows[0]["samples_per_s"] if rows and rows[0]["max_staleness"] == 0 else None
    for row in rows:
        row["vs_sync"] = round(row["samples_per_s"] / sync, 2) if sync else None
    write_table(out, "throughput", "Throughput and accuracy by staleness budget", command, rows, [
        f"time_to_target_s: wall time from job start to the first held-out evaluation at >= {target:.0%} exact "
        "match (evaluations every eval.every steps, so it is a step function).",
        "step_period_s = wall / steps; learner_step_s, learner_wait_s, publish_s are per-step means from the "
        "learner's records; reload_s is the rollout's mean weight-reload time per version.",
    ])
    plot_curves(results, out / "throughput.png")
    plot_staleness(results, out / "staleness.png")
    return rows


def suite_pipeline(run_dir: Path, job_file: Path, out: Path, smoke: bool, command: str,
                   latencies=(0.20, 0.10, 0.15)) -> list[dict]:
    """Fixed stage latencies (rollout call, teacher call, learner step) with one call of each per step."""
    rollout_s, teacher_s, learner_s = latencies
    stack = Stack(run_dir, "synthetic", service_env={
        "coordinator": {"ASYNCOPD_SYNTHETIC_LATENCY_S": str(rollout_s)},  # rollout workers inherit it
        "teacher": {"ASYNCOPD_SYNTHETIC_LATENCY_S": str(teacher_s), "ASYNCOPD_MAX_BATCH_SAMPLES": "256"},
        "learner": {"ASYNCOPD_SYNTHETIC_STEP_S": str(learner_s)},
    })
    steps = 4 if smoke else 40
    rows = []
    try:
        for eta in (0, 4):
            spec = base_spec(job_file, name=f"pipeline-eta{eta}", max_staleness=eta,
                             train={"steps": steps, "checkpoint_every": steps}, eval={"every": 0})
            before = stack.reload_stats()
            rows.append(summarize(stack.run(spec), None, before))
    finally:
        stack.close()
    ideal = (rollout_s + teacher_s + learner_s) / max(latencies)
    sync, fast = rows
    achieved = sync["step_period_s"] / fast["step_period_s"]
    for row in rows:
        row.update(ideal_speedup=round(ideal, 3), achieved_speedup=round(achieved, 3))
    sync["throughput_vs_ideal"] = round(sum(latencies) / sync["step_period_s"], 3)
    fast["throughput_vs_ideal"] = round(max(latencies) / fast["step_period_s"], 3)
    write_table(out, "pipeline", "Pipeline efficiency with fixed stage latencies (synthetic engine)", command, rows, [
        f"Stages per step: rollout generate {rollout_s} s, teacher score {teacher_s} s, learner step {learner_s} s "
        "(sleeps: the synthetic engine and ASYNCOPD_SYNTHETIC_STEP_S; benchmark instruments, never defaults).",
        f"Ideal step period: sync = sum of stages = {sum(latencies):.3f} s, async = slowest stage = "
        f"{max(latencies):.3f} s, so the ideal async/sync speed-up is {ideal:.3f}. throughput_vs_ideal = ideal "
        "period / measured period for each mode; achieved_speedup = sync period / async period.",
        f"Overhead beyond the ideal: sync {1000 * (sync['step_period_s'] - sum(latencies)):.0f} ms per step, async "
        f"{1000 * (fast['step_period_s'] - max(latencies)):.0f} ms per step (Redis round trips, serialization, "
        f"polling, weight publish {1000 * fast['publish_s']:.0f} ms on the learner's path, reload on the rollout's).",
    ])
    return rows


def suite_findings(stack: Stack, job_file: Path, objectives: list[str], budgets: list[int], seeds: list[int],
                   steps: int, out: Path, smoke: bool, command: str) -> list[dict]:
    rows = []
    for kind in objectives:
        for eta in budgets:
            for seed in seeds:
                spec = base_spec(job_file, name=f"findings-{kind}-eta{eta}-s{seed}", max_staleness=eta,
                                 objective={"kind": kind},
                                 train={"steps": 3 if smoke else steps, "seed": seed, "checkpoint_every": steps},
                                 eval={"every": 3 if smoke else steps})
                before = stack.reload_stats()
                rows.append(summarize(stack.run(spec), None, before))
    agg = []
    for kind in objectives:
        for eta in budgets:
            group = [r for r in rows if r["objective"] == kind and r["max_staleness"] == eta]
            accs = [r["final_accuracy"] for r in group if r["final_accuracy"] is not None]
            kls = [r["final_kl"] for r in group if r["final_kl"] is not None]
            agg.append({"objective": kind, "max_staleness": eta, "seeds": len(group),
                        "accuracy_mean": round(sum(accs) / len(accs), 3) if accs else None,
                        "accuracy_min": min(accs, default=None), "accuracy_max": max(accs, default=None),
                        "kl_mean": round(sum(kls) / len(kls), 4) if kls else None,
                        "kl_min": min(kls, default=None), "kl_max": max(kls, default=None),
                        "mean_staleness": round(sum(r["mean_staleness"] for r in group) / len(group), 2)})
    write_table(out, "findings-runs", "Findings: every run", command, rows, [])
    write_table(out, "findings", "The paper's findings at toy scale: objective x staleness (mean and range over seeds)",
                command, agg, [f"Each run: {steps} steps from the same student; final held-out exact match and "
                               "exact KL(student||teacher) of the distilled student."])
    plot_findings(agg, out / "findings.png")
    return agg


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(results: dict[int, dict], path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for eta, res in results.items():
        evals, start = res["evals"], res["job"]["started_at"]
        if not evals:
            continue
        axes[0].plot([e["step"] for e in evals], [e["accuracy"] for e in evals], marker="o", label=f"η={eta}")
        axes[1].plot([e["time"] - start for e in evals], [e["accuracy"] for e in evals], marker="o", label=f"η={eta}")
        axes[2].plot([e["time"] - start for e in evals], [e["kl_to_teacher"] for e in evals], marker="o",
                     label=f"η={eta}")
    for ax, (x, y) in zip(axes, (("step", "held-out accuracy"), ("wall time (s)", "held-out accuracy"),
                                 ("wall time (s)", "KL(student||teacher)")), strict=True):
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_staleness(results: dict[int, dict], path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.8 / max(len(results), 1)
    for i, (eta, res) in enumerate(results.items()):
        tally: dict[int, int] = {}
        for s in res["steps"]:
            for k, v in s["staleness"].items():
                tally[int(k)] = tally.get(int(k), 0) + v
        total = max(sum(tally.values()), 1)
        ax.bar([k + i * width for k in tally], [v / total for v in tally.values()], width, label=f"η={eta}")
    ax.set_xlabel("staleness of trained samples (policy versions)")
    ax.set_ylabel("fraction of samples")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_findings(agg: list[dict], path: Path) -> None:
    plt = _plt()
    kinds = sorted({a["objective"] for a in agg}, key=[a["objective"] for a in agg].index)
    fig, ax = plt.subplots(figsize=(7, 4))
    for kind in kinds:
        group = [a for a in agg if a["objective"] == kind and a["accuracy_mean"] is not None]
        x = [a["max_staleness"] for a in group]
        ax.errorbar(x, [a["accuracy_mean"] for a in group],
                    yerr=[[a["accuracy_mean"] - a["accuracy_min"] for a in group],
                          [a["accuracy_max"] - a["accuracy_mean"] for a in group]], marker="o", capsize=3, label=kind)
    ax.set_xlabel("max_staleness η")
    ax.set_ylabel("final held-out accuracy (min/mean/max over seeds)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def run(args) -> None:
    out, command = args.out, "asyncopd bench " + " ".join(args.argv)
    suites = ["throughput", "pipeline", "findings"] if args.suite == "all" else [args.suite]
    summary = {}
    if "pipeline" in suites:
        summary["pipeline"] = suite_pipeline(args.run_dir / "bench-pipeline", args.file, out, args.smoke, command)
    if {"throughput", "findings"} & set(suites):
        stack = Stack(args.run_dir / "bench", args.engine)
        try:
            if "throughput" in suites:
                summary["throughput"] = suite_throughput(stack, args.file, args.budgets, args.target, out,
                                                         args.smoke, command)
            if "findings" in suites:
                summary["findings"] = suite_findings(stack, args.file, args.objectives, args.findings_budgets,
                                                     args.seeds, args.findings_steps, out, args.smoke, command)
        finally:
            stack.close()
    path = out / "summary.json"  # suites run separately keep each other's results
    merged = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**merged, **summary}, indent=2))
