"""The data plane at realistic lengths: bytes, encode/decode and Redis time of scored samples by top-K and
completion length, and the Redis memory a step's worth of them holds.

    .venv/bin/python benchmarks/dataplane.py [--samples 64] [--k 8 32 64] [--lengths 256 1024 2048]
                                             [--dtypes float32 float16]

A scored sample carries per completion token its id, behaviour and teacher log-probs and K (id, log-prob)
pairs of the teacher's cache. For each (K, L): the entry's size on the wire (Redis stream fields), the
encode (`to_fields`) and decode (`from_fields`) time per sample, the XADD time of one step (`--samples`
entries in one transaction, as the teacher writes them) plus XRANGE + XDEL (as the learner reads and acks),
and Redis `used_memory` with that step in the stream; `--dtypes`: how the teacher's top-K log-probs travel
(scoring.logprobs_dtype). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asyncopd.streams import ScoredEntry  # noqa: E402
from asyncopd.tools.scratch_redis import scratch_redis  # noqa: E402


def entry(k: int, length: int, rnd: random.Random, dtype: str) -> ScoredEntry:
    lp = [-rnd.random() * 5 for _ in range(length)]
    return ScoredEntry(job_id="j", batch=0, sample_id=f"b0-p{rnd.randrange(10**6)}-s0",
                       prompt_token_ids=[rnd.randrange(150_000) for _ in range(128)],
                       completion_token_ids=[rnd.randrange(150_000) for _ in range(length)], behavior_logprobs=lp,
                       policy_version=0, top_k=k, teacher_sampled_logprobs=lp,
                       support_ids=[rnd.randrange(150_000) for _ in range(length * k)],
                       teacher_support_logprobs=[-rnd.random() * 5 for _ in range(length * k)],
                       support_logprobs_dtype=dtype)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--k", type=int, nargs="+", default=[8, 32, 64])
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 2048])
    ap.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "float16"])
    args = ap.parse_args()
    rnd = random.Random(0)
    with scratch_redis() as (r, data):
        print(f"| K | completion tokens | log-probs | bytes/sample | bytes/token | encode ms/sample | "
              f"decode ms/sample | XADD {args.samples} (ms) | read + ack (ms) | Redis MiB for the step |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for k, length, dtype in ((k, n, d) for k in args.k for n in args.lengths for d in args.dtypes):
            entries = [entry(k, length, rnd, dtype) for _ in range(args.samples)]
            t0 = time.perf_counter()
            fields = [e.to_fields() for e in entries]
            encode = (time.perf_counter() - t0) / len(entries)
            size = sum(len(f["body"]) + len(f["schema"]) for f in fields) / len(fields)
            r.flushall()
            base = r.info("memory")["used_memory"]
            t0 = time.perf_counter()
            pipe = r.pipeline(transaction=True)
            for f in fields:
                pipe.xadd("s", f)
            ids = pipe.execute()
            xadd = time.perf_counter() - t0
            memory = (r.info("memory")["used_memory"] - base) / 2**20
            t0 = time.perf_counter()
            got = r.xrange("s")
            r.xdel("s", *ids)
            read_ack = time.perf_counter() - t0
            raw = [{key.decode(): value.decode() for key, value in f.items()} for _, f in got]
            t0 = time.perf_counter()
            for f in raw:
                ScoredEntry.from_fields(f)
            decode = (time.perf_counter() - t0) / len(raw)
            print(f"| {k} | {length} | {dtype} | {size:,.0f} | {size / length:,.0f} | {encode * 1000:.2f} | "
                  f"{decode * 1000:.2f} | {xadd * 1000:.0f} | {read_ack * 1000:.0f} | {memory:.1f} |", flush=True)


if __name__ == "__main__":
    main()
