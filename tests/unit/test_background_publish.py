"""The learner's background writer of weight versions, on the real `filesystem` transport and real files:
the version holds the weights of the moment it was submitted whatever the optimizer does next, versions are
written and announced in order with at most one in flight, and a failed write surfaces in the caller."""

import threading

import pytest
import torch

from asyncopd.ml.weights.background import BackgroundPublisher
from asyncopd.ml.weights.transports import setup_follower, setup_publisher

torch.set_num_threads(1)


class Gated:
    """A real filesystem publisher whose writes wait for `gate`, to hold a version in flight."""

    def __init__(self, root, dtype="float32"):
        self.inner = setup_publisher("filesystem", root, dtype=dtype)
        self.dtype = self.inner.dtype
        self.gate, self.started = threading.Event(), threading.Event()
        self.fail: Exception | None = None

    def publish(self, version, state, config_json, owned=False):
        self.started.set()
        assert self.gate.wait(30)
        if self.fail is not None:
            raise self.fail
        return self.inner.publish(version, state, config_json, owned)

    def close(self):
        self.inner.close()


def params():
    return {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(3)}


def test_a_version_holds_the_weights_it_was_submitted_with_while_they_move_on(tmp_path):
    writer = BackgroundPublisher(Gated(tmp_path))
    live, announced = params(), []
    expected = {k: v.clone() for k, v in live.items()}
    writer.submit(1, live, "{}", lambda v, loc: announced.append((v, loc)))
    assert writer.publisher.started.wait(30)
    for t in live.values():  # the optimizer's in-place update while the write is in flight
        t.add_(100.0)
    assert announced == []  # not announced before it is written
    writer.publisher.gate.set()
    location = writer.flush()
    assert announced == [(1, location)]
    got = setup_follower("filesystem").tensors(location)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    writer.close()


def test_versions_are_announced_in_order_with_at_most_one_in_flight(tmp_path):
    writer = BackgroundPublisher(Gated(tmp_path, "bfloat16"))
    announced = []
    writer.submit(1, params(), "{}", lambda v, loc: announced.append(v))
    second = threading.Thread(target=writer.submit, args=(2, params(), "{}", lambda v, loc: announced.append(v)))
    second.start()
    second.join(0.5)
    assert second.is_alive()  # waits for version 1's write: no second snapshot piles up
    writer.publisher.gate.set()
    second.join(30)
    writer.flush()
    assert announced == [1, 2]
    assert setup_follower("filesystem").tensors(writer.flush())["w"].dtype == torch.bfloat16
    writer.close()


def test_a_failed_write_is_raised_in_the_learners_thread_and_never_announced(tmp_path):
    publisher = Gated(tmp_path)
    publisher.fail, announced = OSError("volume full"), []
    publisher.gate.set()
    writer = BackgroundPublisher(publisher)
    writer.submit(1, params(), "{}", lambda v, loc: announced.append(v))
    with pytest.raises(OSError, match="volume full"):
        writer.submit(2, params(), "{}", lambda v, loc: announced.append(v))
    assert announced == []
    writer.close()


def test_without_background_a_submit_returns_once_written_and_announced(tmp_path):
    publisher = Gated(tmp_path)
    publisher.gate.set()
    writer = BackgroundPublisher(publisher, background=False)
    announced = []
    writer.submit(1, params(), "{}", lambda v, loc: announced.append((v, loc)))
    assert announced and announced[0][0] == 1 and writer.flush() == announced[0][1]
    writer.close()
