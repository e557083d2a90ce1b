"""Weight versions end to end, with real parts: the learner's DeepSpeed Trainer or a real AdamW run on the tiny
student, the `filesystem` and `delta` transports on disk, real Redis for the head and repairs, HF and vLLM
engines. Bit-exact round trips, missed versions, corruption (detected, counted, repaired), late joiners,
pruning, and a follower that blocks on the head instead of polling."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch
from prometheus_client import REGISTRY

from asyncopd.jobspec import JobSpec
from asyncopd.ml.weights.follow import Follower, WeightWaitTimeout
from asyncopd.ml.weights.head import HeadWatcher, announce
from asyncopd.ml.weights.manifest import Manifest, WeightSyncError
from asyncopd.ml.weights.transports import setup_follower, setup_publisher
from asyncopd.state import ActiveJob

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def same_bits(got: torch.Tensor, want: torch.Tensor) -> bool:
    return got.dtype == want.dtype and torch.equal(got.contiguous().view(torch.uint8),
                                                   want.contiguous().view(torch.uint8))


def assert_engine_holds(engine, state_dict: dict, dtype: torch.dtype) -> None:
    held = engine.model.state_dict()
    for name, tensor in state_dict.items():
        assert same_bits(held[name], tensor.detach().to(dtype)), name


def failures(reason: str) -> float:
    return REGISTRY.get_sample_value("asyncopd_weight_sync_failures_total", {"reason": reason}) or 0.0


class Run:
    """A real short training run: AdamW on random token batches, the states of every published version."""

    def __init__(self, model_dir: Path, lr: float = 1e-3, seed: int = 0) -> None:
        from transformers import AutoModelForCausalLM

        torch.manual_seed(seed)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=lr)
        self.config = self.model.config.to_json_string()
        self.states: dict[int, dict] = {}

    def step(self, version: int) -> dict:
        ids = torch.randint(3, self.model.config.vocab_size, (4, 12))
        loss = self.model(input_ids=ids, labels=ids).loss
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        self.states[version] = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        return self.model.state_dict()


def hf_engine(tiny_models, dtype: str = "float32"):
    from asyncopd.ml.engines.hf_engine import HFEngine

    return HFEngine(str(tiny_models["student"]), device="cpu", dtype=dtype)


def publish_run(tiny_models, root: Path, versions: int, full_every: int, transport: str = "delta", **kwargs):
    run = Run(tiny_models["student"])
    publisher = setup_publisher(transport, root, full_every=full_every, **kwargs)
    locations = {v: publisher.publish(v, run.step(v), run.config) for v in range(1, versions + 1)}
    return run, publisher, locations


def kind(location: str) -> str:
    return Manifest.read(Path(location)).kind


# -- the learner's own publish, through both transports, bit-exact ---------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("transport", ["filesystem", "delta"])
def test_the_learners_versions_reach_an_engine_bit_exact(distributed, tiny_models, tmp_path, redis_server, transport,
                                                         dtype):
    from services.learner.settings import LearnerSettings
    from services.learner.trainer import Trainer
    from tests.unit.test_trainer import entries

    spec = JobSpec.model_validate({"student": {"model": str(tiny_models["student"])},
                                   "teacher": {"model": str(tiny_models["teacher"])},
                                   "prompts": {"path": "unused.jsonl"}, "train": {"learning_rate": 1e-3}})
    settings = LearnerSettings(data_dir=tmp_path / "data", redis_url=redis_server, weights_transport=transport,
                               weights_dtype=dtype, weights_full_every=3)
    trainer = Trainer(ActiveJob("j", spec, str(tmp_path / "out")), settings)
    engine, follower = hf_engine(tiny_models, dtype), setup_follower(transport)
    kinds = []
    for i in range(4):
        trainer.step(entries(trainer.model.config.vocab_size, 4, seed=i))
        trainer.publish()
        location = trainer.published()
        kinds.append(kind(location))
        follower.load(location, trainer.version, engine)
        assert engine.version == trainer.version
        assert_engine_holds(engine, trainer.model.state_dict(), DTYPES[dtype])
    assert kinds == (["full", "delta", "delta", "full"] if transport == "delta" else ["full"] * 4)
    trainer.close()


# -- delta: missed versions, late joiners, pruning ---------------------------------------------------------------


def test_a_follower_that_missed_versions_loads_the_newest_one_exactly(tiny_models, tmp_path):
    run, _, loc = publish_run(tiny_models, tmp_path, versions=7, full_every=4)  # full at 1 and 5
    engine, follower = hf_engine(tiny_models), setup_follower("delta")
    for v in (2, 4, 7):  # misses 3, then 5 and 6: 7 is base 5 (a full it never saw) plus one delta
        follower.load(loc[v], v, engine)
        assert_engine_holds(engine, run.states[v], torch.float32)
    assert follower.base.version == 5


def test_a_late_joiner_seeds_from_the_newest_full_version(tiny_models, tmp_path):
    run, _, loc = publish_run(tiny_models, tmp_path, versions=6, full_every=4)
    assert [kind(loc[v]) for v in range(1, 7)] == ["full", "delta", "delta", "delta", "full", "delta"]
    follower = setup_follower("delta")
    engine = hf_engine(tiny_models)
    follower.load(loc[6], 6, engine)
    assert follower.base.version == 5
    assert_engine_holds(engine, run.states[6], torch.float32)


def test_the_evaluator_loads_a_delta_version_as_a_model(tiny_models, tmp_path):
    from asyncopd.ml.weights.hf import load_causal_lm

    run, _, loc = publish_run(tiny_models, tmp_path, versions=3, full_every=8)
    model = load_causal_lm(loc[3], torch.float32)
    held = model.state_dict()
    assert all(same_bits(held[name], t) for name, t in run.states[3].items())


def test_bf16_deltas_are_a_fraction_of_a_full_version(tiny_models, tmp_path):
    run, publisher, loc = publish_run(tiny_models, tmp_path, versions=3, full_every=8, dtype="bfloat16")
    full, delta = Manifest.read(Path(loc[1])).bytes(), Manifest.read(Path(loc[3])).bytes()
    assert delta < full and publisher.last_bytes() == delta


def test_pruning_keeps_the_full_version_that_retained_deltas_need(tiny_models, tmp_path):
    run, publisher, loc = publish_run(tiny_models, tmp_path, versions=7, full_every=4)
    publisher.prune(6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v00000005", "v00000006", "v00000007"]
    publisher.prune(7)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v00000005", "v00000007"]
    engine = hf_engine(tiny_models)
    setup_follower("delta").load(loc[7], 7, engine)  # a late joiner still finds what v7 needs
    assert_engine_holds(engine, run.states[7], torch.float32)


def test_pruning_filesystem_versions_keeps_only_the_budget(tiny_models, tmp_path):
    _, publisher, _ = publish_run(tiny_models, tmp_path, versions=4, full_every=1, transport="filesystem")
    publisher.prune(3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v00000003", "v00000004"]


# -- corruption: detected, counted, recovered from ----------------------------------------------------------------


def flip_byte(path: Path, at: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0x5A
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


CORRUPTIONS = {
    "flip a byte of the delta": (lambda d, base: flip_byte(d / "delta.bin"), ("corrupt", "checksum")),
    "truncate the delta": (lambda d, base: truncate(d / "delta.bin"), ("truncated",)),
    "delete the delta": (lambda d, base: (d / "delta.bin").unlink(), ("missing",)),
    "flip a byte of the base full version": (lambda d, base: flip_byte(base / "model.safetensors", 0.9), ("checksum",)),
    "garble the manifest": (lambda d, base: (d / "manifest.json").write_text("{"), ("manifest",)),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_a_corrupted_version_is_detected_counted_and_repaired_by_the_publisher(r, tiny_models, tmp_path, case):
    """A late joiner (no cached base) meets the damaged head; the publisher writes the head as a full version
    on request and the follower loads it exactly; the job's fence is met."""
    damage, reasons = CORRUPTIONS[case]
    run, publisher, loc = publish_run(tiny_models, tmp_path, versions=3, full_every=8, redis=r, job_id="j")
    damage(Path(loc[3]), Path(loc[1]))
    announce(r, "j", 3, loc[3], 1)
    before = {reason: failures(reason) for reason in reasons}
    engine = hf_engine(tiny_models)
    follower = Follower(r, "j", setup_follower("delta", redis=r, job_id="j"), reload_lag=0, wait_s=30)
    follower.sync(engine, at_least=3)
    assert engine.version == 3 and follower.lineage == 1
    assert_engine_holds(engine, run.states[3], torch.float32)
    assert sum(failures(reason) - before[reason] for reason in reasons) == 1
    assert kind(loc[3]) == "full"  # the repair: rewritten in place as a full version
    publisher.close()


