"""LoRA students with real parts: the learner's DeepSpeed Trainer (ZeRO 0-3, one gloo rank) training
a PEFT adapter on the tiny student, adapter-only versions on disk, the HF and vLLM engines applying them over
base weights loaded once, checkpoints without the frozen base, and the exported adapter and merged model
loading in transformers and peft."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from asyncopd.jobspec import JobSpec
from asyncopd.ml import lora
from asyncopd.ml.weights.manifest import Manifest, WeightSyncError
from asyncopd.ml.weights.transports import ADAPTER, setup_follower
from asyncopd.state import ActiveJob
from tests.unit.test_trainer import entries

LORA = {"rank": 8, "alpha": 16, "target_modules": "all-linear"}
PROMPTS, COMPLETIONS = [[5, 6, 7, 8], [9, 3]], [[9, 10, 11], [12, 13, 14, 15]]


def lora_trainer(models, tmp_path, zero_stage: int = 0, name: str = "out", **student):
    from services.learner.settings import LearnerSettings
    from services.learner.trainer import Trainer

    spec = JobSpec.model_validate({"student": {"model": str(models["student"]), "lora": LORA, **student},
                                   "teacher": {"model": str(models["teacher"])},
                                   "prompts": {"path": "unused.jsonl"},
                                   "train": {"learning_rate": 1e-2, "warmup_steps": 0}})
    settings = LearnerSettings(data_dir=tmp_path / "data", zero_stage=zero_stage, loss_chunk_tokens=5)
    return Trainer(ActiveJob("j", spec, str(tmp_path / name)), settings)


def all_params(trainer) -> dict[str, torch.Tensor]:
    """Every parameter's full value (gathered under ZeRO-3)."""
    with trainer._gathered(list(trainer.model.parameters())):
        return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def merged_logprobs(location: str, prompts=PROMPTS, completions=COMPLETIONS) -> list[list[float]]:
    """Sampled-token log-probs of the published version merged into the base: the reference every engine's
    adapter path must reproduce."""
    from asyncopd.ml.weights.hf import load_causal_lm

    model = load_causal_lm(location, torch.float32).eval()
    out = []
    with torch.no_grad():
        for p, c in zip(prompts, completions, strict=True):
            logp = torch.log_softmax(model(torch.tensor([p + c])).logits[0].float(), -1)
            out.append([float(logp[len(p) - 1 + j, t]) for j, t in enumerate(c)])
    return out


def close(a: list[list[float]], b: list[list[float]], tol: float = 2e-5) -> bool:
    return all(abs(x - y) <= tol for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True))


@pytest.mark.parametrize("zero_stage", [0, 1, 2, 3])
def test_a_lora_step_trains_the_adapter_alone_and_publishes_it_alone(distributed, tiny_models, tmp_path, zero_stage):
    from asyncopd.ml.engines.hf_engine import HFEngine

    torch.set_num_threads(1)
    trainer = lora_trainer(tiny_models, tmp_path, zero_stage)
    assert trainer.net.chunked, trainer.net.blocker  # get_decoder / get_output_embeddings through the PeftModel
    before = all_params(trainer)
    engine = HFEngine(str(tiny_models["student"]), device="cpu", dtype="float32")
    base_ids = {n: p.data_ptr() for n, p in engine.model.named_parameters()}
    follower = setup_follower(ADAPTER)
    for i in range(2):
        trainer.step(entries(259, 4, seed=i))
        trainer.publish()
        location = trainer.published()
        after = all_params(trainer)
        changed = {n for n in after if not torch.equal(after[n], before[n])}
        assert changed and all(".lora_" in n for n in changed), changed  # the base never moves
        assert any(".lora_B." in n for n in changed)  # B starts at zero: the adapter now does something

        files = {f.name: f.stat().st_size for f in Path(location).iterdir()}
        assert set(files) == {lora.ADAPTER_WEIGHTS, lora.ADAPTER_CONFIG, "manifest.json"}
        manifest = Manifest.read(Path(location))
        assert manifest.kind == ADAPTER and manifest.version == trainer.version == i + 1
        adapter_numel = sum(getattr(p, "ds_numel", p.numel())  # ZeRO-3 holds a partition: ds_numel is the whole
                            for p in trainer.model.parameters() if p.requires_grad)
        tensor_bytes = sum(4 * torch.Size(e.shape).numel() for e in manifest.tensors.values())
        assert tensor_bytes == 4 * adapter_numel  # fp32, every adapter weight, nothing of the base
        assert tensor_bytes < files[lora.ADAPTER_WEIGHTS] < tensor_bytes + 16_384  # plus a safetensors header
        full_bytes = (Path(tiny_models["student"]) / "model.safetensors").stat().st_size
        assert manifest.bytes() < full_bytes / 4
        config = json.loads((Path(location) / lora.ADAPTER_CONFIG).read_text())
        assert config["r"] == 8 and config["base_model_name_or_path"] == str(tiny_models["student"])

        follower.load(location, trainer.version, engine)
        assert engine.version == trainer.version
        got = [s.sampled_logprobs for s in engine.score(PROMPTS, COMPLETIONS, top_k=2)]
        assert close(got, merged_logprobs(location))
    base_now = {n.replace("base_model.model.", "").replace(".base_layer", ""): p.data_ptr()
                for n, p in engine.model.named_parameters() if "lora_" not in n}
    assert base_now == base_ids  # base weights loaded once, never copied or reloaded


