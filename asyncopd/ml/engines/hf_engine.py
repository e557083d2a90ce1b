"""HF transformers engine: the fallback where vLLM is not available, and a reference for vLLM's numbers."""

from __future__ import annotations

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from asyncopd.ml.dtypes import DTYPES
from asyncopd.ml.engines.base import Completion, Engine, SequenceScores
from asyncopd.ml.weights import safetensors_files


class HFEngine(Engine):
    def __init__(self, model: str, *, device: str, dtype: str) -> None:
        self.device = torch.device(device)
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=DTYPES[dtype]).to(self.device).eval()
        self.eos_id = AutoTokenizer.from_pretrained(model).eos_token_id

    @torch.no_grad()
    def generate(self, prompts, *, n, max_tokens, temperature, seeds, top_k=0):
        out = []
        for prompt, seed in zip(prompts, seeds, strict=True):
            gen = torch.Generator(device=self.device).manual_seed(seed)
            out.append(self._sample(prompt, n, max_tokens, temperature, gen, top_k))
        return out

    def _sample(self, prompt, n, max_tokens, temperature, gen, top_k) -> list[Completion]:
        # A plain sampling loop with a KV cache: n copies of one prompt need no padding.
        ids = torch.tensor([prompt] * n, device=self.device)
        past, step_input = None, ids
        tokens = torch.empty(n, 0, dtype=torch.long, device=self.device)
        logps = torch.empty(n, 0, device=self.device)
        tops = torch.empty(n, 0, max(top_k, 1), dtype=torch.long, device=self.device)
        done = torch.zeros(n, dtype=torch.bool, device=self.device)
        for _ in range(max_tokens):
            res = self.model(input_ids=step_input, past_key_values=past, use_cache=True)
            past = res.past_key_values
            logp = torch.log_softmax(res.logits[:, -1].float() / temperature, dim=-1)
            nxt = torch.multinomial(logp.exp(), 1, generator=gen).squeeze(1)
            tokens = torch.cat([tokens, nxt[:, None]], 1)
            logps = torch.cat([logps, logp.gather(1, nxt[:, None])], 1)
            if top_k:
                tops = torch.cat([tops, logp.topk(top_k, dim=-1).indices[:, None]], 1)
            done |= nxt == self.eos_id
            if done.all():
                break
            step_input = nxt[:, None]
        completions = []
        for row, lp, top in zip(tokens.tolist(), logps.tolist(), tops.tolist(), strict=True):
            stopped = self.eos_id in row
            end = row.index(self.eos_id) + 1 if stopped else len(row)
            completions.append(Completion(row[:end], lp[:end], "stop" if stopped else "length",
                                          top[:end] if top_k else None))
        return completions

    def _completion_logprobs(self, prompt: list[int], completion: list[int], temperature: float = 1.0):
        """[L, V] log-probs of the distributions that predict each completion token."""
        ids = torch.tensor([prompt + completion], device=self.device)
        logits = self.model(input_ids=ids).logits[0].float()
        # Position j of the completion is predicted by the logits one token earlier.
        return torch.log_softmax(logits[len(prompt) - 1 : len(prompt) + len(completion) - 1] / temperature, dim=-1)

    @torch.no_grad()
    def sample_positions(self, prompts, completions, *, m, temperature, seeds):
        out = []
        for prompt, completion, seed in zip(prompts, completions, seeds, strict=True):
            if not completion:
                out.append(([], []))
                continue
            gen = torch.Generator(device=self.device).manual_seed(seed)
            logp = self._completion_logprobs(prompt, completion, temperature)
            ids = torch.multinomial(logp.exp(), m, replacement=True, generator=gen)
            out.append((ids.tolist(), logp.gather(1, ids).tolist()))
        return out

    @torch.no_grad()
    def score_tokens(self, prompts, completions, token_ids):
        out = []
        for prompt, completion, ids in zip(prompts, completions, token_ids, strict=True):
            if not completion:
                out.append([])
                continue
            logp = self._completion_logprobs(prompt, completion)
            out.append(logp.gather(1, torch.tensor(ids, device=self.device)).tolist())
        return out

    @torch.no_grad()
    def score(self, prompts, completions, *, top_k):
        out = []
        for prompt, completion in zip(prompts, completions, strict=True):
            logp = self._completion_logprobs(prompt, completion)
            target = torch.tensor(completion, device=self.device)
            top = logp.topk(min(top_k, logp.shape[-1]), dim=-1)
            out.append(SequenceScores(logp.gather(1, target[:, None]).squeeze(1).tolist(),
                                      top.indices.tolist(), top.values.tolist()))
        return out

    def load_weights(self, path, version):
        state = {}
        for f in safetensors_files(path):
            state.update(load_file(f, device=str(self.device)))
        self.load_tensors(state, version)

    def load_tensors(self, tensors, version):
        missing, unexpected = self.model.load_state_dict(tensors, strict=False)
        # Tied embeddings are saved once; anything else missing means the wrong checkpoint.
        if unexpected or [m for m in missing if "lm_head" not in m]:
            raise ValueError(f"weights of version {version} do not match the model: missing={missing} "
                             f"unexpected={unexpected}")
        self.version = version

    def load_adapter(self, path, version, tensors=None):
        """The first version wraps the model with PEFT's LoRA layers (base weights untouched); later versions
        copy their tensors into those layers in place. Unmerged: merging per version would rewrite every
        targeted base weight, and unmerging again accumulates rounding."""
        from asyncopd.ml import lora

        if tensors is None:
            from safetensors.torch import load_file

            tensors = load_file(f"{path}/{lora.ADAPTER_WEIGHTS}", device=str(self.device))
        if getattr(self.model, "peft_config", None) is None:
            self.model = lora.apply(self.model, path, tensors).to(self.device).eval()
        else:
            lora.set_adapter_tensors(self.model, tensors)
        self.version = version

    def close(self):
        del self.model
