"""`asyncopd bench` / `make bench`: the example job through the real local stack at several staleness budgets,
in one run on one machine, so the ratios compare like with like. Writes markdown + CSV under docs/results/."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import httpx
import yaml

from asyncopd import localstack, state
from asyncopd.ports import free_port


def _rollout_reload_stats(redis_url: str) -> tuple[float, int]:
    """Sum and count of asyncopd_weight_reload_seconds over the live rollout workers."""
    r = state.connect(redis_url)
    total, count = 0.0, 0
    for svc in state.live_services(r, "rollout"):
        text = httpx.get(f"http://127.0.0.1:{svc['metrics_port']}/metrics", timeout=5).text
        for line in text.splitlines():
            if line.startswith("asyncopd_weight_reload_seconds_sum"):
                total += float(line.split()[-1])
            elif line.startswith("asyncopd_weight_reload_seconds_count"):
                count += int(float(line.split()[-1]))
    return total, count


def run(job_file: Path, budgets: list[int], engine: str, out_dir: Path, run_dir: Path) -> list[dict]:
    from asyncopd.cli import absolutize
    from asyncopd.tinymodels import build_all

    build_all(Path(".cache/models"))
    base = absolutize(yaml.safe_load(job_file.read_text()), Path.cwd())
    info = localstack.up(run_dir, http_port=free_port(), engine=engine, rollouts=1)
    rows = []
    try:
        api = info["api_url"]
        for eta in budgets:
            reload_before = _rollout_reload_stats(info["redis_url"])
            job = httpx.post(f"{api}/v1/jobs", json={**base, "name": f"bench-eta{eta}", "max_staleness": eta}).json()
            while (job := httpx.get(f"{api}/v1/jobs/{job['id']}").json())["state"] not in (
                    "succeeded", "failed", "cancelled"):
                time.sleep(0.2)
            steps = httpx.get(f"{api}/v1/jobs/{job['id']}/steps").json()["steps"]
            reload_after = _rollout_reload_stats(info["redis_url"])
            wall = job["finished_at"] - job["started_at"]
            reloads = reload_after[1] - reload_before[1]
            rows.append({
                "engine": engine, "max_staleness": eta, "state": job["state"], "steps": len(steps),
                "samples_trained": job["progress"]["samples_trained"], "wall_s": round(wall, 2),
                "samples_per_s": round(job["progress"]["samples_trained"] / wall, 2),
                "mean_step_s": round(sum(s["step_s"] for s in steps) / len(steps), 4),
                "mean_wait_s": round(sum(s["wait_s"] for s in steps) / len(steps), 4),
                "mean_publish_s": round(sum(s["publish_s"] for s in steps) / len(steps), 4),
                "mean_reload_s": round((reload_after[0] - reload_before[0]) / reloads, 4) if reloads else None,
                "max_staleness_trained": job["progress"]["max_staleness_trained"],
                "final_loss": round(steps[-1]["loss"], 4),
            })
    finally:
        localstack.down(run_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "throughput.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    sync = next((r for r in rows if r["max_staleness"] == 0), None)
    lines = [f"# Throughput by staleness budget ({engine} engine)", "",
             f"Command: `asyncopd bench --engine {engine} --budgets {' '.join(map(str, budgets))}` on "
             f"{time.strftime('%Y-%m-%d')}, job `{job_file}`.", "",
             "| " + " | ".join(rows[0]) + (" | vs sync |" if sync else " |"),
             "|" + "---|" * (len(rows[0]) + (1 if sync else 0))]
    for row in rows:
        ratio = f" {row['samples_per_s'] / sync['samples_per_s']:.2f}x |" if sync else ""
        lines.append("| " + " | ".join(str(v) for v in row.values()) + " |" + ratio)
    (out_dir / "throughput.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return rows