def test_the_adapter_follower_refuses_a_full_version(tiny_models, tmp_path):
    from asyncopd.ml.weights.transports import setup_publisher
    from tests.integration.test_weights import Run

    run = Run(tiny_models["student"])
    location = setup_publisher("filesystem", tmp_path).publish(1, run.step(1), run.config)
    with pytest.raises(WeightSyncError, match="not a LoRA adapter version"):
        setup_follower(ADAPTER).tensors(location)


@pytest.mark.parametrize("zero_stage", [0, 3])
def test_a_lora_checkpoint_leaves_out_the_base_and_resumes_the_adapter(distributed, tiny_models, tmp_path,
                                                                       zero_stage):
    torch.set_num_threads(1)
    trainer = lora_trainer(tiny_models, tmp_path, zero_stage)
    for i in range(2):
        trainer.step(entries(259, 4, seed=i))
    trainer.checkpoint()
    saved = {n: p for n, p in all_params(trainer).items() if ".lora_" in n}
    module_files = list((tmp_path / "out" / "checkpoints" / "v2").glob("*model_states.pt"))
    module = torch.load(module_files[0], weights_only=False)["module"] or {}
    assert all(".lora_" in k for k in module)  # the frozen base is the job's student on disk
    size = sum(f.stat().st_size for f in (tmp_path / "out" / "checkpoints" / "v2").iterdir())
    assert size < (Path(tiny_models["student"]) / "model.safetensors").stat().st_size

    resumed = lora_trainer(tiny_models, tmp_path, zero_stage)
    assert resumed.version == 2
    now = all_params(resumed)
    for n, p in saved.items():
        assert torch.equal(now[n], p), n
    resumed.step(entries(259, 4, seed=7))  # and the optimizer state came back with it: training goes on


def test_the_export_is_a_peft_adapter_and_a_merged_model_that_load_alike(distributed, tiny_models, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    trainer = lora_trainer(tiny_models, tmp_path, export_merged=True)
    trainer.step(entries(259, 4, seed=0))
    adapter_dir = trainer.export()
    merged_dir = tmp_path / "out" / "student-merged"
    assert {lora.ADAPTER_CONFIG, lora.ADAPTER_WEIGHTS, "tokenizer.json"} <= {f.name for f in adapter_dir.iterdir()}
    assert (merged_dir / "config.json").exists() and (merged_dir / "tokenizer.json").exists()
    AutoTokenizer.from_pretrained(adapter_dir)

    ids = torch.tensor([PROMPTS[0] + COMPLETIONS[0]])
    base = AutoModelForCausalLM.from_pretrained(tiny_models["student"], dtype=torch.float32)
    with torch.no_grad():
        plain = base(ids).logits
        with_peft = PeftModel.from_pretrained(base, adapter_dir).eval()(ids).logits  # peft's own loader
        merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)(ids).logits
        via_transformers = AutoModelForCausalLM.from_pretrained(adapter_dir, dtype=torch.float32)(ids).logits
    assert not torch.allclose(plain, with_peft, atol=1e-4)  # the trained adapter changes the model
    torch.testing.assert_close(merged, with_peft, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(via_transformers, with_peft, rtol=1e-5, atol=1e-5)  # transformers' PEFT integration
    assert merged_logprobs(str(adapter_dir)) == merged_logprobs(str(merged_dir))  # what `asyncopd eval` loads


def _vllm_adapter_logprobs(student: str, locations: list[str]) -> list[dict]:
    """In a fresh process (an in-process vLLM tears torch.distributed down when it closes): the student with
    LoRA enabled, each adapter version applied in turn; per version, what the rollout path reports (sampled
    completions and their log-probs) and the scores of the fixed completions."""
    from asyncopd.ml.engines import build_engine
    from asyncopd.ml.weights.transports import ADAPTER, setup_follower

    engine = build_engine("vllm", student, device="cpu", dtype="float32", seed=0, max_model_len=128,
                          kv_cache_bytes=64 << 20, gpu_memory_utilization=0.5, lora_rank=LORA["rank"])
    follower, out = setup_follower(ADAPTER), []
    try:
        for version, location in enumerate(locations, 1):
            follower.load(location, version, engine)
            assert engine.version == version and engine.lora.lora_path == location
            sampled = engine.generate(PROMPTS, n=2, max_tokens=4, temperature=1.0, seeds=[1, 2])
            out.append({"completions": [[c.token_ids for c in cs] for cs in sampled],
                        "logprobs": [[c.logprobs for c in cs] for cs in sampled],
                        "scores": [s.sampled_logprobs for s in engine.score(PROMPTS, COMPLETIONS, top_k=2)]})
        assert engine.llm.llm_engine.list_loras() == {engine.lora.lora_int_id}  # older versions removed
        return out
    finally:
        engine.close()


def test_vllm_serves_each_adapter_version_like_the_merged_model(distributed, tiny_models, tmp_path):
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    torch.set_num_threads(1)
    trainer = lora_trainer(tiny_models, tmp_path)
    locations = []
    for i in range(2):
        trainer.step(entries(259, 4, seed=i))
        trainer.publish()
        locations.append(trainer.published())
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        got = pool.submit(_vllm_adapter_logprobs, str(tiny_models["student"]), locations).result()
    for location, version in zip(locations, got, strict=True):
        assert close(version["scores"], merged_logprobs(location, PROMPTS, COMPLETIONS), tol=1e-4)
        for prompt, completions, logprobs in zip(PROMPTS, version["completions"], version["logprobs"], strict=True):
            want = merged_logprobs(location, [prompt] * len(completions), completions)
            assert close(logprobs, want, tol=1e-4)  # the rollout's behaviour log-probs are the adapter's
    assert not close(got[0]["scores"], got[1]["scores"], tol=1e-4)  # the second version was really applied
