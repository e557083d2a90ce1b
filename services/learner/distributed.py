"""Process-group setup for the learner's ranks (torchrun's, or a group of one)."""

from __future__ import annotations

import os

import torch.distributed as dist

from services.learner.settings import LearnerSettings


def init_distributed(settings: LearnerSettings) -> None:
    """Join torchrun's group, or make a group of one; gloo on CPU without DeepSpeed's JIT-built shm op, NCCL on
    this rank's GPU (LOCAL_RANK) otherwise."""
    if settings.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before the import, or DeepSpeed detects and warns
    import deepspeed

    if settings.device == "cpu":
        # Built at every CPU start otherwise (~97 s on 2 cores); plain gloo gives the same numbers.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if "RANK" not in os.environ:
        from asyncopd.ports import free_port

        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    if settings.device == "cuda":
        import torch

        # Before any collective: object collectives (the first is RankDriver's broadcast of a job's start, before
        # DeepSpeed sets the device) and barriers run on the current device, GPU 0 in every process until set,
        # so the ranks of a multi-GPU pod would all use GPU 0.
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo" if settings.device == "cpu" else "nccl")
