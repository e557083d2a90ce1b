"""The rollout pool interface behind `PUT /v1/pools/rollout`: one interface, a local-process backend here and a
Kubernetes Deployment backend in a cluster. Removing a worker is always a SIGTERM: it finishes and acks the
prompts it holds before exiting, so shrinking the pool loses nothing (a SIGKILLed worker's prompts are
reclaimed by the others after `reclaim_idle_ms`)."""

from __future__ import annotations

from abc import ABC, abstractmethod


class PoolError(RuntimeError):
    """Scaling failed in the backend; `status_code` is what the REST API answers."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code


class RolloutPool(ABC):
    @abstractmethod
    def desired(self) -> int: ...

    @abstractmethod
    def scale(self, replicas: int) -> int: ...

    def close(self) -> None:
        """Stop what this pool started."""
