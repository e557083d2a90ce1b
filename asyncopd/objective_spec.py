"""What the learner optimises, as a job-spec value: one pydantic model per objective kind.

Torch-free on purpose: the coordinator validates job specs with these models and must not import torch.
The learner turns a spec into tensor code with `services.learner.objectives.build_objective`.
Formulas, advice and the paper's findings: docs/objectives.md.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

CLIP_EPS_DESCRIPTION = "PPO clip range: the ratio is clipped to [1 - clip_eps, 1 + clip_eps]."
LOG_RATIO_CLAMP = 20.0


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def mc_samples(self) -> int:
        """Extra tokens per completion position the rollout must draw from the student and the teacher
        must score (beyond the sampled token)."""
        return 0

    def teacher_samples(self) -> int:
        """Tokens per completion position the teacher must draw from its own distribution while scoring
        (forward_kl_mc); the learner then needs only the student's log-probs of them."""
        return 0

    def needs_teacher_topk(self) -> bool:
        """Whether the loss reads the top-K arrays (support_ids / teacher_support_logprobs)."""
        return False

    def needs_student_topk(self) -> bool:
        """Whether the rollout must return the student's own top-K ids per position, to be scored by the
        teacher and shipped in the top-K arrays instead of the teacher's top-K."""
        return False


TOKEN_CLIP_DESCRIPTION = (
    "Clip each bucket's term of the sum from above at this value before summing (the reference's "
    "token_clip; OPSD uses 0.05): a term above it keeps the value token_clip and loses its gradient, so no "
    "single token dominates. null = no clip. A clipped loss is no longer a divergence (docs/objectives.md)."
)
TAIL_DESCRIPTION = (
    "Add one bucket holding the mass outside the top-K (teacher's and student's): the loss is then the "
    "exact KL of the K+1-bucket coarse-graining, a lower bound on the full KL with zero gradient at "
    "student == teacher. False = the reference's raw top-K sum, which is neither."
)


class ForwardKLTopKSpec(_Spec):
    """KL(p_T || pi_theta) over the teacher's top-K tokens; the default objective."""

    kind: Literal["forward_kl_topk"] = "forward_kl_topk"
    tail: bool = Field(True, description=TAIL_DESCRIPTION)
    token_clip: float | None = Field(None, gt=0.0, description=TOKEN_CLIP_DESCRIPTION)

    def needs_teacher_topk(self) -> bool:
        return True


class ReverseKLTopKSpec(_Spec):
    """KL(pi_theta || p_T) over a support of K tokens per position."""

    kind: Literal["reverse_kl_topk"] = "reverse_kl_topk"
    support: Literal["teacher", "student"] = Field(
        "teacher",
        description="Which K tokens: the teacher's top-K, or the rollout student's top-K scored by the "
        "teacher (shipped in the same top-K arrays, so the loss code is identical).",
    )
    tail: bool = Field(
        True,
        description="Add one bucket for the mass outside the support, as in forward_kl_topk; without it "
        "the sum ignores all student mass outside the support and badly underestimates the KL.",
    )
    token_clip: float | None = Field(None, gt=0.0, description=TOKEN_CLIP_DESCRIPTION)

    def needs_teacher_topk(self) -> bool:
        return True

    def needs_student_topk(self) -> bool:
        return self.support == "student"


class SkewedKLTopKSpec(_Spec):
    """alpha * KL(p_T || pi_theta) + (1 - alpha) * KL(pi_theta || p_T), both over the teacher's top-K, mixed
    per bucket (the reference's skewed_kl)."""

    kind: Literal["skewed_kl_topk"] = "skewed_kl_topk"
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="Weight of the forward term (1 = forward_kl_topk).")
    tail: bool = Field(True, description=TAIL_DESCRIPTION)
    token_clip: float | None = Field(
        None, gt=0.0, description=TOKEN_CLIP_DESCRIPTION + " Applied to the mixed term of each bucket."
    )

    def needs_teacher_topk(self) -> bool:
        return True


