"""The contract every objective implements, and the per-token batch it reads.

All tensors are flattened over trained (completion) positions: N rows, one per token whose loss counts,
so padding and prompt positions cannot leak into a loss by construction (see `flatten_completion`).
Suffixes on names give shapes: _N per token, _NK per token and top-K slot, _NV per vocabulary entry,
_NS per token and sampled token, _NB per token and bucket (top-K slots plus the tail).
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class TokenBatch:
    """What the rollout and the teacher shipped for N trained tokens."""

    sampled_ids: Tensor  # [N] long: the sampled token y_t
    behavior_logprobs: Tensor  # [N] log pi_old(y_t), from the rollout engine
    teacher_sampled_logprobs: Tensor  # [N] log p_T(y_t)
    support_ids: Tensor  # [N, K] long, distinct per row: the teacher's top-K, or the student's (ReverseKLTopKSpec)
    teacher_support_logprobs: Tensor  # [N, K] teacher log-probs of those ids
    mc_ids: Tensor | None = None  # [N, M] extra tokens drawn from pi_old at each prefix
    mc_behavior_logprobs: Tensor | None = None  # [N, M]
    mc_teacher_logprobs: Tensor | None = None  # [N, M]
    proximal_logprobs: Tensor | None = None  # [N] log pi_prox(y_t) for decoupled PPO
    teacher_sample_ids: Tensor | None = None  # [N, S] tokens the teacher drew from p_T at each prefix
    teacher_sample_logprobs: Tensor | None = None  # [N, S] their teacher log-probs

    def __post_init__(self) -> None:
        n = self.sampled_ids.shape[0]
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is not None and value.shape[0] != n:
                raise ValueError(f"TokenBatch.{field.name} has {value.shape[0]} rows, sampled_ids has {n}")
        if self.support_ids.shape != self.teacher_support_logprobs.shape:
            raise ValueError("TokenBatch: support_ids and teacher_support_logprobs differ in shape")
        mc = (self.mc_ids, self.mc_behavior_logprobs, self.mc_teacher_logprobs)
        if any(t is None for t in mc) and any(t is not None for t in mc):
            raise ValueError("TokenBatch: mc_ids, mc_behavior_logprobs and mc_teacher_logprobs go together")
        if (self.teacher_sample_ids is None) != (self.teacher_sample_logprobs is None):
            raise ValueError("TokenBatch: teacher_sample_ids and teacher_sample_logprobs go together")

    @property
    def num_tokens(self) -> int:
        return self.sampled_ids.shape[0]

    def slice(self, start: int, end: int) -> TokenBatch:
        """Rows [start, end) of every tensor (views, no copy)."""
        return TokenBatch(
            **{
                f.name: None if (v := getattr(self, f.name)) is None else v[start:end]
                for f in dataclasses.fields(self)
            }
        )


@dataclass
class ObjectiveOutput:
    """Per-token loss and scalar diagnostics.

    Metric names decide how chunks of one batch combine (`merge_metrics`): a `_max` suffix takes the
    maximum, `_min` the minimum, anything else the token-weighted mean.
    """

    loss: Tensor  # [N] per-token loss; the caller reduces (token mean)
    metrics: dict[str, float]


class Objective(ABC):
    """Turns the current student's log-probs into a per-token loss."""

    # True when the loss depends on a statistic of the whole batch (M2PO's clip range): a chunked caller
    # must then compute that statistic first and call `bind`, or every chunk would use its own. A bound
    # objective is no longer batch-level (its statistic is fixed), so binding twice is never needed.
    batch_level: bool = False

    @abstractmethod
    def __call__(self, student_logprobs_NV: Tensor, batch: TokenBatch) -> ObjectiveOutput:
        """student_logprobs_NV: log_softmax of the current student (fp32 or wider), requiring grad."""

    def bind(self, sampled_logprobs_N: Tensor, batch: TokenBatch) -> Objective:
        """This objective with its batch-level statistics fixed from the current student's log-probs of
        the sampled tokens over the whole batch. Per-token objectives need nothing and return self."""
        return self


def merge_metrics(parts: list[tuple[int, dict[str, float]]]) -> dict[str, float]:
    """Combine per-chunk metrics, each weighted by its token count; see ObjectiveOutput for the rule."""
    total = sum(n for n, _ in parts)
    merged: dict[str, float] = {}
    for key in parts[0][1] if parts else ():
        values = [(n, m[key]) for n, m in parts]
        if key.endswith("_max"):
            merged[key] = max(v for _, v in values)
        elif key.endswith("_min"):
            merged[key] = min(v for _, v in values)
        else:
            merged[key] = sum(n * v for n, v in values) / max(total, 1)
    return merged


def flatten_completion(mask_BT: Tensor, **padded: Tensor | None) -> dict[str, Tensor | None]:
    """Select the positions where mask_BT is true from each [B, T, ...] tensor, giving [N, ...] tensors.

    The mask marks positions whose *target* token is a trained completion token (after the usual
    one-position shift between logits and labels); prompt and padding rows are dropped, so whatever
    garbage they hold never reaches a loss or a gradient. None values pass through (optional fields).
    """
    mask = mask_BT.bool()
    flat: dict[str, Tensor | None] = {}
    for name, tensor in padded.items():
        if tensor is not None and tensor.shape[:2] != mask.shape:
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)}, expected [{mask.shape[0]}, {mask.shape[1]}, ...]"
            )
        flat[name] = None if tensor is None else tensor[mask]
    return flat


def gather_NK(logprobs_NV: Tensor, ids_NK: Tensor) -> Tensor:
    return logprobs_NV.gather(-1, ids_NK.long())


def stat(values: Tensor, reduce: str) -> Tensor:
    """A 0-d metric from a tensor that may be empty (a chunk or batch with no trained token)."""
    values = values.detach().double()
    if values.numel() == 0:
        return values.new_zeros(())
    return {"mean": values.mean, "max": values.max, "min": values.min}[reduce]()


def floats(metrics: dict[str, Tensor | float]) -> dict[str, float]:
    """Device metrics to Python floats with one host sync for all of them, not one per metric."""
    names = [name for name, value in metrics.items() if isinstance(value, Tensor)]
    values = torch.stack([metrics[name] for name in names]).tolist() if names else []  # type: ignore[misc]
    return {**metrics, **dict(zip(names, values, strict=True))}  # type: ignore[dict-item]


def float_like(reference: Tensor, *tensors: Tensor) -> tuple[Tensor, ...]:
    """Teacher/behaviour log-probs arrive in the wire dtype; compute in the student's (>= fp32) dtype."""
    return tuple(t.to(dtype=reference.dtype) for t in tensors)
