"""DeepSpeed training of the student on scored samples, weight publishing, checkpoints and HF export.

Every rank holds a `Trainer`; rank 0 alone talks to Redis and drives the others through `Comm` (see
`service.py`), so every collective (the step's all-reduce, ZeRO-3 gathers) runs on all ranks in order.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import time
from collections import Counter as Tally
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from asyncopd.ml import weights
from asyncopd.state import ActiveJob
from asyncopd.streams import ScoredEntry
from services.learner.objectives import (
    Objective,
    TokenBatch,
    build_objective,
    chunked_student_logprobs_loss,
    merge_metrics,
    sampled_token_logprobs,
)
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

    m = entries[0].mc_samples
    mc = {}
    if m:  # reverse_kl_mc: the rollout's extra tokens per position, scored by the teacher
        mc = {"mc_ids": flat("mc_token_ids", torch.long).view(-1, m),
              "mc_behavior_logprobs": flat("mc_behavior_logprobs").view(-1, m),
              "mc_teacher_logprobs": flat("mc_teacher_logprobs").view(-1, m)}
    batch = TokenBatch(
        sampled_ids=flat("completion_token_ids", torch.long),
        behavior_logprobs=flat("behavior_logprobs"),
        teacher_sampled_logprobs=flat("teacher_sampled_logprobs"),
        teacher_topk_ids=flat("teacher_topk_ids", torch.long).view(-1, k),
        teacher_topk_logprobs=flat("teacher_topk_logprobs").view(-1, k),
        **mc,
    )
    model_inputs = {"input_ids": input_ids.to(device), "attention_mask": attention.to(device),
                    "rows": torch.tensor(rows, device=device), "cols": torch.tensor(cols, device=device)}
    return model_inputs, batch


# Config fields by which some architectures post-process logits (soft-capping, scaling) after the lm_head or
# scale the hidden state before it: hidden @ W.T alone would then be the wrong distribution.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "lm_head_multiplier",
                    "dim_model_base")


def chunking_blocker(model: torch.nn.Module) -> str | None:
    """Why the chunked loss cannot stand in for this model's `forward(...).logits`, or None if it can: it
    needs logits == decoder(...).last_hidden_state @ lm_head.weight.T. Checked by inspection (a bias-free
    Linear head, no known logit transform in the config) and then numerically on a few tokens, so an
    architecture that does something else between decoder and head falls back instead of training wrong.
    Call before DeepSpeed partitions the weights."""
    head = model.get_output_embeddings()
    if head is None:
        return "the model has no output embeddings"
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return f"the output head is a {type(head).__name__}{' with a bias' if head.bias is not None else ''}, " \
               "not a plain bias-free Linear"
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for name in LOGIT_TRANSFORMS:
        if getattr(config, name, None) not in (None, 1, 1.0):
            return f"config.{name} = {getattr(config, name)} transforms the logits"
    try:
        decoder = model.get_decoder()
    except (AttributeError, NotImplementedError):
        decoder = None
    if decoder is None or decoder is model:
        return "the model exposes no separate decoder (get_decoder)"
    ids = torch.arange(3, 11)[None] % head.weight.shape[0]
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits.float()
        direct = torch.nn.functional.linear(_last_hidden(decoder(input_ids=ids, use_cache=False)), head.weight)
    if not torch.allclose(logits, direct.float(), rtol=1e-3, atol=1e-3 * float(logits.abs().max())):
        return "the model's logits are not its decoder output times the lm_head weight"
    return None


def _last_hidden(output) -> torch.Tensor:
    return output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]


class StudentLoss(torch.nn.Module):
    """The module DeepSpeed wraps: the HF student plus the loss, so the summed loss *is* the engine's output.

    Computing the loss inside `engine.forward` matters with the chunked path. DeepSpeed (0.19) starts its
    backward bookkeeping (ZeRO's enter_backward, the accumulation boundary, timers) from autograd hooks on the
    forward's outputs. A loss built outside from a captured hidden state and the lm_head weight reaches the
    lm_head weight's gradient hook *before* any output hook (AccumulateGrad nodes run first), so ZeRO would
    process that gradient outside its backward context. With the loss as the output, the first thing backward
    touches is an output and everything after it is ordinary autograd.

    Chunked path (`chunk_tokens` set, `chunking_blocker` None): decoder -> hidden states of the completion
    positions [N, H] -> `chunked_student_logprobs_loss` with the lm_head weight; no [N, V] logits exist at
    once. Its gradients are taken per chunk inside the forward with torch.autograd.grad on *detached* copies
    of the hidden states and the weight, so no parameter hook fires during forward; backward returns the
    stored gradients, scaled by the incoming gradient (DeepSpeed's loss scaling and ×world normalisation
    pass through unchanged), into the normal graph, where the hidden-state gradient continues into the
    decoder and the weight gradient lands in lm_head.weight (tied embeddings: summed with the embedding's).
    Under ZeRO-3 the lm_head weight is a partition; the forward gathers it (GatheredParameters) for the
    chunks, and its full-shape gradient goes to ZeRO's reduce-scatter hook like any other.

    Full-logits path: `model(...).logits` at the completion positions, fp32 log-softmax, the objective.
    """

    def __init__(self, model: torch.nn.Module, chunk_tokens: int | None, zero_stage: int) -> None:
        super().__init__()
        self.model = model
        self.chunk_tokens = chunk_tokens
        self.zero_stage = zero_stage
        self.blocker = "chunking disabled" if chunk_tokens is None else chunking_blocker(model)

    @property
    def chunked(self) -> bool:
        return self.blocker is None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, rows: torch.Tensor,
                cols: torch.Tensor, batch: TokenBatch, objective: Objective,
                bind: Callable[[Objective, torch.Tensor], Objective]) -> tuple[torch.Tensor, dict[str, float]]:
        """(sum over the batch's tokens of the objective's per-token loss, its metrics). `bind(objective,
        sampled_logprobs_N)` fixes batch-level statistics (M2PO) over the global batch; it is collective."""
        if not self.chunked:
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            logprobs = torch.log_softmax(logits[rows, cols].float(), -1)
            objective = bind(objective, logprobs.detach().gather(-1, batch.sampled_ids[:, None])[:, 0])
            out = objective(logprobs, batch)
            return out.loss.sum(), out.metrics
        decoder = self.model.get_decoder()
        hidden = _last_hidden(decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False))[rows, cols]
        weight = self.model.get_output_embeddings().weight
        with self._gathered(weight):
            chunk = self.chunk_tokens
            assert chunk is not None
            objective = bind(objective, sampled_token_logprobs(hidden, weight, batch, chunk))
            return chunked_student_logprobs_loss(hidden, weight, batch, objective, chunk)

    def _gathered(self, weight: torch.nn.Parameter):
        if self.zero_stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters([weight], modifier_rank=None)


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
        self.model = AutoModelForCausalLM.from_pretrained(spec.student.model, dtype=DTYPES[settings.dtype])
        self.net = StudentLoss(self.model, settings.loss_chunk_tokens, settings.zero_stage)
        if self.rank == 0:
            if self.net.blocker:
                log.warning("job %s: loss over full logits (not chunked): %s", job.id, self.net.blocker)
            else:
                log.info("job %s: chunked loss, %d positions per chunk", job.id, settings.loss_chunk_tokens)
        optimizer = torch.optim.AdamW(self.net.parameters(), lr=spec.train.learning_rate,
                                      weight_decay=spec.train.weight_decay)
        config = {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": spec.train.grad_clip,
            "zero_optimization": {"stage": settings.zero_stage},
            "bf16": {"enabled": settings.dtype == "bfloat16"},
            "steps_per_print": 10**9,
        }
        warmup = spec.train.warmup_steps
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (warmup + 1)))
        self.engine, *_ = deepspeed.initialize(model=self.net, optimizer=optimizer, lr_scheduler=schedule,
                                               config=config)
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
        """One optimizer step on this rank's share of the batch; returns metrics of the whole batch.

        The loss is the token mean over the *global* batch: each rank's loss sum is divided by the global
        token count and multiplied by the world size, because DeepSpeed averages gradients over ranks. A
        rank with no sample (fewer samples than ranks) runs one sample at weight 0, so it joins every
        collective of the forward and backward (ZeRO-3 gathers, the gradient reduction, the M2PO bind).
        """
        t0 = time.perf_counter()
        mine = entries[self.rank :: self.world]
        real = bool(mine)
        model_inputs, batch = token_batch(mine or entries[:1], self.device)
        local_tokens = batch.num_tokens if real else 0
        total_tokens = torch.tensor([float(local_tokens)], device=self.device)
        dist.all_reduce(total_tokens)
        total = max(total_tokens.item(), 1.0)
        self.engine.train()
        loss_sum, objective_metrics = self.engine(**model_inputs, batch=batch, objective=self.objective,
                                                  bind=functools.partial(self._bind, real=real, batch=batch))
        scale = self.world / total if real else 0.0
        self.engine.backward(loss_sum * scale)
        self.engine.step()
        self.version += 1
        if self.settings.synthetic_step_s:
            time.sleep(max(0.0, self.settings.synthetic_step_s - (time.perf_counter() - t0)))
        kl_sum = float((batch.behavior_logprobs - batch.teacher_sampled_logprobs).sum()) if real else 0.0
        part = (local_tokens, float(loss_sum.detach()) if real else 0.0, kl_sum, objective_metrics)
        parts = [part]
        if self.world > 1:
            parts = [None] * self.world
            dist.all_gather_object(parts, part)
        parts = [p for p in parts if p[0] > 0]
        return {"objective": merge_metrics([(n, m) for n, _, _, m in parts]),
                "loss": sum(p[1] for p in parts) / total, "kl": sum(p[2] for p in parts) / total,
                "tokens": int(total_tokens.item()), "step_s": time.perf_counter() - t0}

    def _bind(self, objective: Objective, sampled_logprobs_N: torch.Tensor, *, real: bool,
              batch: TokenBatch) -> Objective:
        """Fix an objective's batch-level statistic (M2PO's clip range) over the whole global batch: the
        sampled-token log-probs, behaviour and teacher log-probs of every rank are gathered first, so each
        rank clips with the same bound. Collective when batch-level and world > 1; a no-op otherwise."""
        if not objective.batch_level:
            return objective
        cols = [sampled_logprobs_N.float(), batch.behavior_logprobs.float(), batch.teacher_sampled_logprobs.float()]
        local = torch.stack(cols).cpu() if real else torch.zeros(3, 0)
        if self.world > 1:
            gathered = [None] * self.world
            dist.all_gather_object(gathered, local)
            local = torch.cat(gathered, dim=1)  # type: ignore[arg-type]
        logprobs, behavior, teacher = local.to(sampled_logprobs_N.device)
        n = logprobs.shape[0]
        whole = TokenBatch(sampled_ids=torch.zeros(n, dtype=torch.long), behavior_logprobs=behavior,
                           teacher_sampled_logprobs=teacher, teacher_topk_ids=torch.zeros(n, 0, dtype=torch.long),
                           teacher_topk_logprobs=torch.zeros(n, 0))
        return objective.bind(logprobs, whole)

    def skip(self) -> dict:
        self.version += 1
        return {"loss": 0.0, "kl": 0.0, "tokens": 0, "step_s": 0.0}

    def _full_state_dict(self) -> dict | None:
        if self.settings.zero_stage == 3:
            import deepspeed

            params = list(self.model.parameters())
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                return {k: v.clone() for k, v in self.model.state_dict().items()} if self.rank == 0 else None
        return self.model.state_dict() if self.rank == 0 else None

    def publish(self) -> str:
        """Write the current weights as version `self.version`. Collective; returns the path on rank 0."""
        target = weights.version_dir(self.weights_root, self.version)
        state = self._full_state_dict()
        if self.rank == 0:
            weights.save_version(state, self.model.config.to_json_string(), target)
            weights.prune(self.weights_root, self.version - self.spec.max_staleness - self.settings.keep_versions)
        return str(target)

    def checkpoint(self) -> None:
        self.engine.save_checkpoint(str(self.ckpt_dir), tag=f"v{self.version}",
                                    client_state={"version": self.version})

    def export(self) -> Path:
        """The distilled student in HF format, tokenizer included: what the user came for. Collective."""
        from transformers import AutoTokenizer

        target = self.out / "student"
        state = self._full_state_dict()
        if self.rank == 0:
            tmp = target.with_name(target.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            self.model.save_pretrained(tmp, state_dict=state)
            AutoTokenizer.from_pretrained(self.spec.student.model).save_pretrained(tmp)
            weights.commit_dir(tmp, target)
        return target


def staleness_tally(entries: list[ScoredEntry], version: int) -> dict[str, int]:
    return {str(k): v for k, v in sorted(Tally(version - e.policy_version for e in entries).items())}
