"""Top-K KL objectives: the teacher ships K (id, log-prob) pairs per position, not the whole vocabulary.

Summing over the K ids only (the reference's choice) is not a divergence: the student can move mass out
of the support for free, the reverse sum ignores that mass entirely, and neither has zero gradient at
student == teacher. With `tail=True` one extra bucket holds all the mass outside the support, so the loss
is the exact KL between the two (K+1)-bucket coarse-grainings: >= 0, a lower bound on the full KL
(data-processing inequality), non-decreasing in K, equal to it at K = V, and zero with zero gradient when
the student matches the teacher.

Every objective here is a sum over buckets of a per-bucket term; `token_clip` clips each term from above
before the sum (the reference's per-element clip), the tail bucket's term included.
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


def bucket_logprobs(
    student_logprobs_NV: Tensor, batch: TokenBatch, tail: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(teacher_NB, student_NB, teacher_NK, student_NK): log-probs of the K support ids, plus the tail bucket
    as a last column of the _NB pair when `tail`."""
    (teacher_NK,) = float_like(student_logprobs_NV, batch.teacher_support_logprobs)
    student_NK = gather_NK(student_logprobs_NV, batch.support_ids)
    if not tail:
        return teacher_NK, student_NK, teacher_NK, student_NK
    teacher_tail_N = teacher_tail_logmass(teacher_NK)
    student_tail_N = student_tail_logmass(student_logprobs_NV, batch.support_ids)
    return (
        torch.cat([teacher_NK, teacher_tail_N[:, None]], -1),
        torch.cat([student_NK, student_tail_N[:, None]], -1),
        teacher_NK,
        student_NK,
    )


def forward_terms_NB(teacher_NB: Tensor, student_NB: Tensor) -> Tensor:
    return teacher_NB.exp() * (teacher_NB - student_NB)


def reverse_terms_NB(teacher_NB: Tensor, student_NB: Tensor) -> Tensor:
    return student_NB.exp() * (student_NB - teacher_NB)


class BucketKL(Objective):
    """sum over buckets b of min(term(b), token_clip), term = alpha * forward + (1 - alpha) * reverse:
    alpha = 1 is forward_kl_topk, alpha = 0 reverse_kl_topk, in between skewed_kl_topk.

    Forward: p_T(b) (log p_T(b) - log pi(b)); reverse: pi(b) (log pi(b) - log p_T(b)); both factors of the
    reverse term carry gradient. The support is whatever the top-K arrays hold: the teacher's top-K, or the
    rollout student's top-K scored by the teacher (ReverseKLTopKSpec.support); the arithmetic is the same.
    """

    def __init__(self, alpha: float, tail: bool = True, token_clip: float | None = None) -> None:
        self.alpha = alpha
        self.tail = tail
        self.token_clip = token_clip

    def __call__(self, student_logprobs_NV: Tensor, batch: TokenBatch) -> ObjectiveOutput:
        teacher_NB, student_NB, teacher_NK, student_NK = bucket_logprobs(student_logprobs_NV, batch, self.tail)
        terms_NB = self._terms(teacher_NB, student_NB)
        metrics: dict[str, Tensor | float] = {}
        if self.token_clip is not None:
            metrics["token_clipped_frac"] = stat(terms_NB > self.token_clip, "mean")
            # clamp passes no gradient above the bound: a clipped bucket stops pulling (the reference's rule)
            terms_NB = terms_NB.clamp(max=self.token_clip)
        loss_N = terms_NB.sum(-1)
        metrics.update(
            kl_estimate=stat(loss_N, "mean"),
            teacher_topk_mass=stat(teacher_NK.exp().sum(-1), "mean"),
            student_topk_mass=stat(student_NK.exp().sum(-1), "mean"),
        )
        return ObjectiveOutput(loss_N, floats(metrics))

    def _terms(self, teacher_NB: Tensor, student_NB: Tensor) -> Tensor:
        # the pure kinds skip the other term: 0 * (a finite term) is 0, but it would still cost a pass
        if self.alpha == 1.0:
            return forward_terms_NB(teacher_NB, student_NB)
        if self.alpha == 0.0:
            return reverse_terms_NB(teacher_NB, student_NB)
        return self.alpha * forward_terms_NB(teacher_NB, student_NB) + (1 - self.alpha) * reverse_terms_NB(
            teacher_NB, student_NB
        )


class ForwardKLTopK(BucketKL):
    """sum_{k in TopK_T} p_T(k) (log p_T(k) - log pi(k))  [+ p_tail (log p_tail - log pi_tail)]."""

    def __init__(self, tail: bool = True, token_clip: float | None = None) -> None:
        super().__init__(1.0, tail, token_clip)


class ReverseKLTopK(BucketKL):
    """sum_{k in S} pi(k) (log pi(k) - log p_T(k))  [+ pi_tail (log pi_tail - log p_tail)]."""

    def __init__(self, tail: bool = True, token_clip: float | None = None) -> None:
        super().__init__(0.0, tail, token_clip)
