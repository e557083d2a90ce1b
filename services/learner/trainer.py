"""DeepSpeed training of the student on scored samples, weight publishing, checkpoints and HF export.

Every rank holds a `Trainer`; rank 0 alone talks to Redis and drives the others through `RankDriver` (see
`ranks.py`), so every collective (the step's all-reduce, ZeRO-3 gathers) runs on all ranks in order.

A job with `student.lora` trains a PEFT LoRA adapter on the frozen student (`asyncopd.ml.lora`): the optimizer
holds the adapter alone, each version published is the adapter alone (the `adapter` weights transport),
checkpoints leave out the frozen base (the job's student on disk is the base), and the export is the adapter
in PEFT format (plus the merged model with `student.export_merged`).
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from asyncopd.ml import weights
from asyncopd.ml.dtypes import DTYPES
from asyncopd.ml.weights import metrics as weights_metrics
from asyncopd.ml.weights.background import Announce, BackgroundPublisher
from asyncopd.ml.weights.codec import served
from asyncopd.state import ActiveJob
from asyncopd.streams import ScoredEntry
from services.learner import metrics as learner_metrics
from services.learner.collate import token_batch
from services.learner.objectives import Objective, TokenBatch, build_objective, merge_metrics
from services.learner.settings import LearnerSettings
from services.learner.student_loss import StudentLoss

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepResult:
    """One step's figures over the global batch (every rank returns the same)."""

    loss: float
    behavior_kl: float  # sampled KL of the behaviour policy that generated the batch to the teacher
    tokens: int
    step_s: float
    objective: dict[str, float]


