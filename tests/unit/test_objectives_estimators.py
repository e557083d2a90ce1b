"""The sampled estimators as estimators of grad KL(pi_theta || p_T), the current student's reverse KL.

Exact enumeration over a tiny vocabulary gives E_{y ~ pi_old}[grad loss(y)] with no sampling error;
averaging many real samples checks the same thing the way the learner sees it; the multi-sample MC
objective must show its lower variance on the same input."""

import itertools

import pytest
import torch

from asyncopd.objective_spec import (
    DecoupledPPOSpec,
    M2POSpec,
    ReverseKLMonteCarloSpec,
    ReverseKLRecomputeSpec,
    ReverseKLSampledSpec,
)
from services.learner.objectives import TokenBatch, build_objective

torch.set_num_threads(1)
F64 = torch.float64
N, V = 3, 5


def policies(staleness, seed=0):
    """Student logits z, teacher log p_T, behaviour log pi_old = student logits perturbed by `staleness`."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(N, V, generator=gen, dtype=F64)
    teacher = (torch.randn(N, V, generator=gen, dtype=F64) * 1.5).log_softmax(-1)
    behavior = (z + staleness * torch.randn(N, V, generator=gen, dtype=F64)).log_softmax(-1)
    return z, teacher, behavior


def grad_of(fn, z):
    z = z.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(fn(z.log_softmax(-1)), z)
    return grad


def exact_reverse_kl_grad(z, teacher):
    return grad_of(lambda lp: (lp.exp() * (lp - teacher)).sum(), z)


def batch_for(rows, ids_RS, teacher, behavior):
    """TokenBatch for rows (position index per row) and S tokens per row: first sampled, rest MC."""
    pos = rows[:, None]
    extra = {}
    if ids_RS.shape[1] > 1:
        mc = ids_RS[:, 1:]
        extra = dict(mc_ids=mc, mc_behavior_logprobs=behavior[pos, mc], mc_teacher_logprobs=teacher[pos, mc])
    y = ids_RS[:, 0]
    return TokenBatch(
        sampled_ids=y,
        behavior_logprobs=behavior[rows, y],
        teacher_sampled_logprobs=teacher[rows, y],
        teacher_topk_ids=y[:, None],
        teacher_topk_logprobs=teacher[rows, y][:, None],
        **extra,
    )


def enumerated_expected_grad(spec, z, teacher, behavior):
    """Sum over every position and every tuple of tokens of pi_old(tuple) * grad loss(tuple)."""
    samples = spec.mc_samples() + 1
    tuples = torch.tensor(list(itertools.product(range(V), repeat=samples)))  # [V^S, S]
    rows = torch.arange(N).repeat_interleave(len(tuples))
    ids = tuples.repeat(N, 1)
    weight = behavior[rows[:, None], ids].sum(-1).exp()  # the tuple's probability under pi_old
    batch = batch_for(rows, ids, teacher, behavior)
    objective = build_objective(spec)
    return grad_of(lambda lp: (objective(lp[rows], batch).loss * weight).sum(), z)


UNBIASED_AT_ANY_STALENESS = [
    ReverseKLRecomputeSpec(clip_eps=None),
    ReverseKLMonteCarloSpec(samples=2, clip_eps=None),
    ReverseKLMonteCarloSpec(samples=3, clip_eps=None),
]


@pytest.mark.parametrize("spec", UNBIASED_AT_ANY_STALENESS, ids=lambda s: f"{s.kind}-{s.mc_samples() + 1}")
def test_recomputed_importance_sampled_gradient_is_exact_in_expectation(spec):
    z, teacher, behavior = policies(staleness=1.0)
    expected = enumerated_expected_grad(spec, z, teacher, behavior)
    torch.testing.assert_close(expected, exact_reverse_kl_grad(z, teacher), rtol=1e-10, atol=1e-12)


ON_POLICY = [
    ReverseKLSampledSpec(correction="none"),
    ReverseKLSampledSpec(correction="is"),
    ReverseKLSampledSpec(correction="ppo_clip"),
    ReverseKLSampledSpec(correction="truncated_is"),
    ReverseKLRecomputeSpec(),
    ReverseKLMonteCarloSpec(samples=2),
    DecoupledPPOSpec(),
    M2POSpec(),
]


@pytest.mark.parametrize("spec", ON_POLICY, ids=lambda s: f"{s.kind}-{getattr(s, 'correction', '')}")
def test_every_sampled_objective_is_unbiased_on_policy(spec):
    # staleness 0: pi_old == pi_theta, every ratio is 1, no clip or cap binds
    z, teacher, _ = policies(staleness=0.0)
    expected = enumerated_expected_grad(spec, z, teacher, z.log_softmax(-1))
    torch.testing.assert_close(expected, exact_reverse_kl_grad(z, teacher), rtol=1e-10, atol=1e-12)


def test_ppo_clip_is_unbiased_while_every_ratio_stays_inside_the_clip():
    z, teacher, behavior = policies(staleness=0.05)
    ratio = z.log_softmax(-1) - behavior
    assert ratio.abs().max() < 0.18  # inside [log 0.8, log 1.2]
    expected = enumerated_expected_grad(ReverseKLRecomputeSpec(clip_eps=0.2), z, teacher, behavior)
    torch.testing.assert_close(expected, exact_reverse_kl_grad(z, teacher), rtol=1e-10, atol=1e-12)
    # ...and trades bias for safety once staleness pushes ratios past it
    z, teacher, behavior = policies(staleness=1.0)
    clipped = enumerated_expected_grad(ReverseKLRecomputeSpec(clip_eps=0.2), z, teacher, behavior)
    assert (clipped - exact_reverse_kl_grad(z, teacher)).abs().max() > 1e-2


@pytest.mark.parametrize("correction", ["is", "truncated_is"])
def test_stale_rollout_advantage_estimates_a_different_objective(correction):
    # With A = log p_T - log pi_old, E[grad] = grad [KL(pi||p_T) - KL(pi||pi_old)] (pi_old held fixed):
    # the staleness bias the AsyncOPD paper measures, exactly.
    z, teacher, behavior = policies(staleness=1.0)
    spec = ReverseKLSampledSpec(correction=correction, is_cap=50.0)  # cap far above every ratio here
    expected = enumerated_expected_grad(spec, z, teacher, behavior)
    shifted = grad_of(lambda lp: (lp.exp() * (behavior - teacher)).sum(), z)
    torch.testing.assert_close(expected, shifted, rtol=1e-10, atol=1e-12)
    assert (expected - exact_reverse_kl_grad(z, teacher)).abs().max() > 5e-2


def per_sample_grads(spec, z, teacher, behavior, replicates, seed):
    """One gradient (w.r.t. that position's logits) per replicate: rows are independent draws."""
    samples = spec.mc_samples() + 1
    gen = torch.Generator().manual_seed(seed)
    rows = torch.arange(N).repeat(replicates)
    ids = torch.multinomial(behavior[rows].exp(), samples, replacement=True, generator=gen)
    batch = batch_for(rows, ids, teacher, behavior)
    z_rows = z[rows].clone().requires_grad_(True)
    (grads,) = torch.autograd.grad(build_objective(spec)(z_rows.log_softmax(-1), batch).loss.sum(), z_rows)
    return grads.reshape(replicates, N, V)


def z_scores(grads, target):
    mean = grads.mean(0)
    stderr = grads.std(0) / grads.shape[0] ** 0.5
    return ((mean - target) / stderr.clamp_min(1e-12)).abs()


def test_averaging_sampled_gradients_converges_to_the_exact_gradient():
    z, teacher, behavior = policies(staleness=1.0)
    exact = exact_reverse_kl_grad(z, teacher)
    recompute = per_sample_grads(ReverseKLRecomputeSpec(clip_eps=None), z, teacher, behavior, 40_000, seed=1)
    assert z_scores(recompute, exact).max() < 4.5
    # the stale-advantage estimator fails the very same check
    stale = per_sample_grads(ReverseKLSampledSpec(correction="is"), z, teacher, behavior, 40_000, seed=1)
    assert z_scores(stale, exact).max() > 10


def test_more_mc_samples_per_position_lower_the_gradient_variance():
    z, teacher, behavior = policies(staleness=0.5)
    exact = exact_reverse_kl_grad(z, teacher)
    single = per_sample_grads(ReverseKLRecomputeSpec(clip_eps=None), z, teacher, behavior, 20_000, seed=2)
    multi = per_sample_grads(
        ReverseKLMonteCarloSpec(samples=4, clip_eps=None), z, teacher, behavior, 20_000, seed=3
    )
    ratio = (multi.var(0).sum() / single.var(0).sum()).item()
    assert 0.2 < ratio < 0.3  # four i.i.d. tokens: a quarter of the variance
    assert z_scores(multi, exact).max() < 4.5
