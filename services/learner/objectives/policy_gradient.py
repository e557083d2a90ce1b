"""Reverse KL through sampled tokens, as a policy gradient with reward log p_T(y) - log pi(y).

Why the advantage matters: for y ~ pi_old and r = pi_theta(y)/pi_old(y),
    E_{pi_old}[ -A(y) grad r(y) ] = -E_{pi_theta}[ A(y) grad log pi_theta(y) ].
With A = log p_T - sg(log pi_theta) (recomputed at learner time) this is exactly grad KL(pi_theta || p_T),
whatever pi_old was. With the rollout's A = log p_T - log pi_old (tinker style) it is the gradient of
KL(pi_theta || p_T) - KL(pi_theta || pi_old) -- the stale sample also pushes the student away from the
policy that generated it, which is why that form degrades with staleness. Without the ratio (correction
"none", REINFORCE: -A grad log pi_theta) the expectation stays over pi_old, so even the recomputed advantage
gives E_{pi_old}[(log pi_theta - log p_T) grad log pi_theta]: exact only when pi_old is the current student.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from asyncopd.objective_spec import LOG_RATIO_CLAMP

from .base import Objective, ObjectiveOutput, TokenBatch, float_like, floats, stat
from .kl_topk import bucket_logprobs, reverse_terms_NB

Correction = Literal["none", "is", "ppo_clip", "truncated_is"]


def clamped_log_ratio(logprobs: Tensor, base_logprobs: Tensor, clamp: float = LOG_RATIO_CLAMP) -> Tensor:
    # exp of an unclamped log-ratio overflows on the rare token the two policies disagree wildly about
    return (logprobs - base_logprobs).clamp(-clamp, clamp)


def clipped_surrogate(
    ratio: Tensor, advantage: Tensor, low: float | Tensor, high: float | Tensor
) -> tuple[Tensor, Tensor]:
    """PPO's max(-A r, -A clip(r, low, high)), written as a selection so the clipped tokens are explicit
    (they keep the clipped value and get no gradient) and exact ties at r = 1 keep their full gradient."""
    clipped = ((advantage > 0) & (ratio > high)) | ((advantage < 0) & (ratio < low))
    loss = torch.where(clipped, -advantage * ratio.detach().clamp(low, high), -advantage * ratio)
    return loss, clipped


def on_policy_factor(logprobs: Tensor) -> Tensor:
    """Value 1, gradient grad log pi: turns -A * factor into REINFORCE without changing the loss value."""
    return torch.exp(logprobs - logprobs.detach())


def policy_metrics(
    logprobs: Tensor, behavior: Tensor, teacher: Tensor, log_ratio: Tensor, **flags: Tensor
) -> dict[str, Tensor | float]:
    """kl_estimate: E_{pi_old}[r (log pi_theta - log p_T)], unbiased for the current KL(pi_theta || p_T);
    behavior_kl_estimate: E_{pi_old}[log pi_old - log p_T], the rollout policy's KL; flags: fractions."""
    ratio = log_ratio.detach().exp()
    metrics: dict[str, Tensor | float] = {
        "kl_estimate": stat(ratio * (logprobs.detach() - teacher), "mean"),
        "behavior_kl_estimate": stat(behavior - teacher, "mean"),
        "is_ratio_mean": stat(ratio, "mean"),
        "is_ratio_max": stat(ratio, "max"),
        "is_ratio_min": stat(ratio, "min"),
    }
    metrics.update({f"{name}_frac": stat(flag, "mean") for name, flag in flags.items()})
    return metrics


class SampledReverseKL(Objective):
    """One sampled token per position, advantage log p_T(y) - log pi_old(y) from the rollout."""

    def __init__(
        self,
        correction: Correction = "ppo_clip",
        clip_eps: float = 0.2,
        is_cap: float = 5.0,
        log_ratio_clamp: float = LOG_RATIO_CLAMP,
    ) -> None:
        self.correction = correction
        self.clip_eps = clip_eps
        self.is_cap = is_cap
        self.log_ratio_clamp = log_ratio_clamp

    def __call__(self, student_logprobs_NV: Tensor, batch: TokenBatch) -> ObjectiveOutput:
        logprobs_N = student_logprobs_NV.gather(-1, batch.sampled_ids.long()[:, None])[:, 0]
        behavior_N, teacher_N = float_like(
            logprobs_N, batch.behavior_logprobs, batch.teacher_sampled_logprobs
        )
        advantage_N = teacher_N - behavior_N
        log_ratio_N = clamped_log_ratio(logprobs_N, behavior_N, self.log_ratio_clamp)
        ratio_N = log_ratio_N.exp()
        flags: dict[str, Tensor] = {}
        if self.correction == "none":
            loss_N = -advantage_N * on_policy_factor(logprobs_N)
        elif self.correction == "is":
            loss_N = -advantage_N * ratio_N
        elif self.correction == "ppo_clip":
            loss_N, flags["clipped"] = clipped_surrogate(
                ratio_N, advantage_N, 1 - self.clip_eps, 1 + self.clip_eps
            )
        else:  # truncated_is: cap the weight but keep the gradient, unlike clipping
            weight_N = ratio_N.detach().clamp_max(self.is_cap)
            loss_N = -advantage_N * weight_N * on_policy_factor(logprobs_N)
            flags["truncated"] = ratio_N > self.is_cap
        metrics = policy_metrics(logprobs_N, behavior_N, teacher_N, log_ratio_N, **flags)
        return ObjectiveOutput(loss_N, floats(metrics))


