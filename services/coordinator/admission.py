"""Admission control: the one place that decides which prompts may be generated now.

Batch b is trained at step b. It may be released once the learner has published version b − η, and it is
fenced at that version (rollouts generate it with weights ≥ b − η), so its staleness at training is ≤ η.
η = 0 releases batch b only after step b−1 is published: strict synchronous OPD, through the same code.
"""

from __future__ import annotations


def releasable_batches(version: int, released: int, max_staleness: int, steps: int) -> range:
    """Batches that may be released now, given `released` batches are out already."""
    return range(released, min(version + max_staleness, steps - 1) + 1)


def version_fence(batch: int, max_staleness: int) -> int:
    return max(0, batch - max_staleness)


def prompt_indices(batch: int, prompts_per_step: int, num_prompts: int) -> list[int]:
    """Batches walk the prompt file in order and wrap around (epochs)."""
    return [(batch * prompts_per_step + i) % num_prompts for i in range(prompts_per_step)]