class TokenLevelKLSpec(_Spec):
    """p_T(y)·(log p_T(y) − log pi_theta(y)) at the rollout's sampled token only (the reference's
    token_level_kl): one teacher log-prob per position, but a biased target (docs/objectives.md)."""

    kind: Literal["token_level_kl"] = "token_level_kl"


class ForwardKLMonteCarloSpec(_Spec):
    """KL(p_T || pi_theta) estimated from tokens the teacher draws from its own distribution at each prefix:
    mean over them of log p_T(y') − log pi_theta(y'). Unbiased in value and gradient."""

    kind: Literal["forward_kl_mc"] = "forward_kl_mc"
    samples: int = Field(
        4,
        ge=1,
        le=1024,
        description="Tokens the teacher draws per position (with replacement, temperature 1) while scoring.",
    )

    def teacher_samples(self) -> int:
        return self.samples


CORRECTION_DESCRIPTION = (
    "is: weight by the importance ratio pi_theta/pi_old (PPO-clipped at clip_eps, plain with clip_eps null). "
    "none: the reference's use_importance_sampling off: ratio pi_theta/sg(pi_theta), value 1, gradient "
    "grad log pi_theta (REINFORCE, samples treated as drawn from the current student)."
)


BASELINE_DESCRIPTION = (
    "Per-position baseline subtracted from the advantage: none, or topk: E_{y~pi_theta}[A] over the teacher's "
    "top-K + tail bucket, i.e. minus the bucketed reverse KL at that position (detached). It does not depend "
    "on the sampled token, so with correction is (or on policy) the gradient stays unbiased, while tokens the "
    "teacher finds as likely as the student now get pushed up instead of nothing (docs/objectives.md)."
)


class ReverseKLSampledSpec(_Spec):
    """Reverse KL as a policy gradient on the sampled token, advantage log p_T - log pi_old (tinker style)."""

    kind: Literal["reverse_kl_sampled"] = "reverse_kl_sampled"
    correction: Literal["none", "is", "ppo_clip", "truncated_is"] = Field(
        "ppo_clip",
        description="Off-policy correction of the ratio pi_theta/pi_old: none (treat samples as on-policy, "
        "keeping the rollout's advantage; the reference's no-IS form is reverse_kl_recompute with correction "
        "none), is (plain importance ratio), ppo_clip (PPO clipped surrogate), truncated_is (ratio capped at "
        "is_cap, gradient kept).",
    )
    clip_eps: float = Field(0.2, gt=0.0, lt=1.0, description=CLIP_EPS_DESCRIPTION + " Used by ppo_clip.")
    is_cap: float = Field(5.0, gt=1.0, description="Cap on the importance ratio. Used by truncated_is.")
    log_ratio_clamp: float = Field(
        LOG_RATIO_CLAMP, gt=0.0, le=80.0, description="log(pi_theta/pi_old) is clamped to +-this before exp."
    )


class ReverseKLRecomputeSpec(_Spec):
    """Sampled reverse KL with the advantage recomputed at learner time: log p_T - sg(log pi_theta)."""

    kind: Literal["reverse_kl_recompute"] = "reverse_kl_recompute"
    correction: Literal["is", "none"] = Field("is", description=CORRECTION_DESCRIPTION)
    clip_eps: float | None = Field(
        0.2, gt=0.0, lt=1.0, description=CLIP_EPS_DESCRIPTION + " null = plain importance sampling."
    )
    baseline: Literal["none", "topk"] = Field("none", description=BASELINE_DESCRIPTION)

    def needs_teacher_topk(self) -> bool:
        return self.baseline == "topk"


