"""Diagnostics every objective reports next to its own metrics, read off the current student's full
log-probs that the loss computes anyway (no grad, one transient [chunk, V] buffer):

- student_entropy: mean over trained positions of -sum_v pi_theta(v) log pi_theta(v).
- leaked_mass: the student's mass outside the teacher's top-K, mean over positions; teacher_tail_mass is
  the teacher's own mass there, the level a matched student would show. The early warning of a sampled
  reverse KL gone wrong against a near-deterministic teacher: rejected samples push mass onto tokens
  that are rarely sampled and so rarely pushed back, and leaked_mass and entropy climb steps before the
  KL does (docs/objectives.md, "Reverse KL that trains").

Not reported for reverse_kl_topk with support "student": its top-K arrays hold the student's own top-K.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Objective, ObjectiveOutput, TokenBatch, float_like, floats, stat


@torch.no_grad()
def student_diagnostics(student_logprobs_NV: Tensor, batch: TokenBatch, teacher_support: bool) -> dict[str, float]:
    logprobs_NV = student_logprobs_NV.detach()
    # vecdot: one [N, V] temporary (the probabilities), not two; it is freed before the loss's backward runs
    metrics = {"student_entropy": stat(-torch.linalg.vecdot(logprobs_NV.exp(), logprobs_NV), "mean")}
    if teacher_support and batch.support_ids.shape[1] > 0:
        (teacher_NK,) = float_like(logprobs_NV, batch.teacher_support_logprobs)
        inside_N = logprobs_NV.gather(-1, batch.support_ids.long()).exp().sum(-1)
        metrics["leaked_mass"] = stat((1 - inside_N).clamp_min(0), "mean")
        metrics["teacher_tail_mass"] = stat((1 - teacher_NK.exp().sum(-1)).clamp_min(0), "mean")
    return floats(metrics)


class WithDiagnostics(Objective):
    """An objective plus `student_diagnostics` in its metrics; loss, gradient and binding unchanged."""

    def __init__(self, inner: Objective, teacher_support: bool) -> None:
        self.inner = inner
        self.teacher_support = teacher_support
        self.batch_level = inner.batch_level

    def bind(self, sampled_logprobs_N: Tensor, batch: TokenBatch) -> WithDiagnostics:
        return WithDiagnostics(self.inner.bind(sampled_logprobs_N, batch), self.teacher_support)

    def __call__(self, student_logprobs_NV: Tensor, batch: TokenBatch) -> ObjectiveOutput:
        out = self.inner(student_logprobs_NV, batch)
        extra = student_diagnostics(student_logprobs_NV, batch, self.teacher_support)
        return ObjectiveOutput(out.loss, {**out.metrics, **extra})