def test_repeated_repair_requests_write_one_full_copy_and_an_old_version_is_gone(r, tiny_models, tmp_path):
    from asyncopd.ml.weights.repair import request_full

    _, publisher, loc = publish_run(tiny_models, tmp_path, versions=2, full_every=8, redis=r, job_id="j")
    flip_byte(Path(loc[2]) / "delta.bin")
    assert request_full(r, "j", 2, 10) == "written"
    first = Manifest.read(Path(loc[2])).id
    assert request_full(r, "j", 2, 10) == "written" and Manifest.read(Path(loc[2])).id == first
    assert request_full(r, "j", 1, 10) == "gone"  # not the version it holds: followers take the newer head
    publisher.close()


def test_without_a_repair_the_follower_keeps_its_weights_and_takes_the_next_version(r, tiny_models, tmp_path):
    run, publisher, loc = publish_run(tiny_models, tmp_path, versions=3, full_every=8)  # no responder
    engine = hf_engine(tiny_models)
    follower = Follower(r, "j", setup_follower("delta", redis=r, job_id="j"), reload_lag=0, wait_s=2)
    announce(r, "j", 2, loc[2], 1)
    follower.sync(engine, at_least=2)
    flip_byte(Path(loc[3]) / "delta.bin")
    announce(r, "j", 3, loc[3], 1)
    before = failures("corrupt") + failures("checksum")
    follower.sync(engine, at_least=2)  # v3 is damaged: the batch fenced at 2 runs on v2
    assert engine.version == 2 and failures("corrupt") + failures("checksum") == before + 1
    follower.sync(engine, at_least=2)  # the same bad location is not tried again
    assert failures("corrupt") + failures("checksum") == before + 1
    location = publisher.publish(4, run.step(4), run.config)
    announce(r, "j", 4, location, 1)
    follower.sync(engine, at_least=4)
    assert_engine_holds(engine, run.states[4], torch.float32)


