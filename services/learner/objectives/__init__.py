"""The learner's OPD objectives: per-token losses over the current student's log-probs.

Start at `build_objective(spec)` (spec from asyncopd.objective_spec) and `chunked_student_logprobs_loss`;
docs/objectives.md has the formulas and when to use which.
"""

from .base import Objective, ObjectiveOutput, TokenBatch, flatten_completion, merge_metrics
from .build import build_loss, build_objective
from .chunked import chunked_student_logprobs_loss, sampled_token_logprobs

__all__ = [
    "Objective",
    "ObjectiveOutput",
    "TokenBatch",
    "build_loss",
    "build_objective",
    "chunked_student_logprobs_loss",
    "flatten_completion",
    "merge_metrics",
    "sampled_token_logprobs",
]
