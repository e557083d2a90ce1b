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

from asyncopd import state
from asyncopd.client import Client, load_job_file
from asyncopd.ports import free_port
from asyncopd.tools import localstack


class Stack:
    def __init__(self, run_dir: Path, engine: str, **kwargs) -> None:
        self.run_dir = run_dir
        self.info = localstack.up(run_dir, http_port=free_port(), engine=engine, rollouts=1, **kwargs)
        self.api = self.info["api_url"]

    def run(self, spec: dict) -> dict:
        """One job to its end; the job view, its step and eval records (as JSON-shaped dicts) and, per service,
        the phase seconds and reloads it cost."""
        before = self.sample()
        with Client(self.api) as c:
            job = c.wait(c.submit(spec).id, timeout_s=float("inf"), interval_s=0.5)
            records = {"steps": [s.model_dump(mode="json") for s in c.steps(job.id)],
                       "evals": [e.model_dump(mode="json") for e in c.evals(job.id)]}
        job = job.model_dump(mode="json")
        after = self.sample()
        usage = {svc: {k: v - before.get(svc, {}).get(k, 0.0) for k, v in totals.items()}
                 for svc, totals in after.items()}
        return {"job": job, **records, "usage": usage}

    def sample(self) -> dict[str, dict[str, float]]:
        return service_usage(self.info["redis_url"])

    def close(self) -> None:
        localstack.down(self.run_dir)


def base_spec(job_file: Path, **overrides) -> dict:
    spec = load_job_file(job_file)
    for key, value in overrides.items():
        # Settings blocks merge; an objective is replaced whole (its parameters depend on its kind).
        merge = isinstance(value, dict) and isinstance(spec.get(key), dict) and key != "objective"
        spec[key] = {**spec[key], **value} if merge else value
    return spec


