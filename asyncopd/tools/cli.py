"""The `asyncopd` command: run the local stack and talk to a coordinator's REST API."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import httpx
import yaml

from asyncopd.api_models import JobView
from asyncopd.client import ApiError, Client, TokenFileError, load_job_file
from asyncopd.records import StepRecord

DEFAULT_RUN_DIR = Path(".run")


def api_url(args) -> str:
    from asyncopd.tools import localstack

    return localstack.address(getattr(args, "api", None), "ASYNCOPD_API_URL", "api_url", "http://127.0.0.1:8000",
                              args.run_dir)


def client(args) -> Client:
    return Client(api_url(args))


def read_job_file(path: Path) -> dict:
    try:
        return load_job_file(path)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        sys.exit(str(exc))


def cmd_up(args) -> None:
    from asyncopd.tools import localstack

    try:
        info = localstack.up(args.run_dir, http_port=args.http_port, engine=args.engine, rollouts=args.rollouts,
                             learner_ranks=args.learner_ranks, supervised=not args.no_supervise)
    except (RuntimeError, TimeoutError) as exc:
        sys.exit(f"asyncopd up: {exc}")
    print(f"asyncopd is up: API {info['api_url']} (docs at {info['api_url']}/docs), logs in {args.run_dir}/logs")
    if args.detach:
        return
    try:
        # Supervised: until `asyncopd down` or Ctrl-C; else until a service dies.
        while localstack.load(args.run_dir) and (not args.no_supervise or localstack.is_up(args.run_dir)):
            localstack.reap_children()  # this process started them: their exits must not linger as zombies
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    localstack.down(args.run_dir)


def cmd_restart(args) -> None:
    from asyncopd.tools import localstack

    print(f"{args.service} restarted (pid {localstack.restart(args.run_dir, args.service)})")


def cmd_down(args) -> None:
    from asyncopd.tools import localstack

    localstack.down(args.run_dir)
    print("asyncopd is down")


def cmd_submit(args) -> None:
    with client(args) as c:
        job = c.submit(read_job_file(args.file))
        print(job.id)
        if args.wait:
            job = follow(c, job.id)
            print_summary(job, list(c.steps(job.id)))
            if job.state != "succeeded":
                sys.exit(1)


def cmd_status(args) -> None:
    if args.services:
        return cmd_status_services(args)
    with client(args) as c:
        if args.job:
            print(c.job(args.job).model_dump_json(indent=2))
            return
        for job in c.jobs():
            p = job.progress
            print(f"{job.id:<32} {job.state:<10} step {p.step}/{p.steps}  v{p.policy_version}")


def cmd_cancel(args) -> None:
    with client(args) as c:
        print(c.cancel(args.job).state)


def cmd_status_services(args) -> None:
    from asyncopd.tools import control

    control.run(control.status_services, args)


def cmd_drain(args) -> None:
    from asyncopd.tools import control

    control.run(control.drain, args)


def cmd_scale(args) -> None:
    with client(args) as c:
        print(c.scale(args.pool, args.replicas))


def progress_line(job: JobView, width: int = 24) -> str:
    p = job.progress
    done = p.step / max(p.steps, 1)
    bar = "#" * int(done * width) + "." * (width - int(done * width))
    elapsed = time.time() - (job.started_at or time.time())
    rate = p.samples_trained / elapsed if elapsed > 0 else 0.0
    loss = f"{p.last_loss:.4f}" if p.last_loss is not None else "-"
    return (f"[{bar}] step {p.step}/{p.steps}  v{p.policy_version}  {rate:6.1f} samples/s  "
            f"staleness<={p.max_staleness_trained}  dropped {p.samples_dropped_stale}  loss {loss}  {job.state}")


def follow(c: Client, job_id: str, interval_s: float = 0.5) -> JobView:
    tty = sys.stdout.isatty()
    last = None

    def show(job: JobView) -> None:
        nonlocal last
        if tty:
            print("\r" + progress_line(job), end="", flush=True)
        elif (job.progress.step, job.state) != last:  # logs get one line per step, not per poll
            print(progress_line(job), flush=True)
        last = (job.progress.step, job.state)

    job = c.wait(job_id, timeout_s=float("inf"), interval_s=interval_s, on_poll=show)
    if tty:
        print()
    return job


def print_summary(job: JobView, steps: list[StepRecord], evaluation: dict | None = None) -> None:
    p = job.progress
    wall = (job.finished_at or time.time()) - (job.started_at or job.created_at)
    rows = [
        ("job", job.id),
        ("state", job.state + (f" ({job.reason})" if job.reason else "")),
        ("steps / policy version", f"{p.step} / {p.policy_version}"),
        ("max_staleness (budget)", f"{job.spec.max_staleness}" if job.spec else "-"),
        ("samples released", p.samples_released),
        ("samples trained", p.samples_trained),
        ("dropped as stale", p.samples_dropped_stale),
        ("dead-lettered", p.samples_dead_lettered),
        ("max staleness trained", p.max_staleness_trained),
        ("wall time", f"{wall:.1f} s"),
        ("samples/s", f"{p.samples_trained / wall:.1f}" if wall > 0 else "-"),
    ]
    if steps:
        rows.append(("loss first -> last", f"{steps[0].loss:.4f} -> {steps[-1].loss:.4f}"))
        rows.append(("behaviour KL first -> last", f"{steps[0].behavior_kl:.4f} -> {steps[-1].behavior_kl:.4f}"))
    for name, value in (evaluation or {}).items():
        rows.append((name, value))
    rows.append(("distilled student", job.result_dir or "-"))
    width = max(len(r[0]) for r in rows)
    print("-" * (width + 40))
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print("-" * (width + 40))


def cmd_models(args) -> None:
    from asyncopd.ml.tinymodels import build_all, build_sizes

    for name, path in (build_sizes(args.out, args.sizes) if args.sizes else build_all(args.out)).items():
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
            job = c.submit(spec)
            print(f"submitted {job.id}", flush=True)
            job = follow(c, job.id)
            steps = list(c.steps(job.id))
        evaluation = heldout_report(job.spec, job.result_dir) if job.state == "succeeded" else {}
        print_summary(job, steps, evaluation)
        print(f"make run wall time (incl. start and stop): {time.time() - t0:.1f} s")
    finally:
        if started_here:
            localstack.down(args.run_dir)
    if job.state != "succeeded":
        sys.exit(1)


def job_spec(path: Path):
    from pydantic import ValidationError

    from asyncopd.jobspec import JobSpec

    try:
        return JobSpec.model_validate(read_job_file(path))
    except ValidationError as exc:
        sys.exit(f"{path}: not a valid job spec:\n" + "\n".join(
            f"  {'.'.join(map(str, e['loc'])) or '.'}: {e['msg']}" for e in exc.errors()))


def cmd_eval(args) -> None:
    """Held-out accuracy (as the job file judges it) and KL to the teacher of a model directory."""
    from asyncopd.ml.evaluate import Evaluator

    spec = job_spec(args.file)
    if args.limit:
        spec = spec.model_copy(update={"prompts": spec.prompts.model_copy(update={"heldout_limit": args.limit})})
    ev = Evaluator.for_job(spec.model_copy(update={"eval": spec.eval.model_copy(update={"kl": True})}))
    result = ev.evaluate(str(args.model))
    print(json.dumps({"task": spec.eval.task, "accuracy": result.accuracy, "judged": result.judged,
                      "kl_to_teacher": result.kl_to_teacher, "teacher_accuracy": ev.teacher_accuracy(),
                      "samples": result.samples}, indent=2))


def cmd_validate(args) -> None:
    """Check a job file without submitting it: the spec, then (unless --spec-only) its prompt sources."""
    from asyncopd.prompts import PromptFileError, heldout_rows, training_rows

    spec = job_spec(args.file)
    if not args.spec_only:
        try:
            rows = training_rows(spec.prompts)
            held = heldout_rows(spec.prompts)
        except PromptFileError as exc:
            sys.exit(f"{args.file}: {exc}")
        print(f"{len(rows)} training prompts, {len(held) if held else 0} held-out rows "
              f"({sum('answer' in r for r in held or [])} with an answer)")
    print(f"{args.file}: valid")


def cmd_bench(args) -> None:
    from asyncopd.tools.bench import run

    args.argv = sys.argv[2:]
    run(args)


def cmd_gpu_check(args) -> None:
    from asyncopd.tools.gpucheck import run

    sys.exit(run(args, sys.argv[2:]))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="asyncopd", description="Asynchronous on-policy distillation.")
    ap.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR, help="local stack state and logs")
    ap.add_argument("--api", help="coordinator URL (default: the local stack's, else http://127.0.0.1:8000)")
    sub = ap.add_subparsers(dest="command", required=True)

    def stack_flags(p):
        p.add_argument("--http-port", type=int, default=8000)
        p.add_argument("--engine", choices=("vllm", "hf"), default="vllm")
        p.add_argument("--rollouts", type=int, default=1, help="rollout workers to start")

    def control_flags(p):  # the gRPC control commands find the instances in Redis's heartbeat registry
        p.add_argument("--redis-url", help="default: ASYNCOPD_REDIS_URL, else the local stack's Redis")
        p.add_argument("--timeout", type=float, default=5.0, help="deadline of each gRPC call, seconds")

    p = sub.add_parser("up", help="start Redis and the four services locally")
    stack_flags(p)
    p.add_argument("--learner-ranks", type=int, default=1, help="learner processes under torchrun")
    p.add_argument("--detach", action="store_true", help="return once every service is ready")
    p.add_argument("--no-supervise", action="store_true",
                   help="do not restart services that die (a supervisor process does by default)")
    p.set_defaults(func=cmd_up)
    sub.add_parser("down", help="stop the local stack").set_defaults(func=cmd_down)
    p = sub.add_parser("restart", help="start a service of the local stack again (after it died)")
    p.add_argument("service", choices=("redis", "coordinator", "teacher", "learner"))
    p.set_defaults(func=cmd_restart)
    p = sub.add_parser("submit", help="submit a job file (YAML or JSON)")
    p.add_argument("file", type=Path)
    p.add_argument("--wait", action="store_true", help="follow the job with a progress bar until it ends")
    p.set_defaults(func=cmd_submit)
    p = sub.add_parser("status", help="list jobs, or show one; --services: every live service instance")
    p.add_argument("job", nargs="?")
    p.add_argument("--services", action="store_true",
                   help="call GetStatus on each instance in the heartbeat registry, one line each")
    control_flags(p)
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("cancel", help="cancel a job")
    p.add_argument("job")
    p.set_defaults(func=cmd_cancel)
    p = sub.add_parser("drain", help="ask one rollout/teacher/learner instance to finish what it holds and exit "
                       "(its Deployment or pool may start a replacement: lower the pool size to keep it gone)")
    p.add_argument("target", metavar="SERVICE/INSTANCE", help="as `status --services` lists it, or INSTANCE")
    p.add_argument("--wait", type=float, metavar="SECONDS", help="then wait up to SECONDS for it to exit")
    control_flags(p)
    p.set_defaults(func=cmd_drain)
    p = sub.add_parser("scale", help="scale a pool: asyncopd scale rollout N")
    p.add_argument("pool", choices=("rollout",))
    p.add_argument("replicas", type=int)
    p.set_defaults(func=cmd_scale)
    p = sub.add_parser("models", help="build the tiny teacher and student (HF format, no downloads)")
    p.add_argument("out", type=Path, nargs="?", default=Path(".cache/models"))
    p.add_argument("--sizes", nargs="+", choices=("example", "25m", "125m"),
                   help="instead: random-init Llama-style models of these sizes (the weights bench's)")
    p.set_defaults(func=cmd_models)
    p = sub.add_parser("demo", help="the make-run demo: stack up, run a job with a progress bar, stack down")
    p.add_argument("file", type=Path, nargs="?", default=Path("examples/tiny-job.yaml"))
    stack_flags(p)
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("eval", help="held-out accuracy and KL to the teacher of a model directory")
    p.add_argument("model", type=Path)
    p.add_argument("file", type=Path, nargs="?", default=Path("examples/tiny-job.yaml"),
                   help="job file naming the teacher, the held-out rows and how answers are judged")
    p.add_argument("--limit", type=int, help="held-out rows (default: the job's prompts.heldout_limit)")
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("validate", help="check a job file without submitting it (spec and prompt sources)")
    p.add_argument("file", type=Path)
    p.add_argument("--spec-only", action="store_true", help="skip reading the prompt sources (e.g. hub ids)")
    p.set_defaults(func=cmd_validate)
    p = sub.add_parser("bench", help="experiments through the real stack: throughput, pipeline, findings")
    p.add_argument("file", type=Path, nargs="?", default=Path("examples/tiny-job.yaml"))
    p.add_argument("--suite", choices=("all", "throughput", "pipeline", "reload", "findings", "weights"),
                   default="all", help="weights (not in all): the cost of a weight version by model size and transport")
    p.add_argument("--budgets", type=int, nargs="+", default=[0, 1, 2, 4])
    p.add_argument("--target", type=float, default=0.6, help="held-out accuracy for time-to-target")
    p.add_argument("--objectives", nargs="+",
                   default=["forward_kl_topk", "reverse_kl_sampled", "reverse_kl_recompute"],
                   help="findings: objective kinds, or YAML objectives with an optional own learning rate and "
                        "label, e.g. '{kind: reverse_kl_mc, samples: 4, lr: 5e-4, name: mc4}'")
    p.add_argument("--findings-budgets", type=int, nargs="+", default=[0, 2, 8])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--findings-steps", type=int, default=300)
    p.add_argument("--findings-lr", type=float, help="learning rate of every findings run (default: the job's)")
    p.add_argument("--findings-from", type=Path, nargs="+", metavar="DIR",
                   help="findings: run nothing, merge these earlier findings outputs (one invocation per run) "
                        "into one table, curves and plots")
    p.add_argument("--reload-eta", type=int, default=4, help="max_staleness of the reload-lag suite")
    p.add_argument("--reload-lags", type=int, nargs="+", default=[0, 3])
    p.add_argument("--reload-steps", type=int, default=1000)
    p.add_argument("--smoke", action="store_true", help="a few steps per job: checks the harness, measures nothing")
    p.add_argument("--engine", choices=("vllm", "hf"), default="vllm")
    p.add_argument("--out", type=Path, default=Path("docs/results"))
    p.add_argument("--sizes", nargs="+", choices=("example", "25m", "125m"), default=["example", "25m", "125m"],
                   help="weights suite: model sizes (asyncopd models --sizes)")
    p.add_argument("--weights-steps", type=int, default=8, help="weights suite: training steps (= versions) per run")
    p.add_argument("--weights-lrs", type=float, nargs="+", default=[1e-3, 1e-5], help="weights suite: learning rates")
    p.add_argument("--weights-engines", nargs="+", choices=("hf", "vllm"), default=["hf", "vllm"],
                   help="weights suite: engines whose reload is timed")
    p.set_defaults(func=cmd_bench)
    p = sub.add_parser("gpu-check", help="the CUDA paths end to end with numbers (scripts/gpu-check.sh installs "
                       "what a GPU machine lacks first); --device cpu rehearses it")
    from asyncopd.tools.gpucheck import add_arguments  # stdlib only at import

    add_arguments(p)
    p.set_defaults(func=cmd_gpu_check)
    return ap


def api_failure(exc: Exception, url: str) -> str:
    """One line saying what failed and what to do, for the errors any REST command can meet."""
    if isinstance(exc, httpx.HTTPError):
        return (f"error: cannot reach the coordinator at {url} ({type(exc).__name__}: {exc}); start the local stack "
                "with `asyncopd up`, or point --api (or ASYNCOPD_API_URL) at a running coordinator")
    assert isinstance(exc, ApiError)
    if exc.status_code == 401:
        return (f"error 401 from {url}: {exc.message}; set ASYNCOPD_API_TOKEN (or ASYNCOPD_API_TOKEN_FILE, a file "
                "holding it) to the coordinator's token")
    if exc.status_code >= 500:
        return (f"error {exc.status_code} from {url}: {exc.message}; the coordinator failed, see its log "
                "(the local stack's is .run/logs/coordinator.log)")
    return f"error {exc.status_code}: {exc.message}"


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ApiError, httpx.HTTPError) as exc:
        sys.exit(api_failure(exc, api_url(args)))
    except TokenFileError as exc:
        sys.exit(f"error: {exc}")


if __name__ == "__main__":
    main()
