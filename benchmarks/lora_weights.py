"""What one weight version costs, full student vs LoRA adapter, by model size:

    .venv/bin/python benchmarks/lora_weights.py [--sizes example 25m] [--ranks 8 16] [--steps 8]
        [--engines hf vllm] [--csv docs/results/lora-weights.csv]

Per size (`asyncopd models --sizes`, random-init Llama-style models) a real short training run per variant —
DeepSpeed ZeRO-0, torch AdamW, random token batches (`asyncopd.tools.bench_weights`) — publishes every version
the way the learner does: the full student through `filesystem` fp32 (the default) and `delta` bf16 (the
cheapest full transport), the LoRA student (`all-linear`, each rank) through the `adapter` transport in fp32 and
bf16. Timed per version: publish (state extraction + write + rename, what `Trainer.publish` does on rank 0) and,
for the fp32 variants, the reload into an HF and a vLLM engine as a rollout worker follows every version (full:
`load_weights` from the path; LoRA: `load_adapter` over base weights loaded once, vLLM with `enable_lora`).
Also the price of serving through an adapter: vLLM generation of the same batch by the full student and through
each rank's adapter (unmerged LoRA adds work to every targeted linear layer).

Bytes are exact; seconds are this machine's (medians over the versions). Prints a markdown table and writes
the rows as CSV. A benchmark, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from asyncopd.tools.bench_weights import TrainingRun  # noqa: E402

LR = 1e-3
GEN_PROMPTS, GEN_N, GEN_TOKENS = 16, 4, 32


class LoraRun(TrainingRun):
    """The learner's LoRA training in miniature: the PEFT-wrapped student, AdamW over the adapter alone."""

    def __init__(self, model_dir: Path, rank: int, seed: int = 0) -> None:
        self.rank = rank
        super().__init__(model_dir, LR, seed)

    def wrap(self, model, model_dir: Path):
        from asyncopd.jobspec import Lora
        from asyncopd.ml import lora

        return lora.wrap(model, Lora(rank=self.rank, alpha=2 * self.rank), str(model_dir))

    def describe(self) -> str:
        from asyncopd.ml import lora

        return lora.adapter_config_json(self.model)

    def state(self) -> dict:
        from asyncopd.ml.lora import adapter_state

        return adapter_state(self.model)


def publish_versions(size: str, model_dir: Path, ranks: list[int], steps: int, work: Path) -> list[dict]:
    """Every variant's versions on disk, one row per version (with its location, for the reloads)."""
    import gc

    from asyncopd.ml.weights.transports import ADAPTER, setup_publisher

    rows = []
    runs = [("full", None, lambda: TrainingRun(model_dir, LR))] + [(f"lora-r{r}", r, lambda r=r: LoraRun(model_dir, r))
                                                                   for r in ranks]
    for variant, rank, make in runs:
        run = make()
        params = sum(p.numel() for p in run.model.parameters())
        if rank is None:
            transports = [("filesystem", "float32"), ("delta", "bfloat16")]
            trainable, state_of = params, run.model.state_dict
        else:
            transports = [(ADAPTER, "float32"), (ADAPTER, "bfloat16")]
            trainable, state_of = run.trainable, run.state
            params -= trainable  # the student's own parameters, as in the full row
        publishers = {(t, d): setup_publisher(t, work / f"{size}-{variant}-{t}-{d}", dtype=d) for t, d in transports}
        for version in range(1, steps + 1):
            step_s = run.step()
            for (transport, dtype), publisher in publishers.items():
                t0 = time.perf_counter()
                location = publisher.publish(version, state_of(), run.config_json)
                rows.append({"size": size, "variant": variant, "rank": rank, "transport": transport, "dtype": dtype,
                             "params": params, "trained_params": trainable, "version": version,
                             "step_s": step_s, "publish_s": time.perf_counter() - t0,
                             "bytes": publisher.last_bytes(), "location": location})
        del run, publishers
        gc.collect()
    return rows