def test_a_stale_cached_base_is_read_again_and_the_delta_replayed(tiny_models, tmp_path):
    run, _, loc = publish_run(tiny_models, tmp_path, versions=3, full_every=8)
    engine, follower = hf_engine(tiny_models), setup_follower("delta")
    follower.load(loc[2], 2, engine)
    name = next(iter(follower.base.tensors))
    follower.base.tensors[name] = follower.base.tensors[name] + 1  # the follower's memory, not the disk, is bad
    follower.load(loc[3], 3, engine)
    assert_engine_holds(engine, run.states[3], torch.float32)


def test_the_filesystem_follower_refuses_a_delta_version_with_a_clear_reason(tiny_models, tmp_path):
    _, _, loc = publish_run(tiny_models, tmp_path, versions=2, full_every=8)
    with pytest.raises(WeightSyncError, match="mismatch: .*ASYNCOPD_WEIGHTS_TRANSPORT"):
        setup_follower("filesystem").load(loc[2], 2, hf_engine(tiny_models))


# -- following the head: blocking, deadline, stop ----------------------------------------------------------------


def later(delay_s: float, fn) -> threading.Thread:
    thread = threading.Thread(target=lambda: (time.sleep(delay_s), fn()))
    thread.start()
    return thread


def test_a_blocked_watcher_wakes_on_publish(r):
    watch = HeadWatcher(r, "j")
    assert watch.head() == (0, 0, None)
    published = {}
    thread = later(0.3, lambda: (published.setdefault("t", time.perf_counter()), announce(r, "j", 1, "/w/v1", 1)))
    assert watch.wait(10.0)
    latency = time.perf_counter() - published["t"]
    thread.join()
    assert watch.head() == (1, 1, "/w/v1")
    print(f"head wake-up latency {1000 * latency:.2f} ms")
    assert latency < 0.1
    assert not watch.wait(0.05)  # nothing new since the head was read


