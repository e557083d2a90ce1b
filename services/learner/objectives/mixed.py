"""A convex mix of a forward and a reverse objective: mode-covering from the teacher's top-K plus the
mode-seeking on-policy signal, each with its own metrics under a prefix."""

from __future__ import annotations

from torch import Tensor

from .base import Objective, ObjectiveOutput, TokenBatch


class Mixed(Objective):
    """alpha * forward(student) + (1 - alpha) * reverse(student)."""

    def __init__(self, alpha: float, forward: Objective, reverse: Objective) -> None:
        self.alpha = alpha
        self.forward = forward
        self.reverse = reverse
        self.batch_level = forward.batch_level or reverse.batch_level

    def bind(self, sampled_logprobs_N: Tensor, batch: TokenBatch) -> Mixed:
        return Mixed(
            self.alpha, self.forward.bind(sampled_logprobs_N, batch), self.reverse.bind(sampled_logprobs_N, batch)
        )

    def __call__(self, student_logprobs_NV: Tensor, batch: TokenBatch) -> ObjectiveOutput:
        fwd = self.forward(student_logprobs_NV, batch)
        rev = self.reverse(student_logprobs_NV, batch)
        metrics = {f"forward_{k}": v for k, v in fwd.metrics.items()}
        metrics.update({f"reverse_{k}": v for k, v in rev.metrics.items()})
        return ObjectiveOutput(self.alpha * fwd.loss + (1 - self.alpha) * rev.loss, metrics)