def follow(rows: list[dict], model_dir: Path, engines: list[str]) -> dict:
    """Reload seconds per fp32 version into each engine (added to the rows; one engine per variant, as one job
    has one adapter shape), and vLLM's generation seconds for one batch with the base alone and through the
    last adapter of each rank."""
    from asyncopd.ml.engines import build_engine
    from asyncopd.ml.weights.transports import setup_follower

    for k, v in (("VLLM_HOST_IP", "127.0.0.1"), ("VLLM_NO_USAGE_STATS", "1"), ("VLLM_ENABLE_V1_MULTIPROCESSING", "0")):
        os.environ.setdefault(k, v)
    gen = {}
    prompts = [[1, *range(10 + i, 20 + i)] for i in range(GEN_PROMPTS)]
    for kind in engines:
        for variant in dict.fromkeys(r["variant"] for r in rows):
            group = [r for r in rows if r["variant"] == variant and r["dtype"] == "float32"]
            engine = build_engine(kind, str(model_dir), device="cpu", dtype="float32", seed=0, max_model_len=256,
                                  kv_cache_bytes=64 << 20, gpu_memory_utilization=0.5, lora_rank=group[0]["rank"])
            follower = setup_follower(group[0]["transport"])
            for row in group:
                t0 = time.perf_counter()
                follower.load(row["location"], row["version"], engine)
                row[f"reload_{kind}_s"] = time.perf_counter() - t0
            if kind == "vllm":
                times = []
                for seed in range(3):
                    t0 = time.perf_counter()
                    engine.generate(prompts, n=GEN_N, max_tokens=GEN_TOKENS, temperature=1.0,
                                    seeds=[seed * 100 + i for i in range(GEN_PROMPTS)])
                    times.append(time.perf_counter() - t0)
                gen[variant] = statistics.median(times)
            engine.close()
    return gen


def aggregate(rows: list[dict], engines: list[str]) -> list[dict]:
    out = []
    for key in dict.fromkeys((r["size"], r["variant"], r["transport"], r["dtype"]) for r in rows):
        group = [r for r in rows if (r["size"], r["variant"], r["transport"], r["dtype"]) == key]
        full = next(r for r in rows if r["size"] == key[0] and r["variant"] == "full" and r["dtype"] == "float32")
        row = {"size": key[0], "variant": key[1], "transport": key[2], "dtype": key[3],
               "params_m": round(group[0]["params"] / 1e6, 3),
               "trained_params_m": round(group[0]["trained_params"] / 1e6, 3),
               "versions": len(group), "bytes_per_version": round(statistics.mean(r["bytes"] for r in group)),
               "vs_full_fp32": round(statistics.mean(r["bytes"] for r in group) / full["bytes"], 4),
               "train_step_s": round(statistics.median(r["step_s"] for r in group), 4),
               "publish_s": round(statistics.median(r["publish_s"] for r in group), 5)}
        for kind in engines:
            values = [r[f"reload_{kind}_s"] for r in group if f"reload_{kind}_s" in r]
            row[f"reload_{kind}_s"] = round(statistics.median(values), 5) if values else None
        out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["example", "25m"])
    ap.add_argument("--ranks", nargs="+", type=int, default=[8, 16])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--engines", nargs="+", default=["hf", "vllm"])
    ap.add_argument("--csv", type=Path, default=None)
    args = ap.parse_args()

    import torch

    from asyncopd.ml.tinymodels import build_sizes

    torch.set_num_threads(1)
    models = build_sizes(REPO / ".cache" / "models", args.sizes)
    table, gens = [], []
    with tempfile.TemporaryDirectory(prefix="lora-weights-") as work:
        # Every size trains and publishes before any engine starts: closing an in-process vLLM engine tears down
        # torch.distributed, which DeepSpeed's next initialize would need.
        rows = {size: publish_versions(size, models[size], args.ranks, args.steps, Path(work)) for size in args.sizes}
        for size in args.sizes:
            gen = follow(rows[size], models[size], args.engines)
            table += aggregate(rows[size], args.engines)
            gens += [{"size": size, "variant": variant, "vllm_generate_s": round(seconds, 4),
                      "vs_full": round(seconds / gen["full"], 2)} for variant, seconds in gen.items()]
    for rows in (table, gens):
        if rows:
            print("| " + " | ".join(rows[0]) + " |")
            print("|" + "---|" * len(rows[0]))
            for r in rows:
                print("| " + " | ".join("" if v is None else str(v) for v in r.values()) + " |")
            print()
    if args.csv:
        with open(args.csv, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(table[0]))
            writer.writeheader()
            writer.writerows(table)
    if gens:
        print(f"vLLM generation: {GEN_PROMPTS} prompts x {GEN_N} samples x up to {GEN_TOKENS} tokens, median of 3")


if __name__ == "__main__":
    main()
