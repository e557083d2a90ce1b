"""`asyncopd bench --suite weights`: what one policy version costs, by model size and weights transport.

For each size (`asyncopd models --sizes`, random-init Llama-style models) and learning rate, a real short
training run — DeepSpeed (ZeRO-0, one gloo rank) with torch AdamW on random token batches, the job defaults'
weight decay and gradient clipping — publishes every version through each variant:
- `filesystem` fp32 (what every version cost before the weights package), `filesystem` bf16, `delta` bf16,
  `nccl` bf16 (a transfer over vLLM's weight transfer, gloo on this CPU, with `delta` beneath it);
and times, per version: publish seconds (served-dtype cast, encode, write, rename), bytes written, and the
reload into an HF engine and a vLLM engine of the version's dtype (a follower that follows every version, as a
rollout worker does; for `delta` on vLLM both ways of handing over the rebuilt tensors: the in-process
`weights_iterator` and a worker-local directory reloaded by path; for `nccl`, vLLM only, one transfer round
from a transfer server in this process, coordinated through a scratch redis-server: group formation over
loopback, broadcast, layerwise reload). And per size and transport, the peak host memory of rank 0 while
versions publish and of a rollout worker while it reads them back (`bench_host_memory`).

Files are read back from the page cache of a local disk: the reload seconds are the CPU's share (decode,
checksums, copying into the engine), not a network volume's. `bytes_per_version` is what a shared volume
would carry, and the report converts it at a stated bandwidth. Benchmarks are not tests: nothing here asserts
a speed. `--smoke` runs the example size for three versions (the test that the harness works).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from asyncopd.tools.bench_host_memory import VERSIONS as MEMORY_VERSIONS
from asyncopd.tools.bench_host_memory import host_memory

VARIANTS = [("filesystem", "float32"), ("filesystem", "bfloat16"), ("delta", "bfloat16"), ("nccl", "bfloat16")]
TRANSFER_JOB = "bench-weights"  # the transfer server's and followers' job id (a scratch Redis of its own)
BATCH, SEQ = 8, 128  # tokens per training step: 1,024 random ids
FULL_EVERY = 8  # the default of weights_full_every: one cycle per run at the default 8 steps
ASYNC_BLOCK = 3  # steps of one way in a round of `async_overlap` (a background block's first is not steady)
EMBEDDINGS = ("embed_tokens", "lm_head")
EXTRAPOLATE = {"1B": 1e9, "4B": 4e9, "8B": 8e9, "32B": 32e9, "70B": 70e9}
VOLUME_GBPS = 1.0  # an assumed shared-volume bandwidth per client, to turn bytes into seconds
PEERS = [
    ("NeMo-RL", "NCCL refit", "4B", "0.21-0.34 s", "H100"),
    ("TRL", "weight sync", "32B", "~2 s", "GPU cluster"),
    ("veRL", "weight sync", "30B-A3B", "~7 s", "GPU cluster"),
]


def _init_deepspeed() -> None:
    """One gloo rank in this process, without DeepSpeed's JIT-built shm op (as the learner does on CPU)."""
    import deepspeed
    import torch.distributed as dist

    from asyncopd.ports import free_port

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo")


class TrainingRun:
    """DeepSpeed + AdamW on random token batches: deltas depend on real optimizer updates."""

    def __init__(self, model_dir: Path, lr: float, seed: int = 0) -> None:
        import deepspeed
        import torch
        from transformers import AutoModelForCausalLM

        from asyncopd.jobspec import Train

        _init_deepspeed()
        torch.manual_seed(seed)
        defaults = Train()
        self.model = self.wrap(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), model_dir)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=defaults.weight_decay)
        config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                  "gradient_clipping": defaults.grad_clip, "zero_optimization": {"stage": 0},
                  "steps_per_print": 10**9}
        self.engine, *_ = deepspeed.initialize(model=self.model, optimizer=optimizer, config=config)
        self.gen = torch.Generator().manual_seed(seed)
        self.config_json = self.describe()
        self.trainable = sum(p.numel() for p in trainable)

    def wrap(self, model, model_dir: Path):
        """The model to train (subclasses wrap it, e.g. in LoRA adapters)."""
        return model

    def describe(self) -> str:
        """The config.json a published version carries."""
        return self.model.config.to_json_string()

    def step(self) -> float:
        import torch

        ids = torch.randint(3, self.model.config.vocab_size, (BATCH, SEQ), generator=self.gen)
        t0 = time.perf_counter()
        loss = self.engine(input_ids=ids, labels=ids).loss
        self.engine.backward(loss)
        self.engine.step()
        return time.perf_counter() - t0


