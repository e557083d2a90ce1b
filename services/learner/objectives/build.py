"""From a validated job-spec objective to the tensor code that computes it."""

from __future__ import annotations

from asyncopd.objective_spec import (
    DecoupledPPOSpec,
    ForwardKLTopKSpec,
    M2POSpec,
    MixedSpec,
    ObjectiveSpec,
    ReverseKLMonteCarloSpec,
    ReverseKLRecomputeSpec,
    ReverseKLSampledSpec,
    ReverseKLTopKSpec,
)

from .base import Objective
from .kl_topk import ForwardKLTopK, ReverseKLTopK
from .mixed import Mixed
from .policy_gradient import RecomputedReverseKL, SampledReverseKL
from .stabilizers import M2PO, DecoupledPPO


def build_objective(spec: ObjectiveSpec) -> Objective:
    match spec:
        case ForwardKLTopKSpec():
            return ForwardKLTopK(tail=spec.tail)
        case ReverseKLTopKSpec():
            return ReverseKLTopK(tail=spec.tail)
        case ReverseKLSampledSpec():
            return SampledReverseKL(spec.correction, spec.clip_eps, spec.is_cap, spec.log_ratio_clamp)
        case ReverseKLRecomputeSpec():
            return RecomputedReverseKL(spec.clip_eps)
        case ReverseKLMonteCarloSpec():
            return RecomputedReverseKL(spec.clip_eps, samples=spec.samples)
        case DecoupledPPOSpec():
            return DecoupledPPO(spec.clip_eps, spec.behavior_cap)
        case M2POSpec():
            return M2PO(spec.second_moment_budget)
        case MixedSpec():
            return Mixed(spec.alpha, build_objective(spec.forward), build_objective(spec.reverse))
    raise TypeError(f"no objective for {type(spec).__name__}")
