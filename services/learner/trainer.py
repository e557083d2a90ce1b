"""DeepSpeed training of the student on scored samples, weight publishing, checkpoints and HF export.

Every rank holds a `Trainer`; rank 0 alone talks to Redis and drives the others through `Comm` (see
`service.py`), so every collective (the step's all-reduce, ZeRO-3 gathers) runs on all ranks in order.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections import Counter as Tally
from pathlib import Path

import torch
import torch.distributed as dist

from asyncopd import weights
from asyncopd.state import ActiveJob
from asyncopd.streams import ScoredEntry
from services.learner.objectives import TokenBatch, build_objective
from services.learner.settings import LearnerSettings

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def init_distributed(settings: LearnerSettings) -> None:
    """Join torchrun's group, or make a group of one; gloo on CPU without DeepSpeed's JIT-built shm op."""
    import deepspeed

    if settings.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        # Built at every CPU start otherwise (~97 s on 2 cores); plain gloo gives the same numbers.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if "RANK" not in os.environ:
        from asyncopd.ports import free_port

        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo" if settings.device == "cpu" else "nccl")


def token_batch(entries: list[ScoredEntry], device: torch.device) -> tuple[dict, TokenBatch]:
    """Model inputs for a list of samples and the per-token data of their completion positions only."""
    inputs = [e.prompt_token_ids + e.completion_token_ids[:-1] for e in entries]
    width = max(len(x) for x in inputs)
    input_ids = torch.zeros(len(inputs), width, dtype=torch.long)
    attention = torch.zeros(len(inputs), width, dtype=torch.long)
    rows, cols = [], []
    for i, (e, x) in enumerate(zip(entries, inputs, strict=True)):
        input_ids[i, : len(x)] = torch.tensor(x)
        attention[i, : len(x)] = 1
        start = len(e.prompt_token_ids) - 1  # logits here predict the first completion token
        rows += [i] * len(e.completion_token_ids)
        cols += range(start, start + len(e.completion_token_ids))
    k = entries[0].top_k

    def flat(name: str, dtype=torch.float32) -> torch.Tensor:
        return torch.tensor([v for e in entries for v in getattr(e, name)], dtype=dtype, device=device)

    batch = TokenBatch(
        sampled_ids=flat("completion_token_ids", torch.long),
        behavior_logprobs=flat("behavior_logprobs"),
        teacher_sampled_logprobs=flat("teacher_sampled_logprobs"),
        teacher_topk_ids=flat("teacher_topk_ids", torch.long).view(-1, k),
        teacher_topk_logprobs=flat("teacher_topk_logprobs").view(-1, k),
    )
    model_inputs = {"input_ids": input_ids.to(device), "attention_mask": attention.to(device),
                    "rows": torch.tensor(rows, device=device), "cols": torch.tensor(cols, device=device)}
    return model_inputs, batch


class Trainer:
    def __init__(self, job: ActiveJob, settings: LearnerSettings) -> None:
        import deepspeed
        from transformers import AutoModelForCausalLM

        spec = job.spec
        self.job, self.settings, self.spec = job, settings, spec
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if settings.device == "cuda" \
            else torch.device("cpu")
        torch.manual_seed(spec.train.seed)
        model = AutoModelForCausalLM.from_pretrained(spec.student.model, dtype=DTYPES[settings.dtype])
        optimizer = torch.optim.AdamW(model.parameters(), lr=spec.train.learning_rate,
                                      weight_decay=spec.train.weight_decay)
        config = {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": spec.train.grad_clip,
            "zero_optimization": {"stage": settings.zero_stage},
            "bf16": {"enabled": settings.dtype == "bfloat16"},
            "steps_per_print": 10**9,
        }
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        self.objective = build_objective(spec.objective)
        self.out = Path(job.output_dir)
        self.ckpt_dir = self.out / "checkpoints"
        self.weights_root = settings.data_dir / "weights" / job.id
        self.version = 0
        if (self.ckpt_dir / "latest").exists():
            _, client = self.engine.load_checkpoint(str(self.ckpt_dir))
            self.version = int(client["version"])
            log.info("resumed job %s at version %d", job.id, self.version)

    def step(self, entries: list[ScoredEntry]) -> dict:
        """One optimizer step on this rank's share of the batch; returns metrics of the whole batch."""
        t0 = time.perf_counter()
        mine = entries[self.rank :: self.world]
        model_inputs, batch = token_batch(mine, self.device) if mine else (None, None)
        total_tokens = torch.tensor([float(batch.num_tokens if batch else 0)], device=self.device)
        dist.all_reduce(total_tokens)
        self.engine.train()
        metrics = {}
        if batch is not None and batch.num_tokens:
            logits = self.engine(input_ids=model_inputs["input_ids"],
                                 attention_mask=model_inputs["attention_mask"]).logits
            student_logprobs = torch.log_softmax(logits[model_inputs["rows"], model_inputs["cols"]].float(), -1)
            out = self.objective(student_logprobs, batch)
            # Token mean over the global batch; DeepSpeed averages gradients over ranks, hence × world.
            loss = out.loss.sum() * self.world / total_tokens.clamp(min=1).item()
            metrics = {"objective": dict(out.metrics)}
            metrics["kl_behavior"] = float((batch.behavior_logprobs - batch.teacher_sampled_logprobs).mean())
        else:  # this rank got no tokens but must still join the gradient all-reduce
            loss = sum(p.sum() for p in self.engine.module.parameters()) * 0.0
        self.engine.backward(loss)
        self.engine.step()
        self.version += 1
        sums = torch.tensor([loss.item() * total_tokens.item() / self.world, metrics.get("kl_behavior", 0.0) *
                             (batch.num_tokens if batch else 0)], device=self.device)
        dist.all_reduce(sums)
        denom = max(total_tokens.item(), 1.0)
        return {**metrics, "loss": sums[0].item() / denom, "kl": sums[1].item() / denom,
                "tokens": int(total_tokens.item()), "step_s": time.perf_counter() - t0}

    def skip(self) -> dict:
        self.version += 1
        return {"loss": 0.0, "kl": 0.0, "tokens": 0, "step_s": 0.0}

    def _full_state_dict(self) -> dict | None:
        if self.settings.zero_stage == 3:
            import deepspeed

            params = list(self.engine.module.parameters())
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                return self.engine.module.state_dict() if self.rank == 0 else None
        return self.engine.module.state_dict() if self.rank == 0 else None

    def save_hf(self, target: Path, with_tokenizer: bool = False) -> None:
        """Write the student in HF format (config + safetensors) to `target` atomically. Collective."""
        from transformers import AutoTokenizer

        state = self._full_state_dict()
        if self.rank == 0:
            tmp = target.with_name(target.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            self.engine.module.save_pretrained(tmp, state_dict=state, safe_serialization=True)
            if with_tokenizer:
                AutoTokenizer.from_pretrained(self.spec.student.model).save_pretrained(tmp)
            weights.commit_dir(tmp, target)

    def publish(self) -> str:
        """Write the current weights as version `self.version`. Collective; returns the path on rank 0."""
        target = weights.version_dir(self.weights_root, self.version)
        if self.rank == 0:
            target.parent.mkdir(parents=True, exist_ok=True)
        self.save_hf(target)
        if self.rank == 0:
            weights.prune(self.weights_root, self.version - self.spec.max_staleness - self.settings.keep_versions)
        return str(target)

    def checkpoint(self) -> None:
        self.engine.save_checkpoint(str(self.ckpt_dir), tag=f"v{self.version}",
                                    client_state={"version": self.version})

    def export(self) -> Path:
        """The distilled student, tokenizer included: what the user came for."""
        target = self.out / "student"
        self.save_hf(target, with_tokenizer=True)
        return target


def staleness_tally(entries: list[ScoredEntry], version: int) -> dict[str, int]:
    return {str(k): v for k, v in sorted(Tally(version - e.policy_version for e in entries).items())}
