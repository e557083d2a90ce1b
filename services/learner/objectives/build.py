"""From a validated job-spec objective to the tensor code that computes it."""

from __future__ import annotations

from asyncopd.objective_spec import (
    DecoupledPPOSpec,
    ForwardKLMonteCarloSpec,
    ForwardKLTopKSpec,
    M2POSpec,
    MixedSpec,
    ObjectiveSpec,
    ReverseKLMonteCarloSpec,
    ReverseKLRecomputeSpec,
    ReverseKLSampledSpec,
    ReverseKLTopKSpec,
    SkewedKLTopKSpec,
    TokenLevelKLSpec,
)

from .base import Objective
from .diagnostics import WithDiagnostics
from .kl_topk import BucketKL, ForwardKLTopK, ReverseKLTopK
from .mixed import Mixed
from .policy_gradient import SampledReverseKL, SampledTokensReverseKL
from .sampled_forward import ForwardKLMonteCarlo, TokenLevelKL
from .stabilizers import M2PO, DecoupledPPO


def build_objective(spec: ObjectiveSpec) -> Objective:
    """The objective, with the student diagnostics (entropy, leaked mass) added to its metrics."""
    return WithDiagnostics(build_loss(spec), teacher_support=not spec.needs_student_topk())


def build_loss(spec: ObjectiveSpec) -> Objective:
    """The objective alone (its own metrics only)."""
    match spec:
        case ForwardKLTopKSpec():
            return ForwardKLTopK(spec.tail, spec.token_clip)
        case ReverseKLTopKSpec():
            return ReverseKLTopK(spec.tail, spec.token_clip)
        case SkewedKLTopKSpec():
            return BucketKL(spec.alpha, spec.tail, spec.token_clip)
        case TokenLevelKLSpec():
            return TokenLevelKL()
        case ForwardKLMonteCarloSpec():
            return ForwardKLMonteCarlo(spec.samples)
        case ReverseKLSampledSpec():
            return SampledReverseKL(spec.correction, spec.clip_eps, spec.is_cap, spec.log_ratio_clamp)
        case ReverseKLRecomputeSpec():
            return SampledTokensReverseKL(spec.clip_eps, samples=1, correction=spec.correction, baseline=spec.baseline)
        case ReverseKLMonteCarloSpec():
            return SampledTokensReverseKL(
                spec.clip_eps, spec.samples, spec.correction, spec.advantage, spec.baseline
            )
        case DecoupledPPOSpec():
            return DecoupledPPO(spec.clip_eps, spec.behavior_cap)
        case M2POSpec():
            return M2PO(spec.second_moment_budget, spec.min_clip_low, spec.min_clip_high)
        case MixedSpec():
            return Mixed(spec.alpha, build_loss(spec.forward), build_loss(spec.reverse))
    raise TypeError(f"no objective for {type(spec).__name__}")
