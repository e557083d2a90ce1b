"""When a rollout worker loads a newer policy: every version by default, less often with a reload lag, always
when a batch's fence needs it or a restarted learner changed lineage."""

import pytest

from asyncopd.ml.weights.head import needs_reload


def test_lag_zero_follows_every_version():
    assert needs_reload((1, 4), (1, 5), fence=0, lag=0)
    assert not needs_reload((1, 5), (1, 5), fence=0, lag=0)


@pytest.mark.parametrize("lag", [1, 3])
def test_a_lag_skips_versions_until_it_is_exceeded(lag):
    assert not needs_reload((1, 4), (1, 4 + lag), fence=4, lag=lag)
    assert needs_reload((1, 4), (1, 5 + lag), fence=4, lag=lag)


def test_the_fence_forces_a_reload_whatever_the_lag():
    assert needs_reload((1, 4), (1, 5), fence=5, lag=100)


def test_a_new_lineage_is_followed_even_backwards():
    assert needs_reload((1, 9), (2, 6), fence=0, lag=100)
    assert not needs_reload((0, 0), (0, 0), fence=0, lag=0)  # nothing published yet