def build_engines(model_dir: Path, kinds: list[str]) -> dict:
    from asyncopd.ml.engines import build_engine

    for k, v in (("VLLM_HOST_IP", "127.0.0.1"), ("VLLM_NO_USAGE_STATS", "1"), ("VLLM_ENABLE_V1_MULTIPROCESSING", "0")):
        os.environ.setdefault(k, v)
    return {(kind, dtype): build_engine(kind, str(model_dir), device="cpu", dtype=dtype, seed=0, max_model_len=256,
                                        kv_cache_bytes=64 << 20, gpu_memory_utilization=0.5,
                                        weight_transfer=kind == "vllm")
            for kind in kinds for dtype in {d for _, d in VARIANTS}}


def block_bytes(location: str) -> tuple[int, int]:
    """(bytes written, bytes a full version would have) for the transformer blocks only (not embeddings)."""
    from asyncopd.ml.weights.manifest import Manifest

    m = Manifest.read(Path(location))
    blocks = {n: e for n, e in m.tensors.items() if not any(s in n for s in EMBEDDINGS)}
    width = {"float32": 4, "bfloat16": 2, "float16": 2}
    full = sum(width[e.dtype] * _numel(e.shape) for e in blocks.values())
    return (sum(e.length for e in blocks.values()) if m.kind == "delta" else full), full


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def train_and_publish(size: str, model_dir: Path, lrs: list[float], steps: int, work: Path,
                      server) -> tuple[list[dict], list[dict]]:
    """Per-version rows of one size (every variant, every learning rate), each with the version's location:
    every version stays on disk for `follow_all`. `server`: the `nccl` variant's transfer server. And the
    `async_overlap` rows at the smallest learning rate."""
    import gc

    from asyncopd.ml.weights.codec import served
    from asyncopd.ml.weights.manifest import Manifest
    from asyncopd.ml.weights.transports import setup_publisher

    rows, overlap = [], []
    for lr in lrs:
        run = TrainingRun(model_dir, lr)
        params = sum(p.numel() for p in run.model.parameters())
        publishers = {(t, d): setup_publisher(t, work / f"{size}-{lr:g}-{t}-{d}", dtype=d, full_every=FULL_EVERY,
                                              fallback="delta", server=server)
                      for t, d in VARIANTS}
        for version in range(1, steps + 1):
            step_s = run.step()
            state = run.model.state_dict()
            for (transport, dtype), publisher in publishers.items():
                t0 = time.perf_counter()
                served(state, publisher.dtype, copy=True)  # what a step waits for with weights_async_publish
                snapshot_s = time.perf_counter() - t0
                t0 = time.perf_counter()
                location = publisher.publish(version, state, run.config_json)
                publish_s = time.perf_counter() - t0
                blocks_written, blocks_full = block_bytes(location)
                rows.append({"size": size, "params": params, "lr": lr, "transport": transport, "dtype": dtype,
                             "version": version, "kind": Manifest.read(Path(location)).kind,
                             "step_s": round(step_s, 4), "publish_s": round(publish_s, 4),
                             "snapshot_s": round(snapshot_s, 4),
                             "bytes": publisher.last_bytes(), "blocks_bytes": blocks_written,
                             "blocks_full_bytes": blocks_full, "location": location})
        if lr == min(lrs):
            overlap += async_overlap(size, params, run, lr, steps, work)
        del run, publishers
        gc.collect()
    return rows, overlap


