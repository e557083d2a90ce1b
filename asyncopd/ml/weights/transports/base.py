"""The transport contract: a publisher (learner, rank 0) turns a state dict into a published version at a
location; a follower (each rollout worker) turns a location into weights inside its engine.

Invariants every transport keeps:
- `publish` returns only once the version is complete at its location; the caller announces it on the head
  (`asyncopd.ml.weights.head`) after that, so a follower never sees a location it cannot read yet.
- `load` either leaves the engine on exactly the published bits of `version` or raises; it raises
  `WeightSyncError` (with a reason) for anything wrong with what was published, so the follower loop can
  count it, recover and go on, and lets other exceptions (engine failures) through.
- `publish` is given the serving-dtype tensors' source, never keeps references to the caller's live
  parameters past the call (the optimizer changes them in place).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


class WeightPublisher(ABC):
    name: str
    dtype: torch.dtype  # what a version holds: the served dtype of every floating tensor

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @abstractmethod
    def publish(self, version: int, state: dict, config_json: str, owned: bool = False) -> str:
        """Write `state` (name -> tensor, any float dtype) as `version`; returns its location. `owned`: `state`
        is a snapshot already in `self.dtype` that nobody changes any more (`codec.served(..., copy=True)`), so
        a publisher that keeps the tensors (a delta base, the transfer server's held versions) keeps these
        instead of copying them: each copy is the whole model on rank 0's host, 140 GB for a 70B student."""

    def prune(self, keep_from: int) -> None:
        """Delete versions older than `keep_from` that nothing retained depends on."""
        from asyncopd.ml.weights.layout import prune

        prune(self.root, keep_from)

    def last_bytes(self) -> int:
        """Bytes the last `publish` wrote (the cost curve's third column)."""
        return 0

    def close(self) -> None:
        """Stop background work (the delta transport's repair responder)."""


class WeightFollower(ABC):
    name: str

    @abstractmethod
    def tensors(self, location: str) -> dict:
        """The served-dtype tensors of the version at `location` (name -> tensor), verified."""

    def load(self, location: str, version: int, engine) -> None:
        """Put the weights published at `location` into `engine` and set its version."""
        engine.load_tensors(self.tensors(location), version)

    def recover(self, location: str, version: int, timeout_s: float, stopped=lambda: False) -> bool:
        """After `load` raised WeightSyncError for `version`: try to make it loadable again (e.g. ask the
        publisher for a full copy) within `timeout_s`, giving up early once `stopped()`; True when a retry
        may now succeed."""
        return False

    def reset(self) -> None:
        """Forget cached state (a new job, or an engine rebuilt from the initial student)."""
