"""`init_distributed` on a GPU node: every rank makes its own GPU current before the group forms, since object
collectives (the learner's first is rank 0's broadcast of a job's start) and barriers run on the current device.
No GPU runs here, so the two calls are recorded instead of made: `torch.cuda.set_device` and DeepSpeed's group
setup are this file's only stand-ins (the gloo path runs for real in test_trainer and the multi-rank e2e tests)."""

import pytest

from services.learner.settings import LearnerSettings


@pytest.mark.parametrize("local_rank", [0, 3])
def test_each_rank_makes_its_own_gpu_current_before_the_group_forms(monkeypatch, local_rank):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # the import below, on a machine without a GPU
    import deepspeed
    import torch
    import torch.distributed as dist

    from services.learner.distributed import init_distributed

    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))
    monkeypatch.setattr(deepspeed, "init_distributed", lambda dist_backend: calls.append(("group", dist_backend)))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setenv("RANK", str(4 + local_rank))
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    monkeypatch.setenv("WORLD_SIZE", "8")

    init_distributed(LearnerSettings(device="cuda"))
    assert calls == [("set_device", local_rank), ("group", "nccl")]
