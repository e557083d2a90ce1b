"""Scored stream entries -> model inputs and the per-token data of their completion positions."""

from __future__ import annotations

import torch

from asyncopd.streams import ScoredEntry
from services.learner.objectives import TokenBatch


def token_batch(entries: list[ScoredEntry], device: torch.device) -> tuple[dict, TokenBatch]:
    """Model inputs for a list of samples and the per-token data of their completion positions only."""
    inputs = [e.prompt_token_ids + e.completion_token_ids[:-1] for e in entries]
    width = max(len(x) for x in inputs)
    input_ids = torch.zeros(len(inputs), width, dtype=torch.long)
    attention = torch.zeros(len(inputs), width, dtype=torch.long)
    rows, cols = [], []
    for i, (e, x) in enumerate(zip(entries, inputs, strict=True)):
        input_ids[i, : len(x)] = torch.tensor(x)
        attention[i, : len(x)] = 1
        start = len(e.prompt_token_ids) - 1  # logits here predict the first completion token
        rows += [i] * len(e.completion_token_ids)
        cols += range(start, start + len(e.completion_token_ids))
    k = entries[0].top_k

    def flat(name: str, dtype=torch.float32) -> torch.Tensor:
        return torch.tensor([v for e in entries for v in getattr(e, name)], dtype=dtype, device=device)

    m = entries[0].mc_samples
    extra = {}
    if m:  # reverse_kl_mc: the rollout's extra tokens per position, scored by the teacher
        extra = {"mc_ids": flat("mc_token_ids", torch.long).view(-1, m),
                 "mc_behavior_logprobs": flat("mc_behavior_logprobs").view(-1, m),
                 "mc_teacher_logprobs": flat("mc_teacher_logprobs").view(-1, m)}
    if t := entries[0].teacher_samples:  # forward_kl_mc: the teacher's own draws per position
        extra |= {"teacher_sample_ids": flat("teacher_sample_ids", torch.long).view(-1, t),
                  "teacher_sample_logprobs": flat("teacher_sample_logprobs").view(-1, t)}
    batch = TokenBatch(
        sampled_ids=flat("completion_token_ids", torch.long),
        behavior_logprobs=flat("behavior_logprobs"),
        teacher_sampled_logprobs=flat("teacher_sampled_logprobs"),
        support_ids=flat("support_ids", torch.long).view(-1, k),
        teacher_support_logprobs=flat("teacher_support_logprobs").view(-1, k),
        **extra,
    )
    model_inputs = {"input_ids": input_ids.to(device), "attention_mask": attention.to(device),
                    "rows": torch.tensor(rows, device=device), "cols": torch.tensor(cols, device=device)}
    return model_inputs, batch
