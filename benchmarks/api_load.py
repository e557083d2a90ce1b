"""Training rate with and without clients hammering the REST API, in one run on one local stack.

    .venv/bin/python benchmarks/api_load.py [--clients 50] [--interval 0] [--steps 300] [--engine vllm]

Runs the example job (examples/tiny-job.yaml, `--steps` steps, no evaluation) twice: alone, then with
`--clients` clients each polling `GET /v1/jobs/{id}` and `GET /v1/jobs`, back to back (`--interval 0`) or one
poll every `--interval` seconds (a dashboard's rate), and prints samples/s of both runs, their ratio, and the
pollers' requests/s, p50/p99 latency and errors. The clients are asyncio tasks in a process of their own, so
their latencies are the server's (plus the shared CPU), not the benchmark's own GIL contention. They are spread
over `--client-procs` processes: one Python process running 50 httpx clients back to back is itself the
bottleneck (measured against a coordinator alone: 176 requests/s and p99 1.5 s from one process, 523 requests/s
and p99 0.2 s from five).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import random
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

from asyncopd.client import Client, load_job_file
from asyncopd.ports import free_port
from asyncopd.tools import localstack


def run_job(api: str, spec: dict) -> float:
    with Client(api) as c:
        job = c.wait(c.submit(spec).id, timeout_s=3600, interval_s=0.5)
    assert job.state == "succeeded", job.reason
    return job.progress.samples_trained / (job.finished_at - job.started_at)


async def _client(http: httpx.AsyncClient, stop: mp.Event, interval: float, latencies: list, errors: list) -> None:
    # Each client starts at its own offset within the interval: clients that all wake together arrive as one
    # burst of 2 x --clients requests per interval, and the queue that burst builds would be all p99 measures.
    await asyncio.sleep(random.uniform(0, interval))
    job_id = None
    while not stop.is_set():
        for path in ([f"/v1/jobs/{job_id}"] if job_id else []) + ["/v1/jobs"]:
            t0 = time.perf_counter()
            try:
                resp = await http.get(path)
                if resp.status_code != 200:
                    errors.append(str(resp.status_code))
                elif path == "/v1/jobs" and resp.json()["jobs"]:
                    job_id = resp.json()["jobs"][-1]["id"]
            except httpx.HTTPError as exc:
                errors.append(type(exc).__name__)
            latencies.append(time.perf_counter() - t0)
        await asyncio.sleep(interval)


def pollers(api: str, clients: int, interval: float, stop: mp.Event, out) -> None:
    """The polling clients (a process of their own); sends (latencies, errors) back when `stop` is set."""
    async def run():
        latencies, errors = [], []
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        async with httpx.AsyncClient(base_url=api, timeout=30, limits=limits) as http:
            await asyncio.gather(*(_client(http, stop, interval, latencies, errors) for _ in range(clients)))
        return latencies, errors

    out.send(asyncio.run(run()))


STATUS_ROUTES = ("/v1/jobs", "/v1/jobs/{job_id}")


def server_buckets(api: str) -> dict[float, float]:
    """Cumulative counts by upper bound of the coordinator's own time for the status routes (GET, 200), from
    asyncopd_http_request_seconds on its /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[float, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{api}/metrics").text):
        for sample in family.samples:
            labels = sample.labels
            if (sample.name == "asyncopd_http_request_seconds_bucket" and labels["method"] == "GET"
                    and labels["route"] in STATUS_ROUTES and labels["status"] == "200"):
                le = float(labels["le"])
                out[le] = out.get(le, 0.0) + sample.value
    return out


def server_share_within(before: dict, after: dict) -> dict[float, float]:
    """Of the status reads served between the two snapshots, the share the server answered within each bound."""
    total = after[float("inf")] - before.get(float("inf"), 0.0)
    return {le: (n - before.get(le, 0.0)) / total for le, n in sorted(after.items()) if total}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--interval", type=float, default=0.0, help="seconds between one client's polls")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--engine", choices=("vllm", "hf"), default="vllm")
    ap.add_argument("--client-procs", type=int, default=5, help="processes the clients are spread over")
    ap.add_argument("--data-path-nice", type=int, default=0,
                    help="experiment: renice rollout workers, teacher and learner by this much once up (measured: "
                         "no better p99)")
    args = ap.parse_args()
    from asyncopd.ml.tinymodels import build_all

    build_all(Path(".cache/models"))  # the example job's models (cached)
    spec = load_job_file(Path("examples/tiny-job.yaml"))
    spec["train"] = {**spec["train"], "steps": args.steps, "checkpoint_every": args.steps}
    spec["eval"] = {"every": 0}
    run_dir = Path(tempfile.mkdtemp()) / "stack"
    info = localstack.up(run_dir, http_port=free_port(), engine=args.engine, rollouts=1)
    try:
        api = info["api_url"]
        if args.data_path_nice:
            import psutil

            coordinator = psutil.Process(info["pids"]["coordinator"])
            for p in [psutil.Process(info["pids"][s]) for s in ("teacher", "learner")] + coordinator.children():
                for q in [p, *p.children(recursive=True)]:
                    q.nice(args.data_path_nice)
        alone = run_job(api, {**spec, "name": "alone"})
        stop = mp.Event()
        pipes = [mp.Pipe(duplex=False) for _ in range(args.client_procs)]
        shares = [args.clients // args.client_procs + (i < args.clients % args.client_procs)
                  for i in range(args.client_procs)]
        procs = [mp.Process(target=pollers, args=(api, n, args.interval, stop, send))
                 for n, (_, send) in zip(shares, pipes, strict=True) if n]
        for proc in procs:
            proc.start()
        t0 = time.perf_counter()
        before = server_buckets(api)
        loaded = run_job(api, {**spec, "name": "loaded"})
        elapsed = time.perf_counter() - t0
        stop.set()
        within = server_share_within(before, server_buckets(api))
        latencies, errors = [], []
        for receive, _ in pipes[:len(procs)]:
            got_latencies, got_errors = receive.recv()
            latencies += got_latencies
            errors += got_errors
        for proc in procs:
            proc.join()
    finally:
        localstack.down(run_dir)
    q = statistics.quantiles(latencies, n=100)
    print(f"| | samples/s |\n|---|---|\n| alone | {alone:.0f} |\n| {args.clients} polling clients | {loaded:.0f} "
          f"({loaded / alone:.0%} of alone) |\n")
    print(f"pollers: {len(latencies) / elapsed:.0f} requests/s, p50 {q[49] * 1000:.0f} ms, p99 {q[98] * 1000:.0f} ms, "
          f"{len(errors)} errors {dict(Counter(errors))} ({args.engine} engine, {args.steps} steps, "
          f"interval {args.interval} s, "
          f"{len(procs)} client processes, data path nice {args.data_path_nice})")
    print("server side (asyncopd_http_request_seconds, status reads): " + ", ".join(
        f"{share:.1%} within {le * 1000:g} ms" for le, share in within.items() if 0.01 <= le <= 0.25))


if __name__ == "__main__":
    main()
