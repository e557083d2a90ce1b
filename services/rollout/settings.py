from pydantic import Field

from asyncopd.settings import EngineSettings, WeightsTransportSettings


class RolloutSettings(EngineSettings, WeightsTransportSettings):
    """Rollout worker: student generation. Env prefix ASYNCOPD_ (Helm: rollout.config)."""

    max_batch_prompts: int = Field(16, ge=1, description="Prompt entries generated together per engine call.")
    weight_wait_s: float = Field(120.0, gt=0, description="Give up waiting for a fenced policy version after this.")
    reload_lag: int = Field(0, ge=0, description="Load a newer policy only once it is more than this many versions "
                            "ahead of the loaded one; a batch's version fence always forces it. 0 follows every "
                            "version; larger values trade sample freshness (still within max_staleness) for fewer "
                            "reloads.")
    weights_transfer_join_s: float = Field(5.0, gt=0, description="nccl transport: how long a worker waits for the "
                                           "learner to start a transfer round for the version it wants before "
                                           "loading it from weights_fallback.")