class ReverseKLMonteCarloSpec(_Spec):
    """The sampled reverse-KL surrogate averaged over several tokens per position drawn from pi_old: lower
    variance (the reference's multi_sample_policy_gradient_kl)."""

    kind: Literal["reverse_kl_mc"] = "reverse_kl_mc"
    samples: int = Field(
        4,
        ge=2,
        le=1024,
        description="Tokens per position, the sampled one included (the rollout draws "
        "samples - 1 more from the student at each prefix; the teacher scores them all).",
    )
    advantage: Literal["recompute", "rollout"] = Field(
        "recompute",
        description="recompute: log p_T - sg(log pi_theta), at learner time. rollout: log p_T - log pi_old, "
        "from the rollout (the reference's default, pg_online_advantage off; degrades with staleness).",
    )
    correction: Literal["is", "none"] = Field("is", description=CORRECTION_DESCRIPTION)
    clip_eps: float | None = Field(
        0.2, gt=0.0, lt=1.0, description=CLIP_EPS_DESCRIPTION + " null = plain importance sampling."
    )
    baseline: Literal["none", "topk"] = Field("none", description=BASELINE_DESCRIPTION)

    def mc_samples(self) -> int:
        return self.samples - 1

    def needs_teacher_topk(self) -> bool:
        return self.baseline == "topk"


class DecoupledPPOSpec(_Spec):
    """AReaL's decoupled PPO: clip against a proximal policy, reweight by a capped pi_prox/pi_old."""

    kind: Literal["decoupled_ppo"] = "decoupled_ppo"
    clip_eps: float = Field(
        0.2, gt=0.0, lt=1.0, description=CLIP_EPS_DESCRIPTION + " Ratio is pi_theta/pi_prox."
    )
    behavior_cap: float = Field(
        5.0, gt=1.0, description="Tokens whose behaviour weight pi_prox/pi_old exceeds this are dropped."
    )


class M2POSpec(_Spec):
    """PPO with a per-batch clip range from a second-moment budget on the log-ratios (M2PO, as the AsyncOPD
    reference runs it)."""

    kind: Literal["m2po"] = "m2po"
    second_moment_budget: float = Field(
        0.04,
        gt=0.0,
        le=10.0,
        description="Budget for the mean of log(pi_old/pi_theta)^2 over the tokens PPO clipping would act "
        "on; the bound is the largest observed one whose capped second moment stays below it.",
    )
    min_clip_low: float = Field(
        0.3, ge=0.0, lt=1.0, description="Floor on the lower clip margin: the ratio's lower clip is at most "
        "1 - min_clip_low, however tight the budget (the reference's pg_m2po_miniclip_low).",
    )
    min_clip_high: float = Field(
        0.5, ge=0.0, description="Floor on the upper clip margin: the ratio's upper clip is at least "
        "1 + min_clip_high (the reference's pg_m2po_miniclip_high).",
    )


class MixedSpec(_Spec):
    """alpha * forward_kl_topk + (1 - alpha) * reverse_kl_recompute."""

    kind: Literal["mixed"] = "mixed"
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="Weight of the forward-KL term.")
    forward: ForwardKLTopKSpec = Field(default_factory=ForwardKLTopKSpec, description="The forward term.")
    reverse: ReverseKLRecomputeSpec = Field(
        default_factory=ReverseKLRecomputeSpec, description="The reverse term."
    )

    def needs_teacher_topk(self) -> bool:
        return True


ObjectiveSpec = Annotated[
    ForwardKLTopKSpec
    | ReverseKLTopKSpec
    | SkewedKLTopKSpec
    | TokenLevelKLSpec
    | ForwardKLMonteCarloSpec
    | ReverseKLSampledSpec
    | ReverseKLRecomputeSpec
    | ReverseKLMonteCarloSpec
    | DecoupledPPOSpec
    | M2POSpec
    | MixedSpec,
    Field(discriminator="kind"),
]

DEFAULT_OBJECTIVE: ObjectiveSpec = ForwardKLTopKSpec()

_ADAPTER: TypeAdapter[ObjectiveSpec] = TypeAdapter(ObjectiveSpec)


def parse_objective(data: object) -> ObjectiveSpec:
    """Validate a mapping such as `{"kind": "m2po", "second_moment_budget": 0.04}`; raises ValidationError."""
    return _ADAPTER.validate_python(data)
