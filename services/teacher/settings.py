from pydantic import Field

from asyncopd.settings import EngineSettings


class TeacherSettings(EngineSettings):
    """Teacher scorer. Env prefix ASYNCOPD_ (Helm: teacher.config)."""

    max_batch_samples: int = Field(64, ge=1, description="Rollouts scored together per engine call.")
