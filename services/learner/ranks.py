"""Rank 0 drives the learner's other ranks with typed operations, so every collective (the step's all-reduce,
ZeRO-3 gathers, checkpoint writes) runs on all ranks in the same order.

Rank 0 alone reads Redis; for each operation it broadcasts the operation object, then applies it to its own
`Trainer`. Followers (`follow`) receive operations and apply them until `Shutdown`. An operation is a small
dataclass whose `apply` calls the trainer: adding one means adding a class here, never a method name string.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist

from asyncopd.ml.weights.background import Announce
from asyncopd.state import ActiveJob
from asyncopd.streams import ScoredEntry
from services.learner.settings import LearnerSettings
from services.learner.trainer import StepResult, Trainer


@dataclass(frozen=True)
class Step:
    entries: list[ScoredEntry]

    def apply(self, trainer: Trainer) -> StepResult:
        # an all-stale batch still advances the schedule, with no update applied
        return trainer.step(self.entries) if self.entries else trainer.skip()


@dataclass(frozen=True)
class Publish:
    def apply(self, trainer: Trainer) -> None:
        trainer.publish()


@dataclass(frozen=True)
class Checkpoint:
    def apply(self, trainer: Trainer) -> None:
        trainer.checkpoint()


@dataclass(frozen=True)
class Export:
    def apply(self, trainer: Trainer) -> Path:
        return trainer.export()


@dataclass(frozen=True)
class Start:
    job: ActiveJob


@dataclass(frozen=True)
class End:
    pass


@dataclass(frozen=True)
class Shutdown:
    pass


TrainerOp = Step | Publish | Checkpoint | Export


class RankDriver:
    """Rank 0's handle on the trainer of every rank."""

    def __init__(self, settings: LearnerSettings) -> None:
        self.settings = settings
        self.world = dist.get_world_size()
        self.trainer: Trainer | None = None

    def _send(self, op: Any) -> None:
        if self.world > 1:
            dist.broadcast_object_list([op], src=0)

    def start(self, job: ActiveJob) -> Trainer:
        self._send(Start(job))
        self.trainer = Trainer(job, self.settings)
        return self.trainer

    def run(self, op: TrainerOp):
        assert self.trainer is not None, "no job started"
        self._send(op)
        return op.apply(self.trainer)

    def step(self, entries: list[ScoredEntry]) -> StepResult:
        return self.run(Step(entries))

    def publish(self, announce: Announce) -> None:
        """Every rank joins the gather; rank 0 writes the version and then calls `announce(version, location)`
        (in the background: `published` waits for it)."""
        assert self.trainer is not None, "no job started"
        self._send(Publish())
        self.trainer.publish(announce)

    def published(self) -> str | None:
        """Rank 0 only (no collective): wait for the version being written; the newest location written."""
        assert self.trainer is not None, "no job started"
        return self.trainer.published()

    def checkpoint(self) -> None:
        self.run(Checkpoint())

    def export(self) -> Path:
        return self.run(Export())

    def end(self) -> None:
        if self.trainer is not None:
            self._send(End())
            self.trainer.close()
            self.trainer = None

    def shutdown(self) -> None:
        self._send(Shutdown())


def follow(settings: LearnerSettings) -> None:
    """The loop of every rank but 0: apply rank 0's operations until it shuts down."""
    trainer: Trainer | None = None
    while True:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0)
        op = box[0]
        if isinstance(op, Start):
            trainer = Trainer(op.job, settings)
        elif isinstance(op, End):
            trainer = None
        elif isinstance(op, Shutdown):
            return
        else:
            assert trainer is not None, f"{type(op).__name__} before Start"
            op.apply(trainer)
