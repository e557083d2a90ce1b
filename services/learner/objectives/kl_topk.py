"""Top-K KL objectives: the teacher ships K (id, log-prob) pairs per position, not the whole vocabulary.

Summing over the K ids only (the reference's choice) is not a divergence: the student can move mass out
of the support for free, the reverse sum ignores that mass entirely, and neither has zero gradient at
student == teacher. With `tail=True` one extra bucket holds all the mass outside the support, so the loss
is the exact KL between the two (K+1)-bucket coarse-grainings: >= 0, a lower bound on the full KL
(data-processing inequality), non-decreasing in K, equal to it at K = V, and zero with zero gradient when
the student matches the teacher.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import Objective, ObjectiveOutput, TokenBatch, float_like, floats, gather_NK, stat

# Tail masses below e^-30 are treated as e^-30: at K = V the tail is empty and its log would be -inf
# (or rounding noise), which would turn 0 * log 0 into NaN.
TAIL_LOG_FLOOR = -30.0
# Finite stand-in for -inf when masking the support out of a logsumexp: keeps its backward NaN-free.
_MASKED = -1e30


def student_tail_logmass(logprobs_NV: Tensor, support_NK: Tensor) -> Tensor:
    """log of the student's mass outside the support, computed directly (not as log(1 - sum)) so it stays
    accurate when the tail is tiny; differentiable."""
    outside = logprobs_NV.scatter(-1, support_NK.long(), _MASKED)
    return outside.logsumexp(-1).clamp_min(TAIL_LOG_FLOOR)


def teacher_tail_logmass(topk_logprobs_NK: Tensor) -> Tensor:
    """log(1 - sum_k p_T(k)); the teacher only sent the top-K, so the tail is what they leave."""
    inside = topk_logprobs_NK.logsumexp(-1).clamp_max(-math.exp(TAIL_LOG_FLOOR))
    # log1mexp, switching branches where each is accurate (Maechler 2012)
    tail = torch.where(
        inside > -math.log(2.0), torch.log(-torch.expm1(inside)), torch.log1p(-torch.exp(inside))
    )
    return tail.clamp_min(TAIL_LOG_FLOOR)


def _support_metrics(loss_N: Tensor, teacher_NK: Tensor, student_NK: Tensor) -> dict[str, float]:
    return floats(
        {
            "kl_estimate": stat(loss_N, "mean"),
            "teacher_topk_mass": stat(teacher_NK.exp().sum(-1), "mean"),
            "student_topk_mass": stat(student_NK.exp().sum(-1), "mean"),
        }
    )


class ForwardKLTopK(Objective):
    """sum_{k in TopK_T} p_T(k) (log p_T(k) - log pi(k))  [+ p_tail (log p_tail - log pi_tail)]."""

    def __init__(self, tail: bool = True) -> None:
        self.tail = tail

    def __call__(self, student_logprobs_NV: Tensor, batch: TokenBatch) -> ObjectiveOutput:
        (teacher_NK,) = float_like(student_logprobs_NV, batch.teacher_topk_logprobs)
        student_NK = gather_NK(student_logprobs_NV, batch.teacher_topk_ids)
        loss_N = (teacher_NK.exp() * (teacher_NK - student_NK)).sum(-1)
        if self.tail:
            teacher_tail_N = teacher_tail_logmass(teacher_NK)
            student_tail_N = student_tail_logmass(student_logprobs_NV, batch.teacher_topk_ids)
            loss_N = loss_N + teacher_tail_N.exp() * (teacher_tail_N - student_tail_N)
        return ObjectiveOutput(loss_N, _support_metrics(loss_N, teacher_NK, student_NK))


class ReverseKLTopK(Objective):
    """sum_{k in S} pi(k) (log pi(k) - log p_T(k))  [+ pi_tail (log pi_tail - log p_tail)].

    S is whatever the top-K arrays hold: the teacher's top-K, or the rollout student's top-K scored by the
    teacher (ReverseKLTopKSpec.support); the arithmetic is the same. Both factors carry gradient.
    """

    def __init__(self, tail: bool = True) -> None:
        self.tail = tail

    def __call__(self, student_logprobs_NV: Tensor, batch: TokenBatch) -> ObjectiveOutput:
        (teacher_NK,) = float_like(student_logprobs_NV, batch.teacher_topk_logprobs)
        student_NK = gather_NK(student_logprobs_NV, batch.teacher_topk_ids)
        loss_N = (student_NK.exp() * (student_NK - teacher_NK)).sum(-1)
        if self.tail:
            teacher_tail_N = teacher_tail_logmass(teacher_NK)
            student_tail_N = student_tail_logmass(student_logprobs_NV, batch.teacher_topk_ids)
            loss_N = loss_N + student_tail_N.exp() * (student_tail_N - teacher_tail_N)
        return ObjectiveOutput(loss_N, _support_metrics(loss_N, teacher_NK, student_NK))