def async_overlap(size: str, params: int, run: TrainingRun, lr: float, steps: int, work: Path) -> list[dict]:
    """The learner's wall seconds per step (train + publish) without publishing, with each version written
    before the next step (weights_async_publish off), and written on the background thread while the next step
    trains (on), per transport. The five ways are interleaved: rounds of ASYNC_BLOCK steps of each, in an order
    that rotates every round, so that the step's own drift over the run (4.0-4.6 s between one way's block and
    the next at 125M here) falls on every way alike; each figure is a median over steady steps. A background
    step is steady from its block's second: it trains while the version before is written, then waits for that
    write if it is still running, as in a job (a block's last write finishes untimed before the next way). On
    this machine the writer shares the two cores with training, so this is what overlapping costs, not just what
    it hides."""
    from asyncopd.ml.weights.background import BackgroundPublisher
    from asyncopd.ml.weights.transports import setup_publisher

    ways = [(None, False)] + [(t, background) for t in ("filesystem", "delta") for background in (False, True)]

    def prune(publisher, version: int, seconds: float) -> None:  # as the learner does (in the writer's time)
        publisher.prune(version - 2)

    writers = {(t, b): BackgroundPublisher(setup_publisher(t, work / f"overlap-{size}-{t}-{b}", dtype="bfloat16",
                                                           full_every=FULL_EVERY), background=b, on_written=prune)
               for t, b in ways if t is not None}
    versions = dict.fromkeys(writers, 0)
    rounds = max(2, steps // 2)
    timed: dict[tuple, list[list[float]]] = {way: [] for way in ways}  # way -> per round, its steady steps
    for r in range(rounds):
        for way in ways[r % len(ways):] + ways[:r % len(ways)]:
            writer, seconds = writers.get(way), []
            for i in range(ASYNC_BLOCK):
                t0 = time.perf_counter()
                run.step()
                if writer is not None:
                    versions[way] += 1
                    writer.submit(versions[way], run.model.state_dict(), run.config_json, lambda v, location: None)
                if i > 0 or not way[1]:
                    seconds.append(time.perf_counter() - t0)
            if writer is not None:
                writer.flush()
            timed[way].append(seconds)
    for writer in writers.values():
        writer.close()

    def steady(way: tuple) -> float:
        return statistics.median(t for block in timed[way] for t in block)

    def overhead(way: tuple) -> dict:
        """% over the step alone: over every steady step (medians), and the range over the rounds."""
        alone = (None, False)
        per_round = [100 * (statistics.median(w) / statistics.median(a) - 1)
                     for w, a in zip(timed[way], timed[alone], strict=True)]
        return {"pct": round(100 * (steady(way) / steady(alone) - 1), 1),
                "rounds": f"{min(per_round):.1f}..{max(per_round):.1f}"}

    rows = []
    for transport in ("filesystem", "delta"):
        sync, background = overhead((transport, False)), overhead((transport, True))
        rows.append({"size": size, "params_m": round(params / 1e6, 2), "lr": lr, "transport": transport,
                     "dtype": "bfloat16", "rounds": rounds, "block": ASYNC_BLOCK,
                     "step_alone_s": round(steady((None, False)), 4),
                     "step_sync_publish_s": round(steady((transport, False)), 4),
                     "step_async_publish_s": round(steady((transport, True)), 4),
                     "sync_overhead_pct": sync["pct"], "sync_overhead_pct_rounds": sync["rounds"],
                     "async_overhead_pct": background["pct"], "async_overhead_pct_rounds": background["rounds"]})
    return rows


def follow_all(rows: list[dict], engines: dict, server) -> None:
    """Time each engine following every version of each (lr, variant) in order, as a rollout worker does: one
    follower per (variant, engine[, way in]), each with its own delta base. Version by version, every follower
    in turn, so load from other work on the machine falls on all of them alike. Adds reload_* columns. `nccl`:
    the transfer server is offered each version first (its tensors rebuilt from the fallback's files, not
    timed), then a vLLM engine receives it in one round."""
    from asyncopd.ml.weights.transports import setup_follower

    groups = sorted({(r["lr"], r["transport"], r["dtype"]) for r in rows})
    followers = {(g, kind, via): setup_follower(g[1], redis=server.r, job_id=TRANSFER_JOB, fallback="delta")
                 for g in groups for kind in sorted({k for k, d in engines if d == g[2]})
                 if g[1] != "nccl" or kind == "vllm"
                 for via in (("iterator", "path") if g[1] == "delta" and kind == "vllm" else ("",))}
    offered = {g: setup_follower("delta") for g in groups if g[1] == "nccl"}
    served_by_files = fallbacks()
    by_key = {(r["lr"], r["transport"], r["dtype"], r["version"]): r for r in rows}
    for version in sorted({r["version"] for r in rows}):
        for (group, kind, via), follower in followers.items():
            row, engine = by_key[(*group, version)], engines[(kind, group[2])]
            if group in offered:
                server.offer(version, row["location"], offered[group].tensors(row["location"]))
            t0 = time.perf_counter()
            if via == "path":
                engine.load_tensors(follower.tensors(row["location"]), version, via="path")
            else:
                follower.load(row["location"], version, engine)
            row[f"reload_{kind}{'_path' if via == 'path' else ''}_s"] = round(time.perf_counter() - t0, 4)
            if group in offered and fallbacks() != served_by_files:
                raise RuntimeError(f"nccl: version {version} came from the fallback's files, not a transfer round "
                                   "(see the log): its time would be the fallback's")


def fallbacks() -> float:
    """Versions the `nccl` followers of this process loaded from the fallback instead (all reasons)."""
    from asyncopd.ml.weights.metrics import SYNC_FALLBACKS

    return sum(sample.value for metric in SYNC_FALLBACKS.collect() for sample in metric.samples
               if sample.name.endswith("_total"))


def aggregate(rows: list[dict]) -> list[dict]:
    """One row per (size, lr, transport, dtype) over the run's versions (one full + deltas at the default 8
    steps and full_every 8): bytes are means (the amortized cost of a cycle), seconds are medians (the machine
    is shared: one slow version should not move the row)."""
    out = []
    keys = sorted({(r["params"], r["size"], r["lr"], r["transport"], r["dtype"]) for r in rows},
                  key=lambda k: (k[0], -k[2], k[3], k[4]))
    for params, size, lr, transport, dtype in keys:
        group = [r for r in rows if (r["size"], r["lr"], r["transport"], r["dtype"]) == (size, lr, transport, dtype)]
        full_bf16 = params * 2
        deltas = [r for r in group if r["kind"] == "delta"]
        mean_bytes = statistics.mean(r["bytes"] for r in group)
        agg = {"size": size, "params_m": round(params / 1e6, 2), "lr": lr, "transport": transport, "dtype": dtype,
               "versions": len(group), "bytes_per_version_mb": round(mean_bytes / 1e6, 3),
               "vs_full_bf16": round(mean_bytes / full_bf16, 3),
               "delta_only_vs_full_bf16": round(statistics.mean(r["bytes"] for r in deltas) / full_bf16, 3)
               if deltas else None,
               "blocks_delta_vs_full": round(sum(r["blocks_bytes"] for r in deltas)
                                             / sum(r["blocks_full_bytes"] for r in deltas), 3) if deltas else None,
               "publish_s": round(statistics.median(r["publish_s"] for r in group), 4),
               "snapshot_s": round(statistics.median(r["snapshot_s"] for r in group), 4),
               "step_s": round(statistics.median(r["step_s"] for r in group), 3)}
        for col in ("reload_hf_s", "reload_vllm_s", "reload_vllm_path_s"):
            values = [r[col] for r in group if col in r]
            agg[col] = round(statistics.median(values), 4) if values else None
        reload = agg["reload_vllm_s"] if agg["reload_vllm_s"] is not None else agg["reload_hf_s"]
        agg["publish_reload_pct_of_step"] = round(100 * (agg["publish_s"] + (reload or 0)) / agg["step_s"], 1)
        agg["async_pct_of_step"] = round(100 * (agg["snapshot_s"] + (reload or 0)) / agg["step_s"], 1)
        out.append(agg)
    return out


def per_gb(agg: list[dict]) -> list[dict]:
    """Seconds per GB of a bf16 model (0.5 B parameters), from the largest size at each learning rate: the
    rate the extrapolation uses (fixed costs matter less there than at the small sizes)."""
    largest = max(a["params_m"] for a in agg)
    out = []
    for a in agg:
        if a["params_m"] != largest:
            continue
        gb = a["params_m"] * 1e6 * 2 / 1e9
        reload = a["reload_vllm_s"] if a["reload_vllm_s"] is not None else a["reload_hf_s"]
        out.append({"lr": a["lr"], "transport": a["transport"], "dtype": a["dtype"],
                    "publish_s_per_gb": round(a["publish_s"] / gb, 3),
                    "reload_s_per_gb": round(reload / gb, 3) if reload is not None else None,
                    "bytes_vs_full_bf16": a["vs_full_bf16"]})
    return out


def extrapolate(rates: list[dict]) -> list[dict]:
    """At the smallest learning rate measured (the LLM-like one: 1e-5 by default)."""
    out = []
    for rate in (r for r in rates if r["lr"] == min(x["lr"] for x in rates)):
        for name, params in EXTRAPOLATE.items():
            gb = params * 2 / 1e9
            written = rate["bytes_vs_full_bf16"] * gb
            out.append({"model": name, "lr": rate["lr"], "transport": rate["transport"], "dtype": rate["dtype"],
                        "gb_per_version": round(written, 2),
                        "publish_s_cpu": round(rate["publish_s_per_gb"] * gb, 2),
                        "reload_s_cpu": round(rate["reload_s_per_gb"] * gb, 2) if rate["reload_s_per_gb"] else None,
                        f"volume_s_at_{VOLUME_GBPS:g}GBps": round(written / VOLUME_GBPS, 2)})
    return out


def md_table(rows: list[dict]) -> list[str]:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    return lines + ["| " + " | ".join("" if v is None else str(v) for v in r.values()) + " |" for r in rows]


def write_csv(path: Path, rows: list[dict]) -> None:
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def plot(agg: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for (transport, dtype), marker in zip(((t, d) for t, d in VARIANTS), "os^D", strict=True):
        for lr, style in zip(sorted({a["lr"] for a in agg}, reverse=True), ("-", "--"), strict=False):
            group = sorted((a for a in agg if (a["transport"], a["dtype"], a["lr"]) == (transport, dtype, lr)),
                           key=lambda a: a["params_m"])
            if not group:
                continue
            x = [a["params_m"] * 1e6 for a in group]
            label = f"{transport} {dtype} lr {lr:g}"
            axes[0].plot(x, [a["bytes_per_version_mb"] * 1e6 for a in group], style, marker=marker, label=label)
            reload = [(a["reload_vllm_s"] if a["reload_vllm_s"] is not None else a["reload_hf_s"]) or 0 for a in group]
            axes[1].plot(x, [a["publish_s"] + r for a, r in zip(group, reload, strict=True)], style, marker=marker,
                         label=label)
    axes[0].set_ylabel("bytes written per version (mean over a cycle)")
    axes[1].set_ylabel("publish + reload seconds per version (2-core CPU)")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("parameters")
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=7)
    fig.suptitle("weight versions by model size (seconds: medians; bytes: means over a cycle)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def findings(agg: list[dict], rows: list[dict]) -> list[str]:
    """The sentences the numbers support, computed (so a re-run cannot leave stale prose behind)."""
    largest = max(a["params_m"] for a in agg)
    at = {(a["params_m"], a["lr"], a["transport"], a["dtype"]): a for a in agg}
    out = []
    for lr in sorted({a["lr"] for a in agg}):
        d = at.get((largest, lr, "delta", "bfloat16"))
        if d:
            verdict = "meets" if d["vs_full_bf16"] <= 1 / 3 else "misses"
            out.append(f"- lr {lr:g}, {largest:g}M parameters: `delta` writes {d['vs_full_bf16']:.2f} of a full bf16 "
                       f"version per version, amortized over a cycle ({d['delta_only_vs_full_bf16']:.2f} per delta; "
                       f"transformer blocks alone {d['blocks_delta_vs_full']:.2f}); the issue's target is <= 1/3 at "
                       f"LLM learning rates, which this {verdict}.")
    paired = [(r["reload_vllm_s"], r["reload_vllm_path_s"]) for r in rows
              if r["params"] == max(x["params"] for x in rows) and "reload_vllm_path_s" in r]
    if paired:
        wins = sum(a < b for a, b in paired)
        out.append(f"- vLLM, rebuilt delta versions at {largest:g}M, each version handed over both ways in turn: "
                   f"the in-process `weights_iterator` took {statistics.median(a for a, _ in paired):.3f} s "
                   f"(median), a worker-local directory reloaded by path {statistics.median(b for _, b in paired):.3f}"
                   f" s; the iterator was faster for {wins} of {len(paired)} versions. The engine uses the iterator "
                   "in-process and the directory only with a separate engine process (where an iterator cannot "
                   "cross the RPC).")
    for lr in sorted({a["lr"] for a in agg}):
        n, f, d = (at.get((largest, lr, t, "bfloat16")) for t in ("nccl", "filesystem", "delta"))
        if n and f and d and n["reload_vllm_s"] is not None:
            out.append(f"- lr {lr:g}, {largest:g}M, vLLM bf16: a transfer round (`nccl` on gloo over loopback: group "
                       f"formation, broadcast, layerwise reload) took {n['reload_vllm_s']} s, against "
                       f"{f['reload_vllm_s']} s reading a `filesystem` version and {d['reload_vllm_s']} s rebuilding a "
                       f"`delta` one from files; its publish ({n['publish_s']} s) is the `delta` fallback's "
                       f"({d['publish_s']} s), which keeps the very tensors the transfer server holds.")
    for a in agg:
        if a["params_m"] == largest and a["lr"] == min(x["lr"] for x in agg):
            reload = a["reload_vllm_s"] if a["reload_vllm_s"] is not None else a["reload_hf_s"]
            out.append(f"- {largest:g}M, lr {a['lr']:g}, `{a['transport']}` {a['dtype']}: publish "
                       f"{a['publish_s']:.3f} s + reload {reload} s = "
                       f"{a['publish_reload_pct_of_step']} % of this machine's {a['step_s']:.1f} s training step "
                       "(the issue's target: <= 5 %).")
    return out


def write_report(out: Path, command: str, rows: list[dict], agg: list[dict], overlap: list[dict],
                 memory: list[dict], steps: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "weights-runs.csv", rows)
    write_csv(out / "weights.csv", agg)
    write_csv(out / "weights-async.csv", overlap)
    write_csv(out / "weights-memory.csv", memory)
    rates = per_gb(agg)
    extra = extrapolate(rates)
    plot(agg, out / "weights.png")
    lines = [
        "# Weight versions: cost by model size and transport", "",
        f"Command: `{command}` ({time.strftime('%Y-%m-%d')}, this repository's 2-core CPU machine, local disk). "
        f"Per-version rows: `weights-runs.csv`; this table: `weights.csv`.", "",
        "## Findings", "", *findings(agg, rows), "",
        "## Every size, learning rate and transport", "",
        f"Each run: {steps} DeepSpeed steps (ZeRO-0, torch AdamW, job-default weight decay and clipping) on "
        f"random token batches of {BATCH}x{SEQ}, every version published through each transport; `delta` writes a "
        f"full version every {FULL_EVERY} (so a run of {FULL_EVERY} versions is one full + {FULL_EVERY - 1} deltas: "
        "the means below are the amortized cost of a cycle).", "",
        *md_table(agg), "",
        "- `vs_full_bf16`: bytes per version / bytes of a full bf16 version of the same model (the issue's target "
        "for `delta` at LLM learning rates: <= 1/3). `delta_only_vs_full_bf16`: the delta versions alone. "
        "`blocks_delta_vs_full`: deltas of the transformer blocks only (embeddings and lm_head left out: with "
        "random batches of 1,024 ids most embedding rows get no gradient, which flatters the whole-model ratio "
        "at large vocabularies).",
        "- `publish_s`: served-dtype cast + encode + write + rename (+ checksums); `reload_hf_s` / `reload_vllm_s`: "
        "a follower's load into the engine (for `delta`: read, rebuild from the cached base, verify checksums, "
        "hand the tensors over; vLLM in-process through `weights_iterator`); `reload_vllm_path_s`: the same "
        "tensors written to a worker-local directory and reloaded by path instead.",
        "- `publish_reload_pct_of_step`: (publish + vLLM reload, HF where vLLM was not run) / this run's training "
        "step. Files come back from the page cache: a shared network volume adds bytes / bandwidth (below).", "",
        "- `snapshot_s`: the owned host copy in the served dtype, all a step waits for with "
        "`weights_async_publish` (the default); `async_pct_of_step`: (snapshot + reload) / step.", "",
        "## Writing versions in the background (`weights_async_publish`)", "",
        "The learner's wall seconds per step, train + publish, over more steps of the same run at the smallest "
        "learning rate: without publishing, with every version written before the next step "
        "(`weights_async_publish: false`), and written by the background thread while the next step trains (the "
        f"default). The five ways interleave: rounds of {ASYNC_BLOCK} steps of each, their order rotating every "
        "round, so the step's own drift over the run falls on all of them; figures are medians over steady steps "
        "(a background step from its block's second: it trains while the version before is written and waits for "
        "that write if it is still running), `*_rounds` the range of the per-round figures. The writer shares "
        "this machine's two cores with training; on a GPU learner the step runs on the GPU and the write on the "
        "host.",
        "", *md_table(overlap), "",
        "## Host memory while versions publish and reload", "",
        f"Peak resident memory above the trained model while {MEMORY_VERSIONS} versions publish through the "
        "learner's background writer, each size and transport in a fresh process, in copies of the model in the "
        "served dtype (bf16): what rank 0's node must have beyond the model and optimizer. The snapshot is one "
        "copy; `delta` also keeps its base and the last version (for repairs) and encodes a window of tensors; "
        "`nccl` over `delta` adds the transfer server's two newest versions, which share their tensors with the "
        "delta publisher's. `rollout worker` rows: another fresh process reads the same versions through the "
        "transport's follower, dropping each once read (an engine copies it into its own weights): the cached "
        "delta base, the version being rebuilt and checked, the bytes read. For a 70B student one copy is 140 GB. "
        "At the example size (0.2 MiB) the figures are the allocator's noise.", "",
        *md_table(memory), "",
        "## Per GB of a bf16 model (largest size measured)", "", *md_table(rates), "",
        "## Extrapolated", "",
        f"Linear in model size from the per-GB rates above at lr {min(a['lr'] for a in agg):g} (CPU seconds of "
        "this 2-core machine, shared with other work while it ran: a GPU host's 32+ cores run the delta codec on "
        "up to 8 threads and cast and checksum faster; the bytes stay), plus the shared-volume time at an assumed "
        f"{VOLUME_GBPS:g} GB/s per client for the bytes each version writes (and each rollout worker reads).", "",
        *md_table(extra), "",
        "## Peers (their docs and issues, read 2026-11)", "",
        "| system | path | model | time per sync | hardware |", "|---|---|---|---|---|",
        *[f"| {a} | {b} | {c} | {d} | {e} |" for a, b, c, d, e in PEERS], "",
        "These are GPU-to-GPU (NCCL) transfers; the filesystem and delta transports here are the shared-volume "
        "path that a late joiner and a fallback always need. The `nccl` transport is the one to compare with "
        "them, on GPUs: here it ran over gloo on loopback TCP (learner and follower threads of one process), "
        "so its reload seconds (and "
        "their extrapolation) are this CPU's, not NCCL's; a round also has a fixed cost of ~0.12 s here (a 50 ms "
        "gather window, the Redis handshake, ~30 ms to join, receive into and leave the group at the example "
        "size).", "",
        "![cost curve](weights.png)", "",
    ]
    (out / "weights.md").write_text("\n".join(lines))
    print("\n".join(lines))


def suite_weights(out: Path, sizes: list[str], steps: int, lrs: list[float], engine_kinds: list[str], smoke: bool,
                  command: str) -> list[dict]:
    from asyncopd.ml.tinymodels import build_sizes
    from asyncopd.ml.weights.transports.nccl import TransferServer
    from asyncopd.tools.scratch_redis import scratch_redis

    if smoke:
        sizes, steps, lrs, engine_kinds = ["example"], 3, lrs[:1], ["hf", "vllm"]
    models = build_sizes(Path(".cache/models"), sizes)
    Path(".cache").mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-weights-", dir=".cache"))  # runs at once must not share it
    rows = []
    with scratch_redis() as (r, _):
        server = TransferServer(r, TRANSFER_JOB, device="cpu", host="127.0.0.1", port=0, timeout_s=120)
        # Every training run before any vLLM engine: DeepSpeed's initialize fails once vLLM has set up its groups.
        by_size, overlap = {}, []
        for size in sizes:
            by_size[size], size_overlap = train_and_publish(size, models[size], lrs, steps, work, server)
            overlap += size_overlap
        memory = host_memory({size: models[size] for size in sizes}, work, r.connection_pool.connection_kwargs["port"],
                             FULL_EVERY)
        for size in sizes:
            engines = build_engines(models[size], engine_kinds)
            try:
                follow_all(by_size[size], engines, server)
            finally:
                for engine in engines.values():
                    engine.close()
            for row in by_size[size]:
                row.pop("location")
            for directory in work.glob(f"{size}-*"):
                shutil.rmtree(directory, ignore_errors=True)
            rows += by_size[size]
            print(json.dumps(aggregate(by_size[size]), indent=1), flush=True)
        server.close()
    shutil.rmtree(work, ignore_errors=True)
    agg = aggregate(rows)
    write_report(out, command, rows, agg, overlap, memory, steps)
    return agg
