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

    def needs_teacher_topk(self) -> bool:
        """Whether the loss reads the top-K arrays (teacher_topk_ids / teacher_topk_logprobs)."""
        return False

    def needs_student_topk(self) -> bool:
        """Whether the rollout must return the student's own top-K ids per position, to be scored by the
        teacher and shipped in the top-K arrays instead of the teacher's top-K."""
        return False


class ForwardKLTopKSpec(_Spec):
    """KL(p_T || pi_theta) over the teacher's top-K tokens; the default objective."""

    kind: Literal["forward_kl_topk"] = "forward_kl_topk"
    tail: bool = Field(
        True,
        description="Add one bucket holding the mass outside the top-K (teacher's and student's): the "
        "loss is then the exact KL of the K+1-bucket coarse-graining, a lower bound on the full KL with "
        "zero gradient at student == teacher. False = the reference's raw top-K sum, which is neither.",
    )

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

    def needs_teacher_topk(self) -> bool:
        return True

    def needs_student_topk(self) -> bool:
        return self.support == "student"


class ReverseKLSampledSpec(_Spec):
    """Reverse KL as a policy gradient on the sampled token, advantage log p_T - log pi_old (tinker style)."""

    kind: Literal["reverse_kl_sampled"] = "reverse_kl_sampled"
    correction: Literal["none", "is", "ppo_clip", "truncated_is"] = Field(
        "ppo_clip",
        description="Off-policy correction of the ratio pi_theta/pi_old: none (treat samples as on-policy), "
        "is (plain importance ratio), ppo_clip (PPO clipped surrogate), truncated_is (ratio capped at "
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
    clip_eps: float | None = Field(
        0.2, gt=0.0, lt=1.0, description=CLIP_EPS_DESCRIPTION + " null = plain importance sampling."
    )


class ReverseKLMonteCarloSpec(_Spec):
    """ReverseKLRecompute averaged over several tokens per position drawn from pi_old: lower variance."""

    kind: Literal["reverse_kl_mc"] = "reverse_kl_mc"
    samples: int = Field(
        4,
        ge=2,
        le=1024,
        description="Tokens per position, the sampled one included (the rollout draws "
        "samples - 1 more from the student at each prefix; the teacher scores them all).",
    )
    clip_eps: float | None = Field(
        0.2, gt=0.0, lt=1.0, description=CLIP_EPS_DESCRIPTION + " null = plain importance sampling."
    )

    def mc_samples(self) -> int:
        return self.samples - 1


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
    """PPO with a per-batch adaptive log-ratio clip meeting a second-moment budget (M2PO)."""

    kind: Literal["m2po"] = "m2po"
    second_moment_budget: float = Field(
        0.04,
        gt=0.0,
        le=10.0,
        description="Budget for the mean of log(pi_theta/pi_old)^2 over the tokens "
        "PPO clipping would act on; the clip range is the widest one meeting it.",
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
