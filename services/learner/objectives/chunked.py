"""Loss over long sequences without materialising [N, V] logits for all N at once.

The lm_head projection, the fp32 log-softmax and the objective run one chunk of positions at a time,
and each chunk's gradient with respect to the hidden states and the lm_head weight is taken right away
(inside the forward, as Liger's fused linear cross-entropy does) and stored; backward only scales them.
Peak memory is then a few [chunk, V] buffers plus one [V, H] gradient, whatever N is, and no logits are
recomputed (activation checkpointing would run the projection twice).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Objective, TokenBatch, merge_metrics

Metrics = list[tuple[int, dict[str, float]]]


def chunked_student_logprobs_loss(
    hidden_NH: Tensor,
    lm_head_weight_VH: Tensor,
    batch: TokenBatch,
    objective: Objective,
    chunk_size: int = 1024,
) -> tuple[Tensor, dict[str, float]]:
    """Sum over the N tokens of the objective's per-token loss for logits hidden_NH @ lm_head_weight_VH.T.

    Returns (loss_sum, metrics); divide loss_sum by the batch's token count for a token mean. The result
    is differentiable with respect to both inputs (one backward; no double backward). An lm_head bias is
    not supported: the models we distil have none.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if objective.batch_level:  # not yet bound by the caller: bind on this batch
        objective = objective.bind(
            sampled_token_logprobs(hidden_NH, lm_head_weight_VH, batch, chunk_size), batch
        )
    parts: Metrics = []
    if torch.is_grad_enabled() and (hidden_NH.requires_grad or lm_head_weight_VH.requires_grad):
        loss = _ChunkedLoss.apply(hidden_NH, lm_head_weight_VH, batch, objective, chunk_size, parts)
    else:
        loss, _, _ = _run_chunks(
            hidden_NH, lm_head_weight_VH, batch, objective, chunk_size, parts, False, False
        )
    return loss, merge_metrics(parts)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # log-softmax at fp32 at least; fp64 inputs (exactness tests) stay fp64
    return torch.promote_types(dtype, torch.float32)


def _logprobs(hidden: Tensor, weight: Tensor) -> Tensor:
    logits = F.linear(hidden, weight)
    return logits.to(_compute_dtype(logits.dtype)).log_softmax(-1)


@torch.no_grad()
def sampled_token_logprobs(hidden_NH: Tensor, weight_VH: Tensor, batch: TokenBatch, chunk_size: int) -> Tensor:
    """[N] log pi_theta(y_t) of the sampled tokens, chunk by chunk and without grad: what `Objective.bind`
    needs, computed before the loss (a learner binding on a batch spread over ranks gathers these)."""
    ids_N = batch.sampled_ids.long()
    return torch.cat(
        [
            _logprobs(hidden_NH[s : s + chunk_size], weight_VH).gather(-1, ids_N[s : s + chunk_size, None])[
                :, 0
            ]
            for s in range(0, batch.num_tokens, chunk_size)
        ]
        or [hidden_NH.new_zeros(0, dtype=_compute_dtype(hidden_NH.dtype))]
    )


def _run_chunks(
    hidden_NH: Tensor,
    weight_VH: Tensor,
    batch: TokenBatch,
    objective: Objective,
    chunk_size: int,
    parts: Metrics,
    grad_hidden: bool,
    grad_weight: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The summed loss and, when asked, its gradients with respect to hidden_NH and weight_VH."""
    total = hidden_NH.new_zeros((), dtype=_compute_dtype(hidden_NH.dtype))
    hidden_grad = torch.empty_like(hidden_NH) if grad_hidden else None
    # accumulated over chunks, so kept at compute precision even for bf16 weights
    weight_grad = torch.zeros_like(weight_VH, dtype=_compute_dtype(weight_VH.dtype)) if grad_weight else None
    weight = weight_VH.detach().requires_grad_(grad_weight)
    for start in range(0, batch.num_tokens, chunk_size):
        end = min(start + chunk_size, batch.num_tokens)
        hidden = hidden_NH[start:end].detach().requires_grad_(grad_hidden)
        with torch.set_grad_enabled(grad_hidden or grad_weight):
            out = objective(_logprobs(hidden, weight), batch.slice(start, end))
            chunk_loss = out.loss.sum()
        parts.append((end - start, out.metrics))
        total += chunk_loss.detach()
        wanted = [t for t, want in ((hidden, grad_hidden), (weight, grad_weight)) if want]
        if wanted:
            grads = list(torch.autograd.grad(chunk_loss, wanted, allow_unused=True))
            if grad_hidden:
                g = grads.pop(0)
                hidden_grad[start:end] = 0 if g is None else g  # type: ignore[index]
            if grad_weight and (g := grads.pop(0)) is not None:
                weight_grad += g  # type: ignore[operator]
    return total, hidden_grad, weight_grad


class _ChunkedLoss(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        hidden_NH: Tensor,
        weight_VH: Tensor,
        batch: TokenBatch,
        objective: Objective,
        chunk_size: int,
        parts: Metrics,
    ) -> Tensor:
        grad_hidden, grad_weight = ctx.needs_input_grad[:2]  # type: ignore[attr-defined]
        total, hidden_grad, weight_grad = _run_chunks(
            hidden_NH, weight_VH, batch, objective, chunk_size, parts, grad_hidden, grad_weight
        )
        ctx.save_for_backward(hidden_grad, weight_grad)
        ctx.weight_dtype = weight_VH.dtype  # type: ignore[attr-defined]
        return total

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_total: Tensor):  # type: ignore[override]
        hidden_grad, weight_grad = ctx.saved_tensors  # type: ignore[attr-defined]
        scale_h = None if hidden_grad is None else hidden_grad * grad_total.to(hidden_grad.dtype)
        scale_w = None if weight_grad is None else (weight_grad * grad_total).to(ctx.weight_dtype)  # type: ignore[attr-defined]
        return scale_h, scale_w, None, None, None, None
