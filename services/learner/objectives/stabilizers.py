"""Async-RL stabilisers applied to the sampled reverse KL (advantage log p_T - log pi_old, as the
AsyncOPD paper compared them): AReaL's decoupled PPO and M2PO's second-moment trust region."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from asyncopd.objective_spec import LOG_RATIO_CLAMP

from .base import Objective, ObjectiveOutput, TokenBatch, float_like, floats, stat
from .policy_gradient import clamped_log_ratio, clipped_surrogate, policy_metrics


class DecoupledPPO(Objective):
    """w * max(-A r, -A clip(r, 1-eps, 1+eps)), r = pi_theta/pi_prox, w = pi_prox/pi_old (detached).

    The clip anchors on a recent proximal policy instead of the stale behaviour policy; w restores the
    importance weight to pi_old, and tokens with w > behavior_cap get weight 0 (AReaL and the reference
    drop them rather than truncate). Without batch.proximal_logprobs pi_prox is the current student,
    detached, so r is 1 in value and the clip never binds.
    """

    def __init__(self, clip_eps: float = 0.2, behavior_cap: float = 5.0) -> None:
        self.clip_eps = clip_eps
        self.behavior_cap = behavior_cap

    def __call__(self, student_logprobs_NV: Tensor, batch: TokenBatch) -> ObjectiveOutput:
        logprobs_N = student_logprobs_NV.gather(-1, batch.sampled_ids.long()[:, None])[:, 0]
        proximal = logprobs_N.detach() if batch.proximal_logprobs is None else batch.proximal_logprobs
        behavior_N, teacher_N, proximal_N = float_like(
            logprobs_N, batch.behavior_logprobs, batch.teacher_sampled_logprobs, proximal
        )
        advantage_N = teacher_N - behavior_N
        ratio_N = clamped_log_ratio(logprobs_N, proximal_N).exp()
        weight_N = clamped_log_ratio(proximal_N, behavior_N).exp()
        dropped_N = weight_N > self.behavior_cap
        weight_N = torch.where(dropped_N, torch.zeros_like(weight_N), weight_N)
        surrogate_N, clipped_N = clipped_surrogate(ratio_N, advantage_N, 1 - self.clip_eps, 1 + self.clip_eps)
        metrics = policy_metrics(
            logprobs_N,
            behavior_N,
            teacher_N,
            clamped_log_ratio(logprobs_N, behavior_N),
            clipped=clipped_N,
            behavior_dropped=dropped_N,
        )
        metrics["behavior_weight_mean"] = stat(weight_N, "mean")
        return ObjectiveOutput(weight_N * surrogate_N, floats(metrics))


# The reference's constants: an "unbounded" upper margin, and the slack in its budget comparisons.
M2PO_OPEN_MARGIN = 1e5
_EPS = 1e-12


@dataclass(frozen=True)
class M2POClip:
    """The batch's clip range [1 - low, 1 + high] for the ratio, and what chose it: tau (inf while the
    budget holds) and the second moment of the harmful log-ratios before and after capping them at tau."""

    low: float
    high: float
    tau: float
    m2_before: float
    m2_after: float


def m2po_clip(delta_N: Tensor, advantage_N: Tensor, budget: float, min_low: float, min_high: float) -> M2POClip:
    """M2PO's clip range as the AsyncOPD reference computes it, delta = log pi_old - log pi_theta.

    Harmful tokens are those PPO clipping acts on (A > 0 with r > 1, or A < 0 with r < 1); the others move
    away from the trust region's edge anyway. If mean(delta^2) over them is within the budget the range is
    open, (0, 1e5). Otherwise tau^2 is the largest *observed* delta_k^2 whose capped total
    sum_j min(delta_j^2, delta_k^2) stays below budget * n (tau = 0 if none), and the margins are
    (1 - e^-tau, e^tau - 1). Either way they are floored at (min_low, min_high).
    """
    ratio_N = (-delta_N).exp()  # compared with 1 as the reference does, so |delta| ~ 0 counts as it does
    harmful = ((advantage_N > 0) & (ratio_N > 1.0)) | ((advantage_N < 0) & (ratio_N < 1.0))
    delta2 = delta_N.detach()[harmful].double().square().sort().values
    n = delta2.numel()
    m2_before = delta2.mean().item() if n else 0.0
    if n == 0 or m2_before <= budget + _EPS:
        return M2POClip(min_low, max(M2PO_OPEN_MARGIN, min_high), math.inf, m2_before, m2_before)
    target = budget * n
    cumsum = delta2.cumsum(0)
    # capped total if every delta^2 above delta_k^2 were cut to it (the reference's 1e-12 slack included)
    capped = cumsum + (delta2 - _EPS) * torch.arange(n - 1, -1, -1, dtype=delta2.dtype, device=delta2.device)
    k = int((capped >= target - _EPS).nonzero()[0]) if target > _EPS else 0
    if k == 0:  # even the smallest harmful delta^2 blows the budget: clip at r = 1 (before the floors)
        tau, m2_after = 0.0, 0.0
    else:
        kept = delta2[k - 1].item()
        tau = math.sqrt(max(kept - _EPS, 0.0))
        m2_after = (kept * (n - k) + cumsum[k - 1].item()) / n
    return M2POClip(
        max(1.0 - math.exp(-tau), min_low), max(math.exp(tau) - 1.0, min_high), tau, m2_before, m2_after
    )


class M2PO(Objective):
    """PPO surrogate (advantage log p_T - log pi_old) with the clip range chosen per batch by `m2po_clip`,
    so only the harmful outliers beyond the second-moment budget lose their gradient. The range is a
    statistic of the whole batch (all learner ranks): `bind` fixes it before the chunked loss runs."""

    batch_level = True

    def __init__(
        self,
        second_moment_budget: float = 0.04,
        min_clip_low: float = 0.3,
        min_clip_high: float = 0.5,
        clip: M2POClip | None = None,
    ) -> None:
        self.budget = second_moment_budget
        self.min_low = min_clip_low
        self.min_high = min_clip_high
        self.clip = clip
        self.batch_level = clip is None

    def bind(self, sampled_logprobs_N: Tensor, batch: TokenBatch) -> M2PO:
        return M2PO(self.budget, self.min_low, self.min_high, self._solve(sampled_logprobs_N, batch))

    def _solve(self, sampled_logprobs_N: Tensor, batch: TokenBatch) -> M2POClip:
        behavior_N, teacher_N = float_like(
            sampled_logprobs_N, batch.behavior_logprobs, batch.teacher_sampled_logprobs
        )
        # unclamped, as the reference: an extreme token only enters through delta^2, never through exp
        delta_N = behavior_N - sampled_logprobs_N.detach()
        return m2po_clip(delta_N, teacher_N - behavior_N, self.budget, self.min_low, self.min_high)

    def __call__(self, student_logprobs_NV: Tensor, batch: TokenBatch) -> ObjectiveOutput:
        logprobs_N = student_logprobs_NV.gather(-1, batch.sampled_ids.long()[:, None])[:, 0]
        clip = self.clip if self.clip is not None else self._solve(logprobs_N, batch)
        behavior_N, teacher_N = float_like(
            logprobs_N, batch.behavior_logprobs, batch.teacher_sampled_logprobs
        )
        advantage_N = teacher_N - behavior_N
        log_ratio_N = clamped_log_ratio(logprobs_N, behavior_N)
        loss_N, clipped_N = clipped_surrogate(log_ratio_N.exp(), advantage_N, 1 - clip.low, 1 + clip.high)
        metrics = policy_metrics(logprobs_N, behavior_N, teacher_N, log_ratio_N, clipped=clipped_N)
        # log-ratios are clamped to +-LOG_RATIO_CLAMP anyway, so that value reads as "unconstrained"
        metrics["m2po_tau"] = min(clip.tau, LOG_RATIO_CLAMP)
        metrics["m2po_clip_low"] = clip.low
        metrics["m2po_clip_high"] = clip.high
        metrics["m2po_m2_before"] = clip.m2_before
        metrics["m2po_m2_after"] = clip.m2_after
        return ObjectiveOutput(loss_N, floats(metrics))
