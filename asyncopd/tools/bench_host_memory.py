"""Part of `asyncopd bench --suite weights`: rank 0's host memory while the learner publishes versions.

Each copy of a version is the whole model in the served dtype on the learner's host: 140 GB for a 70B student
in bf16, so how many a transport holds at once decides whether rank 0 fits its node at all. Per transport, a
fresh process (so its peak is its own) loads the model, makes it resident as a trained model is, resets the
kernel's peak-RSS mark (`/proc/self/clear_refs`, Linux), publishes versions through the learner's
`BackgroundPublisher` (the default `weights_async_publish`), and reports the peak resident memory above the
model, in served copies. The updates are in place (`mul_`), as an optimizer step's are, so every byte
counted is the publishing path's: the snapshot, what the transport keeps (a delta base and the last version
for repairs, the transfer server's two newest versions) and its encoding buffers.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

TRANSPORTS = ("filesystem", "delta", "nccl")
VERSIONS = 4  # one full + three deltas: a delta base, the last version and a new snapshot at once


def _proc_status(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def publish_peak(model_dir: str, transport: str, dtype: str, root: str, redis_port: int, full_every: int) -> dict:
    """Runs in its own process: the peak bytes above the resident model while `VERSIONS` versions publish."""
    import redis
    import torch
    from transformers import AutoModelForCausalLM

    from asyncopd.ml.dtypes import DTYPES
    from asyncopd.ml.weights.background import BackgroundPublisher
    from asyncopd.ml.weights.codec import served
    from asyncopd.ml.weights.transports import setup_publisher

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.0)  # resident: from_pretrained maps the file lazily, a trained model's pages are all in
    server = None
    if transport == "nccl":
        from asyncopd.ml.weights.transports.nccl import TransferServer

        server = TransferServer(redis.Redis(port=redis_port), "bench-host-memory", device="cpu", host="127.0.0.1",
                                port=0, timeout_s=60)
    writer = BackgroundPublisher(setup_publisher(transport, Path(root), dtype=dtype, full_every=full_every,
                                                 fallback="delta", server=server))
    copy_bytes = sum(t.numel() for t in served(model.state_dict(), None).values()) * DTYPES[dtype].itemsize
    config = model.config.to_json_string()
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # the peak-RSS mark restarts from the current RSS
    except OSError as exc:
        raise RuntimeError(f"cannot reset the peak-RSS mark (/proc/self/clear_refs): {exc}") from exc
    base = _proc_status("VmRSS")
    with torch.no_grad():
        for version in range(1, VERSIONS + 1):
            for p in model.parameters():
                p.mul_(1.0 + 1e-3 * version)
            writer.submit(version, model.state_dict(), config, lambda version, location: None)
        writer.flush()
    peak = _proc_status("VmHWM") - base
    writer.close()
    return {"transport": transport, "dtype": dtype, "versions": VERSIONS,
            "served_copy_mib": round(copy_bytes / 2**20, 2), "peak_above_model_mib": round(peak / 2**20, 2),
            "peak_served_copies": round(peak / copy_bytes, 2)}


def host_memory(models: dict[str, Path], work: Path, redis_port: int, full_every: int) -> list[dict]:
    """One row per size and transport (bf16, the served dtype users run)."""
    rows = []
    for size, model_dir in models.items():
        for transport in TRANSPORTS:
            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                row = pool.submit(publish_peak, str(model_dir), transport, "bfloat16",
                                  str(work / f"host-memory-{size}-{transport}"), redis_port, full_every).result()
            rows.append({"size": size, **row})
            print(rows[-1], flush=True)
    return rows
