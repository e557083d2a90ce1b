"""Peak memory and time of one loss + backward, chunked vs unchunked, in two settings (--path):

    .venv/bin/python benchmarks/loss_chunking.py [--seq 2048 --vocab 32000 --hidden 256 --chunks 0,256,1024]
    .venv/bin/python benchmarks/loss_chunking.py --path trainer [--layers 2 ...]

`--path head` (default): the loss head alone on given hidden states [seq, hidden] and lm_head weight.
`--path trainer`: what the learner runs per step: the DeepSpeed engine (ZeRO-0, the learner's config) around
`services.learner.student_loss.StudentLoss` on a random Llama student (vocab x hidden, `--layers` decoder layers),
one sample of `--seq` tokens (16 prompt + the rest completion, built by the learner's own `token_batch`),
engine forward + engine.backward; the optimizer step is not timed.

Chunk 0 is the plain path (full logits, autograd through all of it; in trainer mode the learner's
full-logits fallback). Each variant runs in a fresh subprocess so high-water marks do not leak between them.
Memory is the rise of the peak over what the inputs (and, in trainer mode, the model and its gradient buffers,
after one short warm-up step) already held: torch.cuda.max_memory_allocated on a GPU, else the process's
maximum resident set size (getrusage), which sees every allocator.
Prints a markdown table; docs/objectives.md quotes it.
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


def _measure(args: argparse.Namespace, device: str, step) -> dict[str, object]:
    """Peak memory above what is allocated now, and time, of `args.repeats` calls of `step`."""
    import torch

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


def run_variant(args: argparse.Namespace) -> dict[str, object]:
    if args.path == "trainer":
        return run_trainer_variant(args)
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
    return _measure(args, device, step)


def run_trainer_variant(args: argparse.Namespace) -> dict[str, object]:
    import random

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from asyncopd.objective_spec import parse_objective
    from asyncopd.streams import ScoredEntry
    from services.learner.collate import token_batch
    from services.learner.distributed import init_distributed
    from services.learner.objectives import build_objective
    from services.learner.settings import LearnerSettings
    from services.learner.student_loss import StudentLoss

    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    settings = LearnerSettings(device=device)
    init_distributed(settings)
    import deepspeed

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=max(args.hidden // 64, 1),
                         num_key_value_heads=1, max_position_embeddings=args.seq + 16, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    net = StudentLoss(model, args.variant or None, zero_stage=0)
    engine, *_ = deepspeed.initialize(
        model=net, optimizer=torch.optim.AdamW(net.parameters(), lr=1e-5),
        config={"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
                "zero_optimization": {"stage": 0}, "steps_per_print": 10**9},
    )
    rng = random.Random(0)

    def sample(length: int) -> ScoredEntry:
        prompt, completion = 16, length - 16 + 1  # inputs = prompt + completion[:-1] = length tokens
        ids = [rng.sample(range(args.vocab), args.topk) for _ in range(completion)]
        lps = [sorted((-rng.uniform(0.1, 6.0) for _ in range(args.topk)), reverse=True) for _ in ids]
        return ScoredEntry(job_id="bench", batch=0, sample_id="s", policy_version=0, top_k=args.topk,
                           prompt_token_ids=[rng.randrange(args.vocab) for _ in range(prompt)],
                           completion_token_ids=[row[0] for row in ids], behavior_logprobs=[lp[0] for lp in lps],
                           teacher_sampled_logprobs=[lp[0] for lp in lps],
                           support_ids=[i for row in ids for i in row],
                           teacher_support_logprobs=[v for row in lps for v in row])

    objective = build_objective(parse_objective({"kind": args.objective}))

    def step(entry: ScoredEntry) -> None:
        inputs, batch = token_batch([entry], torch.device(device))
        loss, _ = engine(**inputs, batch=batch, objective=objective,
                         bind=lambda o, lp: o.bind(lp, batch) if o.batch_level else o)
        engine.backward(loss / batch.num_tokens)
        if device == "cuda":
            torch.cuda.synchronize()

    step(sample(24))  # library start-up allocations and the gradient buffers are not the loss's memory
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    entry = sample(args.seq)
    return _measure(args, device, lambda: step(entry))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--path", choices=("head", "trainer"), default="head",
                        help="head: the loss head on given hidden states; trainer: the learner's engine step")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers of the trainer-mode student")
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
        print("RESULT " + json.dumps(run_variant(args)))  # DeepSpeed also prints to stdout
        return

    shape = f"{args.path} path: seq {args.seq} x vocab {args.vocab} x hidden {args.hidden}, top-K {args.topk}, " \
        f"{args.objective}"
    if args.path == "trainer":
        shape += f", {args.layers}-layer Llama through DeepSpeed ZeRO-0"
    print(f"{shape}; torch fp32; {platform.processor() or platform.machine()}")
    print("| variant | device | peak memory over inputs (MiB) | first run (s) | median of the rest (s) |")
    print("| --- | --- | --- | --- | --- |")
    for chunk in (int(c) for c in args.chunks.split(",")):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--variant", str(chunk)]
        # glibc would otherwise keep freed multi-MiB buffers on its heap, so RSS would measure the allocator
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
        if done.returncode:
            sys.exit(f"variant {chunk} failed:\n{done.stderr[-3000:]}")
        result = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
        name = "unchunked" if chunk == 0 else f"chunked, {chunk} positions"
        print(
            f"| {name} | {result['device']} | {result['peak_mib']:.0f} | {result['first_s']:.2f} "
            f"| {result['median_s']:.2f} |"
        )


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
