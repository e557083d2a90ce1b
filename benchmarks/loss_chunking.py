"""Peak memory and time of one loss + backward through the lm_head, chunked vs unchunked.

    .venv/bin/python benchmarks/loss_chunking.py [--seq 2048 --vocab 32000 --hidden 256 --chunks 0,256,1024]

Chunk 0 is the plain path (full [seq, vocab] logits, autograd through all of it). Each variant runs in a
fresh subprocess so high-water marks do not leak between them. Memory is the rise of the peak over what
the inputs already held: torch.cuda.max_memory_allocated on a GPU, else the process's maximum resident
set size (getrusage), which sees every allocator. Prints a markdown table; docs/objectives.md quotes it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _peak_bytes(device: str) -> int:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def run_variant(args: argparse.Namespace) -> dict[str, object]:
    import torch

    from asyncopd.objective_spec import parse_objective
    from services.learner.objectives import TokenBatch, build_objective, chunked_student_logprobs_loss

    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=device).manual_seed(0)
    n, v, h, k = args.seq, args.vocab, args.hidden, args.topk
    hidden = (torch.randn(n, h, generator=gen, device=device) / h**0.5).requires_grad_(True)
    weight = torch.randn(v, h, generator=gen, device=device).requires_grad_(True)
    # distinct top-K ids per row without an [n, v] temporary (it would raise the baseline high-water)
    offsets = torch.randint(v, (n, 1), generator=gen, device=device)
    topk_ids = (torch.randperm(v, generator=gen, device=device)[:k][None, :] + offsets) % v
    topk_logprobs = torch.randn(n, k + 1, generator=gen, device=device).log_softmax(-1)[:, :k]
    sampled = topk_ids[:, 0].clone()
    batch = TokenBatch(sampled, topk_logprobs[:, 0], topk_logprobs[:, 0], topk_ids, topk_logprobs)
    objective = build_objective(parse_objective({"kind": args.objective}))

    def step() -> None:
        hidden.grad, weight.grad = None, None
        if args.variant == 0:
            logprobs = (hidden @ weight.T).float().log_softmax(-1)
            loss = objective(logprobs, batch).loss.sum()
        else:
            loss, _ = chunked_student_logprobs_loss(hidden, weight, batch, objective, chunk_size=args.variant)
        loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()

    warmup = TokenBatch(
        *(t[:8] for t in (sampled, topk_logprobs[:, 0], topk_logprobs[:, 0], topk_ids, topk_logprobs))
    )
    # one tiny step first: library start-up allocations are not the loss's memory
    chunked_student_logprobs_loss(hidden[:8], weight, warmup, objective, chunk_size=4)[0].backward()
    (hidden[:8] @ weight.T).log_softmax(-1).sum().backward()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    baseline = _peak_bytes(device)
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {
        "chunk": args.variant,
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({args.threads} thread)",
        "peak_mib": (_peak_bytes(device) - baseline) / 2**20,
        "first_s": times[0],
        "median_s": statistics.median(times[1:] or times),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--topk", type=int, default=32)
    parser.add_argument("--objective", default="forward_kl_topk")
    parser.add_argument("--chunks", default="0,256,1024", help="comma-separated chunk sizes; 0 = unchunked")
    parser.add_argument(
        "--repeats", type=int, default=4, help="runs per variant; time is the median after the first"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variant", type=int, help=argparse.SUPPRESS)  # set in the per-variant subprocess
    args = parser.parse_args()
    if args.variant is not None:
        print(json.dumps(run_variant(args)))
        return

    shape = f"seq {args.seq} x vocab {args.vocab} x hidden {args.hidden}, top-K {args.topk}, {args.objective}"
    print(f"{shape}; torch fp32; {platform.processor() or platform.machine()}")
    print("| variant | device | peak memory over inputs (MiB) | first run (s) | median of the rest (s) |")
    print("| --- | --- | --- | --- | --- |")
    for chunk in (int(c) for c in args.chunks.split(",")):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--variant", str(chunk)]
        # glibc would otherwise keep freed multi-MiB buffers on its heap, so RSS would measure the allocator
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
        done = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO, env=env)
        result = json.loads(done.stdout)
        name = "unchunked" if chunk == 0 else f"chunked, {chunk} positions"
        print(
            f"| {name} | {result['device']} | {result['peak_mib']:.0f} | {result['first_s']:.2f} "
            f"| {result['median_s']:.2f} |"
        )


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
