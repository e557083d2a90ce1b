from pydantic import Field

from asyncopd.settings import EngineSettings


class RolloutSettings(EngineSettings):
    """Rollout worker: student generation. Env prefix ASYNCOPD_ (Helm: rollout.config)."""

    max_batch_prompts: int = Field(16, ge=1, description="Prompt entries generated together per engine call.")
    weight_wait_s: float = Field(120.0, gt=0, description="Give up waiting for a fenced policy version after this.")
