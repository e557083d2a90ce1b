"""Transports behind one interface (`base.WeightPublisher` / `base.WeightFollower`), picked by the typed
`weights_transport` setting the learner and the rollout workers both carry: `filesystem`, `delta`, or `nccl`
(a transfer from the learner, with `filesystem` or `delta` beneath it as the fallback)."""

from __future__ import annotations

from pathlib import Path

from asyncopd.ml.weights.transports.base import WeightFollower, WeightPublisher

TRANSPORTS = ("filesystem", "delta", "nccl")
# The transports that need nothing but a shared volume (nccl needs vLLM on both sides, and one beneath it).
FILE_TRANSPORTS = ("filesystem", "delta")
# Not a setting: a job with `student.lora` publishes and follows adapter versions whatever the setting says.
ADAPTER = "adapter"


def setup_publisher(transport: str, root: Path, *, dtype: str = "float32", full_every: int = 8, redis=None,
                    job_id: str | None = None, job_done=None, fallback: str = "delta",
                    server=None) -> WeightPublisher:
    """The learner's publisher. With `redis` and `job_id`, a delta publisher answers followers' repair
    requests until `job_done()` (or `close()`). `nccl`: `fallback` publishes every version, then `server` (a
    `nccl.TransferServer`) offers it to the followers."""
    from asyncopd.ml.dtypes import DTYPES

    if transport == "nccl":
        from asyncopd.ml.weights.transports.nccl import NcclPublisher

        if server is None:
            raise ValueError("the nccl transport publishes through a transfer server (server=TransferServer(...))")

        inner = setup_publisher(fallback, root, dtype=dtype, full_every=full_every, redis=redis, job_id=job_id,
                                job_done=job_done)
        return NcclPublisher(inner, server, DTYPES[dtype])

    if transport == "filesystem":
        from asyncopd.ml.weights.transports.filesystem import FilesystemPublisher

        return FilesystemPublisher(root, DTYPES[dtype])
    if transport == "delta":
        from asyncopd.ml.weights.repair import RepairResponder
        from asyncopd.ml.weights.transports.delta import DeltaPublisher

        publisher = DeltaPublisher(root, DTYPES[dtype], full_every)
        if redis is not None and job_id is not None:
            publisher.responder = RepairResponder(redis, job_id, publisher.write_full_copy,
                                                  job_done or (lambda: False))
        return publisher
    if transport == ADAPTER:
        from asyncopd.ml.weights.transports.adapter import AdapterPublisher

        return AdapterPublisher(root, DTYPES[dtype])
    raise ValueError(f"unknown weights transport {transport!r}; one of {TRANSPORTS}")


def setup_follower(transport: str, *, redis=None, job_id: str | None = None, fallback: str = "delta",
                   join_s: float = 5.0, timeout_s: float = 60.0, stopped=lambda: False) -> WeightFollower:
    """`nccl`: receives by transfer (`join_s`, `timeout_s`; `stopped()` ends a wait early) what it can, the rest
    through `fallback`."""
    if transport == "nccl":
        from asyncopd.ml.weights.transports.nccl import NcclFollower

        return NcclFollower(setup_follower(fallback, redis=redis, job_id=job_id), redis, job_id, join_s=join_s,
                            timeout_s=timeout_s, stopped=stopped)
    if transport == "filesystem":
        from asyncopd.ml.weights.transports.filesystem import FilesystemFollower

        return FilesystemFollower()
    if transport == "delta":
        from asyncopd.ml.weights.transports.delta import DeltaFollower

        return DeltaFollower(redis, job_id)
    if transport == ADAPTER:
        from asyncopd.ml.weights.transports.adapter import AdapterFollower

        return AdapterFollower()
    raise ValueError(f"unknown weights transport {transport!r}; one of {TRANSPORTS}")


__all__ = ["ADAPTER", "FILE_TRANSPORTS", "TRANSPORTS", "WeightFollower", "WeightPublisher", "setup_follower",
           "setup_publisher"]
