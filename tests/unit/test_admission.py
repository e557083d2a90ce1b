"""Admission control: released batches and fences keep every sample within the budget, by simulation."""

import random

import pytest

from services.coordinator.admission import prompt_indices, releasable_batches, version_fence


def test_budget_zero_releases_one_batch_per_version():
    assert list(releasable_batches(version=0, released=0, max_staleness=0, steps=10)) == [0]
    assert list(releasable_batches(version=0, released=1, max_staleness=0, steps=10)) == []
    assert list(releasable_batches(version=1, released=1, max_staleness=0, steps=10)) == [1]


def test_budget_two_runs_ahead_by_two_and_stops_at_the_last_step():
    assert list(releasable_batches(version=0, released=0, max_staleness=2, steps=10)) == [0, 1, 2]
    assert list(releasable_batches(version=9, released=3, max_staleness=2, steps=10)) == list(range(3, 10))


@pytest.mark.parametrize("eta", [0, 1, 2, 5])
def test_random_schedules_never_exceed_the_budget(eta):
    """Rollouts generate any released batch with any weights at or above its fence; the learner trains batch
    t at version t. Whatever the interleaving, staleness = t - v stays within [0, eta]."""
    rnd = random.Random(eta)
    steps, version, released = 30, 0, 0
    generated: dict[int, int] = {}
    while version < steps:
        for b in releasable_batches(version, released, eta, steps):
            released = b + 1
        pending = [b for b in range(released) if b not in generated]
        if pending and rnd.random() < 0.7:
            b = rnd.choice(pending)
            generated[b] = rnd.randint(version_fence(b, eta), version)  # a worker with any loaded version
        elif version in generated:
            assert 0 <= version - generated[version] <= eta
            version += 1


def test_prompts_wrap_around():
    assert prompt_indices(batch=2, prompts_per_step=3, num_prompts=7) == [6, 0, 1]