def test_a_publish_between_reading_the_head_and_waiting_is_not_missed(r):
    watch = HeadWatcher(r, "j")
    watch.head()
    announce(r, "j", 1, "/w/v1", 1)
    t0 = time.perf_counter()
    assert watch.wait(5.0) and time.perf_counter() - t0 < 0.1


def test_a_follower_blocked_on_its_fence_loads_the_version_when_it_is_published(r, tiny_models, tmp_path):
    run = Run(tiny_models["student"])
    publisher = setup_publisher("delta", tmp_path)
    engine = hf_engine(tiny_models)
    follower = Follower(r, "j", setup_follower("delta"), reload_lag=0, wait_s=30)
    done = {}

    def publish():
        location = publisher.publish(1, run.step(1), run.config)
        done["t"] = time.perf_counter()
        announce(r, "j", 1, location, 1)

    thread = later(0.3, publish)
    follower.sync(engine, at_least=1)
    latency = time.perf_counter() - done["t"]
    thread.join()
    print(f"publish -> loaded latency {1000 * latency:.1f} ms")
    assert engine.version == 1 and latency < 2.0
    assert_engine_holds(engine, run.states[1], torch.float32)


def test_a_follower_gives_up_at_its_deadline(r, tiny_models):
    follower = Follower(r, "j", setup_follower("delta"), reload_lag=0, wait_s=0.5)
    engine = hf_engine(tiny_models)
    t0 = time.perf_counter()
    with pytest.raises(WeightWaitTimeout):
        follower.sync(engine, at_least=1)
    # Not a speed check: it waited its deadline, and gave up long before anything like a hang (machines are noisy).
    assert 0.5 <= time.perf_counter() - t0 < 10


def test_a_follower_returns_promptly_on_stop(r, tiny_models):
    stop = threading.Event()
    follower = Follower(r, "j", setup_follower("delta"), reload_lag=0, wait_s=60, stop=stop)
    engine = hf_engine(tiny_models)
    thread = later(0.2, stop.set)
    t0 = time.perf_counter()
    with pytest.raises(TimeoutError):
        follower.sync(engine, at_least=1)
    thread.join()
    assert time.perf_counter() - t0 < 30  # its wait_s is 60: the stop, not the deadline, ended it


# -- vLLM: rebuilt tensors in, the same numbers out ---------------------------------------------------------------


def _vllm_scores_match(student: str, full: str, delta_location: str) -> list[str]:
    """In a fresh process (vLLM in-process tears down torch.distributed when it closes, which would pull the
    process group from under the learner tests in this one): score with the full version, then with the
    rebuilt tensors loaded each way; the ways that differ."""
    from asyncopd.ml.engines import build_engine

    engine = build_engine("vllm", student, device="cpu", dtype="float32", seed=0, max_model_len=128,
                          kv_cache_bytes=64 << 20, gpu_memory_utilization=0.5)
    prompts, completions = [[5, 6, 7, 8]], [[9, 10, 11]]
    try:
        engine.load_weights(full, 2)
        want = engine.score(prompts, completions, top_k=3)
        tensors = setup_follower("delta").tensors(delta_location)
        wrong = []
        for via in ("iterator", "path"):
            engine.load_weights(student, 0)
            engine.load_tensors(tensors, 2, via=via)
            if engine.version != 2 or engine.score(prompts, completions, top_k=3) != want:
                wrong.append(via)
        return wrong
    finally:
        engine.close()


def test_vllm_loads_rebuilt_tensors_like_the_full_version(tiny_models, tmp_path):
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    run, _, loc = publish_run(tiny_models, tmp_path / "delta", versions=2, full_every=8)
    full = setup_publisher("filesystem", tmp_path / "fs").publish(2, run.states[2], run.config)
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        assert pool.submit(_vllm_scores_match, str(tiny_models["student"]), full, loc[2]).result() == []