def steady_period(steps: list[dict]) -> float | None:
    """Seconds per step once the pipeline is full: the first tenth of the steps (start-up, filling the
    pipeline) is left out; `wall / steps` still carries it."""
    warm = max(1, len(steps) // 10)
    if len(steps) < warm + 2:
        return None
    return (steps[-1]["time"] - steps[warm]["time"]) / (len(steps) - 1 - warm)


def summarize(result: dict, target: float | None) -> dict:
    job, steps, evals, usage = result["job"], result["steps"], result["evals"], result["usage"]
    wall = job["finished_at"] - job["started_at"]
    n = max(len(steps), 1)
    period = steady_period(steps)
    rollout = usage.get("rollout", {})
    reached = next((e for e in evals if target is not None and e["accuracy"] is not None
                    and e["accuracy"] >= target), None)
    late = [e for e in evals if e["step"] > 0 and e["accuracy"] is not None][-3:]
    return {
        "max_staleness": job["spec"]["max_staleness"], "objective": job["spec"]["objective"]["kind"],
        "seed": job["spec"]["train"]["seed"], "state": job["state"], "steps": len(steps),
        "samples_trained": job["progress"]["samples_trained"],
        "dropped_stale": job["progress"]["samples_dropped_stale"],
        "wall_s": round(wall, 1), "samples_per_s": round(job["progress"]["samples_trained"] / wall, 1),
        "first_step_s": round(steps[0]["time"] - job["started_at"], 2) if steps else None,
        "step_period_s": round(wall / n, 4),
        "steady_period_s": round(period, 4) if period else None,
        "learner_step_s": round(sum(s["step_s"] for s in steps) / n, 4),
        "learner_wait_s": round(sum(s["wait_s"] for s in steps) / n, 4),
        "publish_s": round(sum(s["publish_s"] for s in steps) / n, 4),
        "reload_s": round(rollout["reload_s"] / rollout["reloads"], 4) if rollout.get("reloads") else None,
        "mean_staleness": round(sum(s.get("mean_staleness", 0) * s["samples"] for s in steps)
                                / max(sum(s["samples"] for s in steps), 1), 3),
        "final_accuracy": evals[-1]["accuracy"] if evals else None,
        # Consecutive versions' accuracies differ by up to ~15 points at a constant learning rate: the mean of
        # the last three evaluations is the steadier number to compare runs by.
        "last3_accuracy": round(sum(e["accuracy"] for e in late) / len(late), 4) if late else None,
        "final_kl": round(evals[-1]["kl_to_teacher"], 4) if evals and evals[-1]["kl_to_teacher"] is not None else None,
        "time_to_target_s": round(reached["time"] - job["started_at"], 1) if reached else None,
    }


def overhead_rows(name: str, result: dict, row: dict) -> list[dict]:
    """Per service: milliseconds per step in each phase, and the data-path overhead (Redis + serialization)
    and weight traffic (publish, reload) as fractions of the steady step period."""
    from asyncopd.phases import PHASES, REDIS, SERIALIZE, WEIGHTS

    period, steps = row["steady_period_s"] or row["step_period_s"], max(row["steps"], 1)
    out = []
    for svc in ("coordinator", "rollout", "teacher", "learner"):
        seconds = result["usage"].get(svc, {})
        per_step = {phase: seconds.get(phase, 0.0) / steps for phase in PHASES}
        out.append({"run": name, "max_staleness": row["max_staleness"], "service": svc,
                    **{f"{phase}_ms": round(1000 * v, 2) for phase, v in per_step.items()},
                    "data_path_pct": round(100 * (per_step[REDIS] + per_step[SERIALIZE]) / period, 2),
                    "weights_pct": round(100 * per_step[WEIGHTS] / period, 2)})
    return out


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


def spread(rows: list[dict], key: str) -> dict:
    values = [r[key] for r in rows if r[key] is not None]
    if not values:
        return {f"{key}_mean": None, f"{key}_min": None, f"{key}_max": None}
    return {f"{key}_mean": round(sum(values) / len(values), 4), f"{key}_min": min(values), f"{key}_max": max(values)}


def suite_throughput(stack: Stack, job_file: Path, budgets: list[int], seeds: list[int], target: float, out: Path,
                     smoke: bool, command: str) -> list[dict]:
    rows, results, overhead = [], {}, []
    for seed in seeds:
        for eta in budgets:
            over = {"max_staleness": eta, "name": f"throughput-eta{eta}-s{seed}", "train": {"seed": seed}}
            if smoke:
                over["train"] = {"seed": seed, "steps": 3, "checkpoint_every": 3}
                over["eval"] = {"every": 3}
            result = stack.run(base_spec(job_file, **over))
            results.setdefault(eta, result)  # the plots show the first seed's runs
            rows.append(summarize(result, target))
            overhead += overhead_rows(f"eta{eta}-s{seed}", result, rows[-1])
    for row in rows:
        sync = next((r for r in rows if r["seed"] == row["seed"] and r["max_staleness"] == 0), None)
        row["vs_sync"] = round(row["samples_per_s"] / sync["samples_per_s"], 2) if sync else None
    agg = []
    for eta in budgets:
        group = [r for r in rows if r["max_staleness"] == eta]
        agg.append({"max_staleness": eta, "seeds": len(group), **spread(group, "samples_per_s"),
                    **spread(group, "vs_sync"), **spread(group, "final_accuracy"), **spread(group, "last3_accuracy"),
                    **spread(group, "time_to_target_s"), **spread(group, "mean_staleness")})
    notes = [
        f"time_to_target_s: wall time from job start to the first held-out evaluation at >= {target:.0%} exact "
        "match (evaluations every eval.every steps, so it is a step function). final_accuracy is the last "
        "version's held-out exact match, last3_accuracy the mean over the last three evaluations.",
        "samples_per_s and step_period_s divide by the whole wall time (start-up included); steady_period_s "
        "leaves out the first tenth of the steps. learner_step_s, learner_wait_s, publish_s are per-step means "
        "from the learner's records; reload_s is the rollout's mean weight-reload time per version; vs_sync "
        "compares with the same seed's max_staleness 0 run.",
    ]
    write_table(out, "throughput-runs", "Throughput and accuracy by staleness budget: every run", command, rows, notes)
    write_table(out, "throughput", "Throughput and accuracy by staleness budget (mean, min, max over seeds)",
                command, agg, notes)
    write_overhead(out, "throughput-overhead", command, overhead)
    plot_curves(results, out / "throughput.png")
    plot_staleness(results, out / "staleness.png")
    return agg


def write_overhead(out: Path, name: str, command: str, rows: list[dict]) -> None:
    write_table(out, name, "Where each service's time goes per step (ms), from asyncopd_phase_seconds_total", command,
                rows, [
                    "Phases (asyncopd/phases.py): engine = generate / score / forward+backward+optimizer; redis = "
                    "stream reads that found work, writes, acks, job state; serialize = entry encode/decode; "
                    "tokenize = prompt rendering; weights = publish (learner) / reload (rollout); idle = blocked "
                    "waiting for work or a version. gRPC is the control plane only: no gRPC call happens per step.",
                    "data_path_pct = (redis + serialize) / steady step period; weights_pct = weights / steady step "
                    "period. Services run concurrently, so each percentage is of the same wall-clock step.",
                ])


def suite_pipeline(run_dir: Path, job_file: Path, out: Path, smoke: bool, command: str,
                   latencies=(0.20, 0.10, 0.15)) -> list[dict]:
    """Fixed stage latencies (rollout call, teacher call, learner step) with one call of each per step."""
    rollout_s, teacher_s, learner_s = latencies
    stack = Stack(run_dir, "synthetic", service_env={
        "coordinator": {"ASYNCOPD_SYNTHETIC_LATENCY_S": str(rollout_s)},  # rollout workers inherit it
        "teacher": {"ASYNCOPD_SYNTHETIC_LATENCY_S": str(teacher_s), "ASYNCOPD_MAX_BATCH_SAMPLES": "256"},
        "learner": {"ASYNCOPD_SYNTHETIC_STEP_S": str(learner_s)},
    })
    steps = 4 if smoke else 100
    rows, overhead = [], []
    try:
        for eta in (0, 4):
            spec = base_spec(job_file, name=f"pipeline-eta{eta}", max_staleness=eta,
                             train={"steps": steps, "checkpoint_every": steps}, eval={"every": 0})
            result = stack.run(spec)
            rows.append(summarize(result, None))
            overhead += overhead_rows(f"pipeline-eta{eta}", result, rows[-1])
    finally:
        stack.close()
    ideal = (rollout_s + teacher_s + learner_s) / max(latencies)
    sync, fast = rows
    for row, ideal_period in ((sync, sum(latencies)), (fast, max(latencies))):
        period = row["steady_period_s"] or row["step_period_s"]
        row.update(ideal_speedup=round(ideal, 3),
                   achieved_speedup=round((sync["steady_period_s"] or sync["step_period_s"]) /
                                          (fast["steady_period_s"] or fast["step_period_s"]), 3),
                   throughput_vs_ideal=round(ideal_period / period, 3),
                   with_startup_vs_ideal=round(ideal_period / row["step_period_s"], 3),
                   overhead_ms=round(1000 * (period - ideal_period), 1))
    write_table(out, "pipeline", "Pipeline efficiency with fixed stage latencies (synthetic engine)", command, rows, [
        f"Stages per step: rollout generate {rollout_s} s, teacher score {teacher_s} s, learner step {learner_s} s "
        "(sleeps: the synthetic engine and ASYNCOPD_SYNTHETIC_STEP_S; benchmark instruments, never defaults).",
        f"Ideal step period: sync = sum of stages = {sum(latencies):.3f} s, async = slowest stage = "
        f"{max(latencies):.3f} s, so the ideal async/sync speed-up is {ideal:.3f}. throughput_vs_ideal = ideal "
        "period / steady period (the first tenth of the steps, start-up and pipeline fill, left out); "
        "with_startup_vs_ideal uses wall / steps instead; achieved_speedup = sync steady period / async steady "
        "period; overhead_ms = steady period - ideal period.",
        f"first_step_s is the job's start-up: loading the models and filling the pipeline ({steps} steps per job).",
    ])
    write_overhead(out, "pipeline-overhead", command, overhead)
    return rows


def suite_reload(run_dir: Path, job_file: Path, engine: str, eta: int, lags: list[int], steps: int, out: Path,
                 smoke: bool, command: str) -> list[dict]:
    """The same job with the rollout following every version (ASYNCOPD_RELOAD_LAG=0) and with fewer reloads:
    each lag on its own stack (the lag is a rollout worker setting, not part of the job)."""
    rows, overhead = [], []
    for lag in lags:
        stack = Stack(run_dir / f"lag{lag}", engine, service_env={"coordinator": {"ASYNCOPD_RELOAD_LAG": str(lag)}})
        try:
            spec = base_spec(job_file, name=f"reload-lag{lag}", max_staleness=eta,
                             train={"steps": 3 if smoke else steps, "checkpoint_every": 3 if smoke else steps},
                             eval={"every": 3 if smoke else steps})
            result = stack.run(spec)
        finally:
            stack.close()
        row = {"reload_lag": lag, **summarize(result, None)}
        row["reloads_per_step"] = round(result["usage"].get("rollout", {}).get("reloads", 0) / max(row["steps"], 1), 3)
        rows.append(row)
        overhead += overhead_rows(f"lag{lag}", result, row)
    write_table(out, "reload", f"Rollout reload lag at max_staleness {eta}: reloads vs freshness", command, rows, [
        "reload_lag: a rollout worker loads a newer policy only once it is more than this many versions ahead of "
        "the loaded one, or when a batch's version fence needs it (ASYNCOPD_RELOAD_LAG).",
    ])
    write_overhead(out, "reload-overhead", command, overhead)
    return rows


def findings_objective(text: str) -> tuple[str, dict, dict]:
    """One `--objectives` item as (label, job-spec objective, job-spec overrides): a kind (`m2po`) or a YAML
    flow mapping of the objective with optional extra keys: `lr` (this objective's learning rate; finding 2
    compares each objective at its own tuned rate), `n` (samples per prompt, generation.n: more samples per
    step, a variance reduction to compare) and `name` (its label in the tables), e.g.
    '{kind: reverse_kl_mc, samples: 4, lr: 5e-4}'. Validated here, so a typo fails before hours of runs."""
    import yaml

    from asyncopd.jobspec import Generation
    from asyncopd.objective_spec import parse_objective

    value = yaml.safe_load(text)
    objective = {"kind": value} if isinstance(value, str) else dict(value or {})
    lr, n, name = objective.pop("lr", None), objective.pop("n", None), objective.pop("name", None)
    parse_objective(objective)
    params = [f"{k}={v}" for k, v in objective.items() if k != "kind"]
    overrides: dict[str, dict] = {}
    if lr is not None:
        overrides["train"] = {"learning_rate": float(lr)}  # YAML 1.1 reads 5e-4 (no dot) as a string
        params.append(f"lr={float(lr)}")
    if n is not None:
        overrides["generation"] = {"n": Generation(n=n).n}
        params.append(f"n={n}")
    return name or "-".join([objective.get("kind", "?"), *params]), objective, overrides


def suite_findings(stack: Stack, job_file: Path, objectives: list[str], budgets: list[int], seeds: list[int],
                   steps: int, learning_rate: float | None, out: Path, smoke: bool, command: str) -> list[dict]:
    rows, curves = [], []
    train = {"steps": 3 if smoke else steps, "checkpoint_every": steps}
    if learning_rate is not None:
        train["learning_rate"] = learning_rate
    for label, objective, overrides in [findings_objective(text) for text in objectives]:
        for eta in budgets:
            for seed in seeds:
                run_train = {**train, "seed": seed, **overrides.get("train", {})}
                slug = "".join(c if c.isalnum() or c in "._-" else "_" for c in label)[:80]
                spec = base_spec(job_file, name=f"findings-{slug}-eta{eta}-s{seed}", max_staleness=eta,
                                 objective=objective, train=run_train, eval={"every": 3 if smoke else steps},
                                 **{k: v for k, v in overrides.items() if k != "train"})
                result = stack.run(spec)
                rows.append({**summarize(result, None), "objective": label})
                curves += [{"objective": label, "max_staleness": eta, "seed": seed, "step": e["step"],
                            "accuracy": e["accuracy"], "kl_to_teacher": e["kl_to_teacher"]} for e in result["evals"]]
    note = (f"Each run: {steps} steps from the same student; final held-out exact match and exact "
            "KL(student||teacher) of the distilled student."
            + (f" Learning rate {learning_rate} unless the objective names its own." if learning_rate else "")
            + " An objective's `n` is its generation.n (samples per prompt; the job's otherwise).")
    return report_findings(rows, curves, out, command, [note])


def findings_from(dirs: list[Path], out: Path, command: str) -> list[dict]:
    """The findings tables and plots of runs made by separate invocations (one per run, so a grid cut off
    part-way keeps what finished): their findings-runs.csv and findings-curves.csv, merged."""
    rows, curves, commands = [], [], []
    for d in dirs:
        rows += read_csv(d / "findings-runs.csv")
        if (d / "findings-curves.csv").exists():
            curves += read_csv(d / "findings-curves.csv")
        first = (d / "findings.md").read_text().splitlines()[2] if (d / "findings.md").exists() else ""
        commands.append(first.removeprefix("Command: ").split(" (")[0])
    return report_findings(rows, curves, out, command,
                           ["Merged from one invocation per run:", "", *[f"- {c}" for c in commands if c]])


def report_findings(rows: list[dict], curves: list[dict], out: Path, command: str, notes: list[str]) -> list[dict]:
    """Every run, the learning curves, and per (objective, η) the mean and range over seeds."""
    labels = list(dict.fromkeys(r["objective"] for r in rows))
    agg = []
    for label in labels:
        for eta in sorted({r["max_staleness"] for r in rows if r["objective"] == label}):
            group = [r for r in rows if r["objective"] == label and r["max_staleness"] == eta]
            agg.append({"objective": label, "max_staleness": eta, "seeds": len(group),
                        **spread(group, "final_accuracy"), **spread(group, "last3_accuracy"),
                        **spread(group, "final_kl"),
                        "mean_staleness": round(sum(r["mean_staleness"] for r in group) / len(group), 2)})
    write_table(out, "findings-runs", "Findings: every run", command, rows, [])
    if curves:
        write_table(out, "findings-curves", "Findings: held-out evaluations of every run (learning curves)",
                    command, curves, [])
        plot_findings_curves(curves, out / "findings-curves.png")
    write_table(out, "findings", "The paper's findings at toy scale: objective x staleness (mean and range over seeds)",
                command, agg, notes)
    plot_findings(agg, out / "findings.png")
    return agg


def read_csv(path: Path) -> list[dict]:
    """Rows written by write_table, with numbers as numbers and empty cells as None."""
    def value(text: str) -> object:
        for kind in (int, float):
            try:
                return kind(text)
            except ValueError:
                pass
        return None if text == "" else text

    with open(path, newline="") as fh:
        return [{k: value(v) for k, v in row.items()} for row in csv.DictReader(fh)]


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
        group = [a for a in agg if a["objective"] == kind and a["final_accuracy_mean"] is not None]
        x = [a["max_staleness"] for a in group]
        mean = [a["final_accuracy_mean"] for a in group]
        # The mean is rounded in the table; one seed's min or max can lie a rounding step beyond it.
        ax.errorbar(x, mean, yerr=[[max(0.0, m - a["final_accuracy_min"]) for m, a in zip(mean, group, strict=True)],
                                   [max(0.0, a["final_accuracy_max"] - m) for m, a in zip(mean, group, strict=True)]],
                    marker="o", capsize=3, label=kind)
    ax.set_xlabel("max_staleness η")
    ax.set_ylabel("final held-out accuracy (min/mean/max over seeds)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def run(args) -> None:
    out, command = args.out, "asyncopd bench " + " ".join(args.argv)
    suites = ["throughput", "pipeline", "reload", "findings"] if args.suite == "all" else [args.suite]
    summary = {}
    if "weights" in suites:  # no stack: a training run and the transports in this process
        from asyncopd.tools.bench_weights import suite_weights

        summary["weights"] = suite_weights(out, args.sizes, args.weights_steps, args.weights_lrs, args.weights_engines,
                                           args.smoke, command)
    if "pipeline" in suites:
        summary["pipeline"] = suite_pipeline(args.run_dir / "bench-pipeline", args.file, out, args.smoke, command)
    if "reload" in suites:
        summary["reload"] = suite_reload(args.run_dir / "bench-reload", args.file, args.engine, args.reload_eta,
                                         args.reload_lags, args.reload_steps, out, args.smoke, command)
    if {"throughput", "findings"} & set(suites):
        stack = Stack(args.run_dir / "bench", args.engine)
        try:
            if "throughput" in suites:
                summary["throughput"] = suite_throughput(stack, args.file, args.budgets, args.seeds, args.target,
                                                         out, args.smoke, command)
            if "findings" in suites and args.findings_from:
                summary["findings"] = findings_from(args.findings_from, out, command)
            elif "findings" in suites:
                summary["findings"] = suite_findings(stack, args.file, args.objectives, args.findings_budgets,
                                                     args.seeds, args.findings_steps, args.findings_lr, out,
                                                     args.smoke, command)
        finally:
            stack.close()
    path = out / "summary.json"  # suites run separately keep each other's results
    merged = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**merged, **summary}, indent=2))


