"""The `asyncopd` command: run the local stack and talk to a coordinator's REST API."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import httpx
import yaml

DEFAULT_RUN_DIR = Path(".run")


def api_url(args) -> str:
    if getattr(args, "api", None):
        return args.api
    if os.environ.get("ASYNCOPD_API_URL"):
        return os.environ["ASYNCOPD_API_URL"]
    from asyncopd.tools import localstack

    info = localstack.load(args.run_dir)
    return info["api_url"] if info else "http://127.0.0.1:8000"


def client(args) -> httpx.Client:
    token = os.environ.get("ASYNCOPD_API_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=api_url(args), headers=headers, timeout=30)


def _check(resp: httpx.Response) -> dict:
    if resp.status_code >= 400:
        try:
            detail = resp.json().get("detail")
        except ValueError:
            detail = resp.text
        if isinstance(detail, list):
            detail = "; ".join(f"{d.get('field') or '.'.join(map(str, d.get('loc', [])))}: {d['msg']}" for d in detail)
        sys.exit(f"error {resp.status_code}: {detail}")
    return resp.json()


def absolutize(spec: dict, base: Path) -> dict:
    """Make local paths in a job file absolute, so the services find them whatever their working directory."""
    def fix(value: str) -> str:
        p = Path(value)
        return str((base / p).absolute()) if not p.is_absolute() and (base / p).exists() else value

    for section, key in (("student", "model"), ("teacher", "model"), ("prompts", "path"),
                         ("prompts", "heldout_path")):
        if isinstance(spec.get(section), dict) and isinstance(spec[section].get(key), str):
            spec[section][key] = fix(spec[section][key])
    if isinstance(spec.get("output_dir"), str) and not Path(spec["output_dir"]).is_absolute():
        spec["output_dir"] = str((base / spec["output_dir"]).absolute())
    return spec


def read_job_file(path: Path) -> dict:
    spec = yaml.safe_load(path.read_text())
    if not isinstance(spec, dict):
        sys.exit(f"{path}: a job file must hold a mapping")
    return absolutize(spec, Path.cwd())


def cmd_up(args) -> None:
    from asyncopd.tools import localstack

    info = localstack.up(args.run_dir, http_port=args.http_port, engine=args.engine, rollouts=args.rollouts,
                         learner_ranks=args.learner_ranks)
    print(f"asyncopd is up: API {info['api_url']} (docs at {info['api_url']}/docs), logs in {args.run_dir}/logs")
    if args.detach:
        return
    try:
        while localstack.is_up(args.run_dir):
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    localstack.down(args.run_dir)


def cmd_down(args) -> None:
    from asyncopd.tools import localstack

    localstack.down(args.run_dir)
    print("asyncopd is down")


def cmd_submit(args) -> None:
    with client(args) as c:
        job = _check(c.post("/v1/jobs", json=read_job_file(args.file)))
        print(job["id"])
        if args.wait:
            job = follow(c, job["id"])
            print_summary(job, _check(c.get(f"/v1/jobs/{job['id']}/steps"))["steps"])
            if job["state"] != "succeeded":
                sys.exit(1)


def cmd_status(args) -> None:
    with client(args) as c:
        if args.job:
            print(json.dumps(_check(c.get(f"/v1/jobs/{args.job}")), indent=2))
            return
        for job in _check(c.get("/v1/jobs"))["jobs"]:
            p = job["progress"]
            print(f"{job['id']:<32} {job['state']:<10} step {p['step']}/{p['steps']}  v{p['policy_version']}")


def cmd_cancel(args) -> None:
    with client(args) as c:
        print(_check(c.post(f"/v1/jobs/{args.job}/cancel"))["state"])


def cmd_scale(args) -> None:
    with client(args) as c:
        print(_check(c.put(f"/v1/pools/{args.pool}", json={"replicas": args.replicas}))["replicas"])


def progress_line(job: dict, width: int = 24) -> str:
    p = job["progress"]
    done = p["step"] / max(p["steps"], 1)
    bar = "#" * int(done * width) + "." * (width - int(done * width))
    elapsed = time.time() - (job["started_at"] or time.time())
    rate = p["samples_trained"] / elapsed if elapsed > 0 else 0.0
    loss = f"{p['last_loss']:.4f}" if p["last_loss"] is not None else "-"
    return (f"[{bar}] step {p['step']}/{p['steps']}  v{p['policy_version']}  {rate:6.1f} samples/s  "
            f"staleness<={p['max_staleness_trained']}  dropped {p['samples_dropped_stale']}  loss {loss}  "
            f"{job['state']}")


def follow(c: httpx.Client, job_id: str, interval_s: float = 0.5) -> dict:
    tty = sys.stdout.isatty()
    last = None
    while True:
        job = _check(c.get(f"/v1/jobs/{job_id}"))
        if tty:
            print("\r" + progress_line(job), end="", flush=True)
        elif (job["progress"]["step"], job["state"]) != last:  # logs get one line per step, not per poll
            print(progress_line(job), flush=True)
        last = (job["progress"]["step"], job["state"])
        if job["state"] in ("succeeded", "failed", "cancelled"):
            if tty:
                print()
            return job
        time.sleep(interval_s)


def print_summary(job: dict, steps: list[dict], evaluation: dict | None = None) -> None:
    p = job["progress"]
    wall = (job["finished_at"] or time.time()) - (job["started_at"] or job["created_at"])
    rows = [
        ("job", job["id"]),
        ("state", job["state"] + (f" ({job['reason']})" if job.get("reason") else "")),
        ("steps / policy version", f"{p['step']} / {p['policy_version']}"),
        ("max_staleness (budget)", f"{job['spec']['max_staleness']}"),
        ("samples released", p["samples_released"]),
        ("samples trained", p["samples_trained"]),
        ("dropped as stale", p["samples_dropped_stale"]),
        ("dead-lettered", p["samples_dead_lettered"]),
        ("max staleness trained", p["max_staleness_trained"]),
        ("wall time", f"{wall:.1f} s"),
        ("samples/s", f"{p['samples_trained'] / wall:.1f}" if wall > 0 else "-"),
    ]
    if steps:
        rows.append(("loss first -> last", f"{steps[0]['loss']:.4f} -> {steps[-1]['loss']:.4f}"))
        rows.append(("behaviour KL first -> last", f"{steps[0]['kl']:.4f} -> {steps[-1]['kl']:.4f}"))
    for name, value in (evaluation or {}).items():
        rows.append((name, value))
    rows.append(("distilled student", job.get("result_dir") or "-"))
    width = max(len(r[0]) for r in rows)
    print("-" * (width + 40))
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print("-" * (width + 40))


def cmd_models(args) -> None:
    from asyncopd.ml.tinymodels import build_all

    for name, path in build_all(args.out).items():
        print(f"{name}: {path}")


def cmd_demo(args) -> None:
    """`make run`: build the tiny models if missing, start the stack, run the example job, stop the stack."""
    from asyncopd.ml.evaluate import heldout_report
    from asyncopd.ml.tinymodels import build_all
    from asyncopd.tools import localstack

    t0 = time.time()
    build_all(Path(".cache/models"))
    started_here = not localstack.is_up(args.run_dir)
    if started_here:
        print("starting the local stack ...", flush=True)
        localstack.up(args.run_dir, http_port=args.http_port, engine=args.engine, rollouts=args.rollouts)
    try:
        spec = read_job_file(args.file)
        with client(args) as c:
            job = _check(c.post("/v1/jobs", json=spec))
            print(f"submitted {job['id']}", flush=True)
            job = follow(c, job["id"])
            steps = _check(c.get(f"/v1/jobs/{job['id']}/steps"))["steps"]
        evaluation = heldout_report(spec, job) if job["state"] == "succeeded" else {}
        print_summary(job, steps, evaluation)
        print(f"make run wall time (incl. start and stop): {time.time() - t0:.1f} s")
    finally:
        if started_here:
            localstack.down(args.run_dir)
    if job["state"] != "succeeded":
        sys.exit(1)


def cmd_eval(args) -> None:
    from asyncopd.ml.evaluate import Evaluator, read_rows

    ev = Evaluator(str(args.teacher), read_rows(args.prompts, args.limit), max_tokens=args.max_tokens)
    result = ev.evaluate(str(args.model))
    result["teacher_accuracy"] = ev.teacher_accuracy()
    print(json.dumps(result, indent=2))


def cmd_bench(args) -> None:
    from asyncopd.tools.bench import run

    args.argv = sys.argv[2:]
    run(args)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="asyncopd", description="Asynchronous on-policy distillation.")
    ap.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR, help="local stack state and logs")
    ap.add_argument("--api", help="coordinator URL (default: the local stack's, else http://127.0.0.1:8000)")
    sub = ap.add_subparsers(dest="command", required=True)

    def stack_flags(p):
        p.add_argument("--http-port", type=int, default=8000)
        p.add_argument("--engine", choices=("vllm", "hf"), default="vllm")
        p.add_argument("--rollouts", type=int, default=1, help="rollout workers to start")

    p = sub.add_parser("up", help="start Redis and the four services locally")
    stack_flags(p)
    p.add_argument("--learner-ranks", type=int, default=1, help="learner processes under torchrun")
    p.add_argument("--detach", action="store_true", help="return once every service is ready")
    p.set_defaults(func=cmd_up)
    sub.add_parser("down", help="stop the local stack").set_defaults(func=cmd_down)
    p = sub.add_parser("submit", help="submit a job file (YAML or JSON)")
    p.add_argument("file", type=Path)
    p.add_argument("--wait", action="store_true", help="follow the job with a progress bar until it ends")
    p.set_defaults(func=cmd_submit)
    p = sub.add_parser("status", help="list jobs, or show one")
    p.add_argument("job", nargs="?")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("cancel", help="cancel a job")
    p.add_argument("job")
    p.set_defaults(func=cmd_cancel)
    p = sub.add_parser("scale", help="scale a pool: asyncopd scale rollout N")
    p.add_argument("pool", choices=("rollout",))
    p.add_argument("replicas", type=int)
    p.set_defaults(func=cmd_scale)
    p = sub.add_parser("models", help="build the tiny teacher and student (HF format, no downloads)")
    p.add_argument("out", type=Path, nargs="?", default=Path(".cache/models"))
    p.set_defaults(func=cmd_models)
    p = sub.add_parser("demo", help="the make-run demo: stack up, run a job with a progress bar, stack down")
    p.add_argument("file", type=Path, nargs="?", default=Path("examples/tiny-job.yaml"))
    stack_flags(p)
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("eval", help="held-out accuracy and KL to the teacher of a model directory")
    p.add_argument("model", type=Path)
    p.add_argument("--teacher", type=Path, default=Path(".cache/models/teacher"))
    p.add_argument("--prompts", type=Path, default=Path("examples/arith-heldout.jsonl"))
    p.add_argument("--limit", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=8)
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("bench", help="experiments through the real stack: throughput, pipeline, findings")
    p.add_argument("file", type=Path, nargs="?", default=Path("examples/tiny-job.yaml"))
    p.add_argument("--suite", choices=("all", "throughput", "pipeline", "reload", "findings"), default="all")
    p.add_argument("--budgets", type=int, nargs="+", default=[0, 1, 2, 4])
    p.add_argument("--target", type=float, default=0.6, help="held-out accuracy for time-to-target")
    p.add_argument("--objectives", nargs="+",
                   default=["forward_kl_topk", "reverse_kl_sampled", "reverse_kl_recompute"])
    p.add_argument("--findings-budgets", type=int, nargs="+", default=[0, 2, 8])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--findings-steps", type=int, default=300)
    p.add_argument("--findings-lr", type=float, help="learning rate of every findings run (default: the job's)")
    p.add_argument("--reload-eta", type=int, default=4, help="max_staleness of the reload-lag suite")
    p.add_argument("--reload-lags", type=int, nargs="+", default=[0, 3])
    p.add_argument("--reload-steps", type=int, default=1000)
    p.add_argument("--smoke", action="store_true", help="a few steps per job: checks the harness, measures nothing")
    p.add_argument("--engine", choices=("vllm", "hf"), default="vllm")
    p.add_argument("--out", type=Path, default=Path("docs/results"))
    p.set_defaults(func=cmd_bench)
    return ap


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
