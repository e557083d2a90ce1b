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


@dataclass(frozen=True)
class M2POBound:
    """The batch's log-ratio bound tau and the second moment of the harmful log-ratios before/after."""

    tau: float
    m2_before: float
    m2_after: float


def solve_m2po_bound(log_ratio_N: Tensor, advantage_N: Tensor, budget: float) -> M2POBound:
    """Widest tau with mean(min(delta^2, tau^2)) over harmful tokens <= budget, delta = log(pi_theta/pi_old).

    Harmful tokens are those PPO clipping acts on (A > 0 and r > 1, or A < 0 and r < 1); the others are
    moving away from the trust region's edge anyway. Clipping r to [e^-tau, e^tau] caps their delta at tau.
    """
    harmful = ((advantage_N > 0) & (log_ratio_N > 0)) | ((advantage_N < 0) & (log_ratio_N < 0))
    delta2 = log_ratio_N.detach()[harmful].double().square().sort().values
    n = delta2.numel()
    if n == 0:
        return M2POBound(math.inf, 0.0, 0.0)
    m2_before = delta2.mean().item()
    if m2_before <= budget:
        return M2POBound(math.inf, m2_before, m2_before)
    # Keep the k smallest delta^2 as they are and cap the n - k largest at tau^2; the right k is the
    # first one whose solution does not exceed the next delta^2 (sum of min(delta^2, t) grows with t).
    kept_sum = torch.cat([delta2.new_zeros(1), delta2.cumsum(0)[:-1]])
    k = torch.arange(n, device=delta2.device)
    tau2 = (budget * n - kept_sum) / (n - k)
    first = int((tau2 <= delta2).nonzero()[0])
    return M2POBound(math.sqrt(max(tau2[first].item(), 0.0)), m2_before, budget)


class M2PO(Objective):
    """PPO surrogate (advantage log p_T - log pi_old) with the clip range [e^-tau, e^tau] chosen per batch
    by `solve_m2po_bound`, so only the outliers that blow the second-moment budget lose their gradient."""

    batch_level = True

    def __init__(self, second_moment_budget: float = 0.04, bound: M2POBound | None = None) -> None:
        self.budget = second_moment_budget
        self.bound = bound
        self.batch_level = bound is None

    def bind(self, sampled_logprobs_N: Tensor, batch: TokenBatch) -> M2PO:
        return M2PO(self.budget, self._solve(sampled_logprobs_N, batch))

    def _solve(self, sampled_logprobs_N: Tensor, batch: TokenBatch) -> M2POBound:
        behavior_N, teacher_N = float_like(
            sampled_logprobs_N, batch.behavior_logprobs, batch.teacher_sampled_logprobs
        )
        log_ratio_N = clamped_log_ratio(sampled_logprobs_N.detach(), behavior_N)
        return solve_m2po_bound(log_ratio_N, teacher_N - behavior_N, self.budget)

    def __call__(self, student_logprobs_NV: Tensor, batch: TokenBatch) -> ObjectiveOutput:
        logprobs_N = student_logprobs_NV.gather(-1, batch.sampled_ids.long()[:, None])[:, 0]
        bound = self.bound if self.bound is not None else self._solve(logprobs_N, batch)
        behavior_N, teacher_N = float_like(
            logprobs_N, batch.behavior_logprobs, batch.teacher_sampled_logprobs
        )
        advantage_N = teacher_N - behavior_N
        log_ratio_N = clamped_log_ratio(logprobs_N, behavior_N)
        loss_N, clipped_N = clipped_surrogate(
            log_ratio_N.exp(), advantage_N, math.exp(-bound.tau), math.exp(bound.tau)
        )
        metrics = policy_metrics(logprobs_N, behavior_N, teacher_N, log_ratio_N, clipped=clipped_N)
        # log-ratios are clamped to +-LOG_RATIO_CLAMP anyway, so that value reads as "unconstrained"
        metrics["m2po_tau"] = min(bound.tau, LOG_RATIO_CLAMP)
        metrics["m2po_m2_before"] = bound.m2_before
        metrics["m2po_m2_after"] = bound.m2_after
        return ObjectiveOutput(loss_N, floats(metrics))
