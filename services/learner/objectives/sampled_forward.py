"""Forward KL(p_T || pi_theta) through single tokens instead of the teacher's top-K.

- Monte Carlo from teacher samples (forward_kl_mc): the teacher draws S tokens y' ~ p_T at each prefix
  while scoring; the loss is mean_s (log p_T(y'_s) - log pi_theta(y'_s)). Its value and its gradient
  -mean_s grad log pi_theta(y'_s) are unbiased for the full-vocabulary forward KL and its gradient, whoever
  generated the prefix -- no importance ratio, so staleness only changes which prefixes are visited, as for
  forward_kl_topk. The price is variance (1/S), where the top-K form pays bias instead.
- Token-level KL at the rollout's sampled token (token_level_kl): p_T(y)(log p_T(y) - log pi_theta(y)),
  y ~ pi_old. Not an estimate of the KL: in expectation it weights the forward-KL terms by pi_old(y), so
  its gradient is -sum_y pi_old(y) p_T(y) grad log pi_theta(y), which on policy vanishes only where pi_theta
  sits on tokens of equal (in practice: the highest) teacher probability -- it sharpens the student
  towards the teacher's mode rather than matching the teacher. Per step it pushes every sampled token up
  (weight p_T(y) >= 0) and none down: teacher-weighted imitation of the student's own samples.
"""

from __future__ import annotations

from torch import Tensor

from .base import Objective, ObjectiveOutput, TokenBatch, float_like, floats, stat


class ForwardKLMonteCarlo(Objective):
    """mean over the teacher's S draws of log p_T(y') - log pi_theta(y')."""

    def __init__(self, samples: int) -> None:
        self.samples = samples

    def __call__(self, student_logprobs_NV: Tensor, batch: TokenBatch) -> ObjectiveOutput:
        ids_NS, teacher_NS = batch.teacher_sample_ids, batch.teacher_sample_logprobs
        if ids_NS is None or teacher_NS is None or ids_NS.shape[1] != self.samples:
            got = None if ids_NS is None else ids_NS.shape[1]
            raise ValueError(
                f"forward_kl_mc samples={self.samples} needs {self.samples} teacher_sample_ids columns, got {got}"
            )
        student_NS = student_logprobs_NV.gather(-1, ids_NS.long())
        (teacher_NS,) = float_like(student_NS, teacher_NS)
        loss_N = (teacher_NS - student_NS).mean(-1)
        metrics = {
            "kl_estimate": stat(loss_N, "mean"),
            # how far the teacher's draws sit from the student: a low value means rare tokens for the student
            "student_logprob_of_teacher_samples": stat(student_NS, "mean"),
        }
        return ObjectiveOutput(loss_N, floats(metrics))


class TokenLevelKL(Objective):
    """p_T(y) (log p_T(y) - log pi_theta(y)) at the rollout's sampled token y (teacher weight detached)."""

    def __call__(self, student_logprobs_NV: Tensor, batch: TokenBatch) -> ObjectiveOutput:
        logprobs_N = student_logprobs_NV.gather(-1, batch.sampled_ids.long()[:, None])[:, 0]
        (teacher_N,) = float_like(logprobs_N, batch.teacher_sampled_logprobs)
        weight_N = teacher_N.exp()
        loss_N = weight_N * (teacher_N - logprobs_N)
        # no kl_estimate: the loss estimates no KL (module docstring); p_T(y) says how much of the batch the
        # teacher accepts, i.e. how much signal the step carries
        return ObjectiveOutput(loss_N, floats({"teacher_prob_of_sampled": stat(weight_N, "mean")}))
