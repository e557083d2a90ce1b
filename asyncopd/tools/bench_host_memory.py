"""Part of `asyncopd bench --suite weights`: rank 0's host memory while the learner publishes versions.

Each copy of a version is the whole model in the served dtype on the learner's host: 140 GB for a 70B student
in bf16, so how many a transport holds at once decides whether rank 0 fits its node at all. Per transport, a
fresh process (so its peak is its own) loads the model, makes it resident as a trained model is, resets the
kernel's peak-RSS mark (`/proc/self/clear_refs`, Linux), publishes versions through the learner's
`BackgroundPublisher` (the default `weights_async_publish`), and reports the peak resident memory above the
model, in served copies. The updates are in place (`mul_`), as an optimizer step's are, so every byte
counted is the publishing path's: the snapshot, what the transport keeps (a delta base and the last version
for repairs, the transfer server's two newest versions) and its encoding buffers.

A rollout worker's side, for the file transports: another fresh process reads those versions in order through
the transport's follower, dropping each version's tensors once it has them (an engine copies them into its own
weights, on the GPU there), so its peak is the transport's part: the cached delta base, the version being
rebuilt and checked, the bytes read. (`nccl` receives straight into the engine's weights, buffer by buffer.)
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

TRANSPORTS = ("filesystem", "delta", "nccl")
FOLLOWED = ("filesystem", "delta")  # read back by a follower process (nccl receives into the engine)
VERSIONS = 4  # one full + three deltas: a delta base, the last version and a new snapshot at once


def _reset_peak() -> int:
    """Restart the kernel's peak-RSS mark from the current RSS; that RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError as exc:
        raise RuntimeError(f"cannot reset the peak-RSS mark (/proc/self/clear_refs): {exc}") from exc
    return _proc_status("VmRSS")


def _proc_status(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def publish_peak(model_dir: str, transport: str, dtype: str, root: str, redis_port: int, full_every: int) -> dict:
    """Runs in its own process: the peak bytes above the resident model while `VERSIONS` versions publish."""
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
        import redis

        from asyncopd.ml.weights.transports.nccl import TransferServer

        server = TransferServer(redis.Redis(port=redis_port), "bench-host-memory", device="cpu", host="127.0.0.1",
                                port=0, timeout_s=60)
    writer = BackgroundPublisher(setup_publisher(transport, Path(root), dtype=dtype, full_every=full_every,
                                                 fallback="delta", server=server))
    copy_bytes = sum(t.numel() for t in served(model.state_dict(), None).values()) * DTYPES[dtype].itemsize
    config = model.config.to_json_string()
    base = _reset_peak()
    with torch.no_grad():
        for version in range(1, VERSIONS + 1):
            for p in model.parameters():
                p.mul_(1.0 + 1e-3 * version)
            writer.submit(version, model.state_dict(), config, lambda version, location: None)
        writer.flush()
    peak = _proc_status("VmHWM") - base
    writer.close()
    return _row("learner (rank 0)", transport, dtype, copy_bytes, peak)


def follow_peak(root: str, transport: str, dtype: str) -> dict:
    """Runs in its own process: the peak bytes while a follower reads the `VERSIONS` versions under `root`."""
    from asyncopd.ml.weights.layout import version_dir
    from asyncopd.ml.weights.transports import setup_follower

    follower = setup_follower(transport)
    base = _reset_peak()
    for version in range(1, VERSIONS + 1):
        tensors = follower.tensors(str(version_dir(Path(root), version)))
        copy_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
    return _row("rollout worker", transport, dtype, copy_bytes, _proc_status("VmHWM") - base)


def _row(side: str, transport: str, dtype: str, copy_bytes: int, peak: int) -> dict:
    return {"side": side, "transport": transport, "dtype": dtype, "versions": VERSIONS,
            "served_copy_mib": round(copy_bytes / 2**20, 2), "peak_above_model_mib": round(peak / 2**20, 2),
            "peak_served_copies": round(peak / copy_bytes, 2)}


def host_memory(models: dict[str, Path], work: Path, redis_port: int, full_every: int) -> list[dict]:
    """Rows per size and transport (bf16, the served dtype users run): the learner's, then for the file
    transports a rollout worker's."""
    rows = []
    for size, model_dir in models.items():
        for transport in TRANSPORTS:
            root = str(work / f"host-memory-{size}-{transport}")
            learner = _fresh_process(publish_peak, str(model_dir), transport, "bfloat16", root, redis_port, full_every)
            rows.append({"size": size, **learner})
            if transport in FOLLOWED:
                rows.append({"size": size, **_fresh_process(follow_peak, root, transport, "bfloat16")})
    return rows


def _fresh_process(fn, *args) -> dict:
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        row = pool.submit(fn, *args).result()
    print(row, flush=True)
    return row
