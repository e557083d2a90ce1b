"""The module DeepSpeed wraps: the HF student plus the objective, with a chunked lm_head path that never
materialises [tokens, vocab] logits, and the check of whether a model's architecture allows that path."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from services.learner.objectives import (
    Objective,
    TokenBatch,
    chunked_student_logprobs_loss,
    sampled_token_logprobs,
)

# Config fields by which some architectures post-process logits (soft-capping, scaling) after the lm_head or
# scale the hidden state before it: hidden @ W.T alone would then be the wrong distribution.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "lm_head_multiplier",
                    "dim_model_base")


def chunking_blocker(model: torch.nn.Module) -> str | None:
    """Why the chunked loss cannot stand in for this model's `forward(...).logits`, or None if it can: it
    needs logits == decoder(...).last_hidden_state @ lm_head.weight.T. Checked by inspection (a bias-free
    Linear head, no known logit transform in the config) and then numerically on a few tokens, so an
    architecture that does something else between decoder and head falls back instead of training wrong.
    Call before DeepSpeed partitions the weights."""
    head = model.get_output_embeddings()
    if head is None:
        return "the model has no output embeddings"
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return f"the output head is a {type(head).__name__}{' with a bias' if head.bias is not None else ''}, " \
               "not a plain bias-free Linear"
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for name in LOGIT_TRANSFORMS:
        if getattr(config, name, None) not in (None, 1, 1.0):
            return f"config.{name} = {getattr(config, name)} transforms the logits"
    try:
        decoder = model.get_decoder()
    except (AttributeError, NotImplementedError):
        decoder = None
    if decoder is None or decoder is model:
        return "the model exposes no separate decoder (get_decoder)"
    ids = torch.arange(3, 11)[None] % head.weight.shape[0]
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits.float()
        direct = torch.nn.functional.linear(_last_hidden(decoder(input_ids=ids, use_cache=False)), head.weight)
    if not torch.allclose(logits, direct.float(), rtol=1e-3, atol=1e-3 * float(logits.abs().max())):
        return "the model's logits are not its decoder output times the lm_head weight"
    return None


def _last_hidden(output) -> torch.Tensor:
    return output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]


class StudentLoss(torch.nn.Module):
    """The module DeepSpeed wraps: the HF student plus the loss, so the summed loss *is* the engine's output.

    Computing the loss inside `engine.forward` matters with the chunked path. DeepSpeed (0.19) starts its
    backward bookkeeping (ZeRO's enter_backward, the accumulation boundary, timers) from autograd hooks on the
    forward's outputs. A loss built outside from a captured hidden state and the lm_head weight reaches the
    lm_head weight's gradient hook *before* any output hook (AccumulateGrad nodes run first), so ZeRO would
    process that gradient outside its backward context. With the loss as the output, the first thing backward
    touches is an output and everything after it is ordinary autograd.

    Chunked path (`chunk_tokens` set, `chunking_blocker` None): decoder -> hidden states of the completion
    positions [N, H] -> `chunked_student_logprobs_loss` with the lm_head weight; no [N, V] logits exist at
    once. Its gradients are taken per chunk inside the forward with torch.autograd.grad on *detached* copies
    of the hidden states and the weight, so no parameter hook fires during forward; backward returns the
    stored gradients, scaled by the incoming gradient (DeepSpeed's loss scaling and ×world normalisation
    pass through unchanged), into the normal graph, where the hidden-state gradient continues into the
    decoder and the weight gradient lands in lm_head.weight (tied embeddings: summed with the embedding's).
    Under ZeRO-3 the lm_head weight is a partition; the forward gathers it (GatheredParameters) for the
    chunks, and its full-shape gradient goes to ZeRO's reduce-scatter hook like any other.

    Full-logits path: `model(...).logits` at the completion positions, fp32 log-softmax, the objective.
    """

    def __init__(self, model: torch.nn.Module, chunk_tokens: int | None, zero_stage: int) -> None:
        super().__init__()
        self.model = model
        self.chunk_tokens = chunk_tokens
        self.zero_stage = zero_stage
        self.blocker = "chunking disabled" if chunk_tokens is None else chunking_blocker(model)

    @property
    def chunked(self) -> bool:
        return self.blocker is None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, rows: torch.Tensor,
                cols: torch.Tensor, batch: TokenBatch, objective: Objective,
                bind: Callable[[Objective, torch.Tensor], Objective]) -> tuple[torch.Tensor, dict[str, float]]:
        """(sum over the batch's tokens of the objective's per-token loss, its metrics). `bind(objective,
        sampled_logprobs_N)` fixes batch-level statistics (M2PO) over the global batch; it is collective."""
        if not self.chunked:
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            logprobs = torch.log_softmax(logits[rows, cols].float(), -1)
            objective = bind(objective, logprobs.detach().gather(-1, batch.sampled_ids[:, None])[:, 0])
            out = objective(logprobs, batch)
            return out.loss.sum(), out.metrics
        decoder = self.model.get_decoder()
        hidden = _last_hidden(decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False))[rows, cols]
        weight = self.model.get_output_embeddings().weight
        with self._gathered(weight):
            chunk = self.chunk_tokens
            assert chunk is not None
            objective = bind(objective, sampled_token_logprobs(hidden, weight, batch, chunk))
            return chunked_student_logprobs_loss(hidden, weight, batch, objective, chunk)

    def _gathered(self, weight: torch.nn.Parameter):
        # Under ZeRO-3, reading the weight inside this forward makes DeepSpeed (0.19) gather it and register it
        # as an external parameter of this module, which it then fetches before and releases after every later
        # forward. Gathering it again here would partition it on exit while DeepSpeed still counts it in use
        # ("Cannot free a ZeRO-3 parameter while it is still active", from the second step on): gather only a
        # weight that is not already available.
        from_deepspeed = getattr(weight, "ds_status", None)
        if self.zero_stage != 3 or from_deepspeed is None or from_deepspeed.name == "AVAILABLE":
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters([weight], modifier_rank=None)