class SampledTokensReverseKL(Objective):
    """The policy-gradient surrogate over `samples` tokens per position -- the sampled one plus samples - 1
    from batch.mc_* -- averaged: reverse_kl_recompute (samples = 1) and reverse_kl_mc.

    advantage "recompute": A = log p_T(y) - sg(log pi_theta(y)); "rollout": A = log p_T(y) - log pi_old(y).
    correction "is": ratio pi_theta/pi_old, PPO-clipped at clip_eps (None = plain importance sampling);
    with the recomputed advantage and plain IS this is an unbiased gradient of KL(pi_theta || p_T).
    correction "none" (the reference's use_importance_sampling off): ratio pi_theta/sg(pi_theta) -- value 1,
    gradient grad log pi_theta -- unbiased only when pi_old is the current student.
    baseline "topk": A - b with b = -KL(pi_theta || p_T) over the teacher's top-K + tail bucket, detached. b
    does not depend on the sampled tokens and E_{pi_old}[r grad log pi_theta] = E_{pi_theta}[grad log
    pi_theta] = 0, so the expected gradient is unchanged wherever the ratio corrects (or on policy); without
    it, a token the teacher likes as much as the student (A ~ 0) gets no push while a rejected one (A << 0)
    is pushed down and its mass spreads over every other token, rarely-sampled junk included.
    """

    def __init__(
        self,
        clip_eps: float | None = 0.2,
        samples: int = 1,
        correction: Literal["is", "none"] = "is",
        advantage: Literal["recompute", "rollout"] = "recompute",
        baseline: Literal["none", "topk"] = "none",
    ) -> None:
        self.clip_eps = clip_eps
        self.samples = samples
        self.correction = correction
        self.advantage = advantage
        self.baseline = baseline

    def __call__(self, student_logprobs_NV: Tensor, batch: TokenBatch) -> ObjectiveOutput:
        ids_NS, behavior_NS, teacher_NS = self._samples(batch)
        logprobs_NS = student_logprobs_NV.gather(-1, ids_NS.long())
        behavior_NS, teacher_NS = float_like(logprobs_NS, behavior_NS, teacher_NS)
        policy_NS = logprobs_NS.detach() if self.advantage == "recompute" else behavior_NS
        advantage_NS = teacher_NS - policy_NS
        extra: dict[str, Tensor | float] = {}
        if self.baseline == "topk":
            teacher_NB, student_NB, _, _ = bucket_logprobs(student_logprobs_NV.detach(), batch, tail=True)
            position_baseline_N = -reverse_terms_NB(teacher_NB, student_NB).sum(-1)
            advantage_NS = advantage_NS - position_baseline_N[:, None]
            extra["baseline_mean"] = stat(position_baseline_N, "mean")
        log_ratio_NS = clamped_log_ratio(logprobs_NS, behavior_NS)
        flags: dict[str, Tensor] = {}
        if self.correction == "none":
            loss_NS = -advantage_NS * on_policy_factor(logprobs_NS)
        elif self.clip_eps is None:
            loss_NS = -advantage_NS * log_ratio_NS.exp()
        else:
            loss_NS, flags["clipped"] = clipped_surrogate(
                log_ratio_NS.exp(), advantage_NS, 1 - self.clip_eps, 1 + self.clip_eps
            )
        metrics = policy_metrics(logprobs_NS, behavior_NS, teacher_NS, log_ratio_NS, **flags) | extra
        return ObjectiveOutput(loss_NS.mean(-1), floats(metrics))

    def _samples(self, batch: TokenBatch) -> tuple[Tensor, Tensor, Tensor]:
        """[N, samples] ids, behaviour and teacher log-probs: the sampled token first, then batch.mc_*."""
        ids, behavior, teacher = batch.sampled_ids, batch.behavior_logprobs, batch.teacher_sampled_logprobs
        if self.samples == 1:
            return ids[:, None], behavior[:, None], teacher[:, None]
        if batch.mc_ids is None or batch.mc_ids.shape[1] != self.samples - 1:
            got = None if batch.mc_ids is None else batch.mc_ids.shape[1]
            raise ValueError(
                f"reverse_kl_mc samples={self.samples} needs {self.samples - 1} mc_ids columns, got {got}"
            )
        mc_behavior, mc_teacher = batch.mc_behavior_logprobs, batch.mc_teacher_logprobs
        assert mc_behavior is not None and mc_teacher is not None  # TokenBatch keeps the three together
        return (
            torch.cat([ids[:, None], batch.mc_ids.to(ids.dtype)], dim=1),
            torch.cat([behavior[:, None], mc_behavior.to(behavior.dtype)], dim=1),
            torch.cat([teacher[:, None], mc_teacher.to(teacher.dtype)], dim=1),
        )