def plot_findings_curves(curves: list[dict], path: Path) -> None:
    """Held-out KL(student||teacher) by step, one panel per max_staleness, one line per objective (mean over
    seeds; the shaded band is their min-max)."""
    plt = _plt()
    budgets = sorted({c["max_staleness"] for c in curves})
    fig, axes = plt.subplots(1, len(budgets), figsize=(5 * len(budgets), 4), squeeze=False)
    for ax, eta in zip(axes[0], budgets, strict=True):
        for label in dict.fromkeys(c["objective"] for c in curves):
            by_step: dict[int, list[float]] = {}
            for c in curves:
                if c["objective"] == label and c["max_staleness"] == eta and c["kl_to_teacher"] is not None:
                    by_step.setdefault(c["step"], []).append(c["kl_to_teacher"])
            steps = sorted(by_step)
            ax.plot(steps, [sum(by_step[x]) / len(by_step[x]) for x in steps], label=label)
            ax.fill_between(steps, [min(by_step[x]) for x in steps], [max(by_step[x]) for x in steps], alpha=0.15)
        ax.set_title(f"max_staleness η = {eta}")
        ax.set_xlabel("step")
        ax.set_ylabel("held-out KL(student||teacher)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def service_usage(redis_url: str) -> dict[str, dict[str, float]]:
    """Per service, summed over its live instances: seconds per phase (asyncopd_phase_seconds_total) and the
    rollout's weight reloads (reload_s, reloads). An instance whose /metrics does not answer is skipped: a
    crashed service stays in the heartbeat registry for its TTL."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, dict[str, float]] = {}
    for svc in state.live_services(state.connect(redis_url)):
        try:
            text = httpx.get(f"http://127.0.0.1:{svc.metrics_port}/metrics", timeout=5).text
        except httpx.HTTPError:
            continue
        totals = out.setdefault(svc.service, {})
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == "asyncopd_phase_seconds_total":
                    key = s.labels["phase"]
                elif s.name in ("asyncopd_weight_reload_seconds_sum", "asyncopd_weight_reload_seconds_count"):
                    key = "reload_s" if s.name.endswith("_sum") else "reloads"
                else:
                    continue
                totals[key] = totals.get(key, 0.0) + s.value
    return out