def layer_groups(names: list[str]) -> list[list[str]]:
    """Parameter names grouped by the first numeric segment of their name (`model.layers.3.mlp...` -> layer 3),
    in first-seen order; names without one (embeddings, final norm, head) form their own groups."""
    groups: dict[str, list[str]] = {}
    for name in names:
        parts = name.split(".")
        key = next((".".join(parts[:i + 1]) for i, part in enumerate(parts) if part.isdigit()), name)
        groups.setdefault(key, []).append(name)
    return list(groups.values())


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
        self.lora = spec.student.lora
        if self.lora is not None:
            from asyncopd.ml import lora

            # Seeded above: every rank draws the same adapter initialisation.
            self.model = lora.wrap(self.model, self.lora, spec.student.model)
            self.config_json = lora.adapter_config_json(self.model)
        else:
            self.config_json = self.model.config.to_json_string()
        self.net = StudentLoss(self.model, settings.loss_chunk_tokens, settings.zero_stage)
        if self.rank == 0:
            if self.net.blocker:
                log.warning("job %s: loss over full logits (not chunked): %s", job.id, self.net.blocker)
            else:
                log.info("job %s: chunked loss, %d positions per chunk", job.id, settings.loss_chunk_tokens)
        # The trainable parameters only: with LoRA the base is frozen and Adam needs no state for it.
        trainable = [p for p in self.net.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=spec.train.learning_rate, weight_decay=spec.train.weight_decay)
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
        # Rank 0 alone writes versions (the others only join the gather), on a background thread unless
        # weights_async_publish is off; a delta publisher also answers repair requests until `close`.
        self.writer = BackgroundPublisher(
            weights.learner_publisher(settings, self.weights_root, job.id, adapter=self.lora is not None),
            background=settings.weights_async_publish, on_written=self._written,
        ) if self.rank == 0 else None
        self.version = 0
        if (self.ckpt_dir / "latest").exists():
            # A LoRA checkpoint holds the adapter alone; the frozen base comes from the job's student.
            _, client = self.engine.load_checkpoint(str(self.ckpt_dir), load_module_strict=self.lora is None)
            self.version = int(client["version"])
            log.info("resumed job %s at version %d", job.id, self.version)

    def step(self, entries: list[ScoredEntry]) -> StepResult:
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
        kl_sum = float((batch.behavior_logprobs - batch.teacher_sampled_logprobs).sum()) if real else 0.0
        part = (local_tokens, float(loss_sum.detach()) if real else 0.0, kl_sum, objective_metrics)
        parts = [part]
        if self.world > 1:
            parts = [None] * self.world
            dist.all_gather_object(parts, part)
        parts = [p for p in parts if p[0] > 0]
        return StepResult(loss=sum(p[1] for p in parts) / total, behavior_kl=sum(p[2] for p in parts) / total,
                          tokens=int(total_tokens.item()), step_s=time.perf_counter() - t0,
                          objective=merge_metrics([(n, m) for n, _, _, m in parts]))

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
                           teacher_sampled_logprobs=teacher, support_ids=torch.zeros(n, 0, dtype=torch.long),
                           teacher_support_logprobs=torch.zeros(n, 0))
        return objective.bind(logprobs, whole)

    def skip(self) -> StepResult:
        self.version += 1
        return StepResult(loss=0.0, behavior_kl=0.0, tokens=0, step_s=0.0, objective={})

    def _full_state_dict(self, dtype: torch.dtype | None = None) -> dict | None:
        """What a version holds, on rank 0 (None elsewhere): the whole student, or with LoRA the adapter's
        tensors under PEFT's names (under ZeRO-3 only the adapter is gathered). Collective under ZeRO-3, where
        the whole student comes as rank 0's own host copy, its floating tensors in `dtype` (as trained if
        None): `_copies_state`."""
        if self.lora is not None:
            from asyncopd.ml.lora import adapter_state

            with self._gathered([p for p in self.model.parameters() if p.requires_grad]):
                return adapter_state(self.model) if self.rank == 0 else None
        if self._copies_state:
            return self._gathered_by_layer(dtype)
        return self.model.state_dict() if self.rank == 0 else None

    @property
    def _copies_state(self) -> bool:
        return self.settings.zero_stage == 3 and self.lora is None

    def _gathered_by_layer(self, dtype: torch.dtype | None) -> dict | None:
        """ZeRO-3: the full parameters one layer at a time, each copied to host memory on rank 0 before the next
        is gathered, so no rank ever holds more than one layer beyond its partition (gathering the whole model
        at once would need the whole model on every device). Each layer is cast to `dtype` as it is copied:
        one host copy in the served dtype, not a copy as trained and then a cast. Tied parameters come once,
        under their first name, as `named_parameters` lists them; persistent buffers (never partitioned) as
        they are."""
        params = dict(self.model.named_parameters())
        state: dict[str, torch.Tensor] = {}
        for group in layer_groups(list(params)):
            with self._gathered([params[n] for n in group]):
                if self.rank == 0:
                    state.update(served(((n, params[n]) for n in group), dtype, copy=True))
        if self.rank != 0:
            return None
        persistent = set(self.model.state_dict())
        state.update(served(((n, b) for n, b in self.model.named_buffers() if n in persistent), dtype, copy=True))
        return state

    def _gathered(self, params: list):
        if self.settings.zero_stage != 3:
            import contextlib

            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)

    def publish(self, announce: Announce | None = None) -> None:
        """Publish the current weights as version `self.version` through the configured weights transport;
        `announce(version, location)` once it is written (rank 0). Collective (the ZeRO-3 gather); rank 0
        returns once its snapshot is taken, the write and the announcement follow in the background
        (`asyncopd.ml.weights.background`)."""
        state = self._full_state_dict(self.writer.publisher.dtype if self.writer is not None else None)
        if self.writer is not None:  # ZeRO-3's gathered copy is the snapshot itself: no second copy of the model
            self.writer.submit(self.version, state, self.config_json, announce or (lambda version, location: None),
                               owned=self._copies_state)

    def published(self) -> str | None:
        """Rank 0: wait for the version being written; the location of the newest version written."""
        return self.writer.flush() if self.writer is not None else None

    def _written(self, publisher, version: int, seconds: float) -> None:
        learner_metrics.PUBLISH_SECONDS.observe(seconds)
        weights_metrics.PUBLISHED_BYTES.inc(publisher.last_bytes())
        publisher.prune(version - self.spec.max_staleness - self.settings.keep_versions)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    def checkpoint(self) -> None:
        self.engine.save_checkpoint(str(self.ckpt_dir), tag=f"v{self.version}", client_state={"version": self.version},
                                    exclude_frozen_parameters=self.lora is not None)

    def export(self) -> Path:
        """The distilled student, tokenizer included: what the user came for. Collective. In HF format, or with
        LoRA the adapter in PEFT format (adapter_config.json names the base it applies to), and on request the
        adapter merged into the base as a plain HF model beside it."""
        target = self.out / "student"
        self.published()  # the last version announced before the job can be seen to end
        state = self._full_state_dict()
        if self.rank == 0:
            if self.lora is None:
                self._write_result(target, lambda tmp: self.model.save_pretrained(tmp, state_dict=state))
            else:
                from asyncopd.ml import lora

                self._write_result(target, lambda tmp: lora.save_adapter(tmp, state, self.config_json))
                if self.spec.student.export_merged:
                    merged = lora.load_merged(target, DTYPES[self.settings.dtype], base=self.spec.student.model)
                    self._write_result(self.out / "student-merged", lambda tmp: merged.save_pretrained(tmp))
        return target

    def _write_result(self, target: Path, write) -> None:
        """`write(tmp)`, the tokenizer beside it, then `tmp` renamed to `target`; never over what is not ours."""
        from transformers import AutoTokenizer

        from asyncopd.outputs import owner

        tmp = target.with_name(target.name + ".tmp")
        if (target.exists() or tmp.exists()) and owner(self.out) != self.job.id:  # not ours: never delete
            raise RuntimeError(f"{target} exists and {self.out} is not this job's output directory: "
                               "refusing to replace it")
        shutil.rmtree(tmp, ignore_errors=True)
        write(tmp)
        AutoTokenizer.from_pretrained(self.spec.student.model).save_pretrained(tmp)
        weights.commit_dir(tmp, target)

