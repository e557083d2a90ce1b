from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass


@dataclass
class Completion:
    token_ids: list[int]
    logprobs: list[float]  # log-prob of each sampled token under the distribution it was sampled from
    finish_reason: str
    topk_ids: list[list[int]] | None = None  # [L][K] top-K of that distribution, when generate(top_k=K)


@dataclass
class SequenceScores:
    """Per completion position: the scored model's log-prob of the sampled token and its top-K."""

    sampled_logprobs: list[float]  # [L]
    topk_ids: list[list[int]]  # [L][K], best first
    topk_logprobs: list[list[float]]  # [L][K]


class Engine(ABC):
    """What rollout (generate) and teacher (score) code against. `version` is the policy version loaded."""

    version: int = 0
    # The vLLM weight-transfer backend versions can arrive through (`nccl` weights transport); None: from files.
    weight_transfer: str | None = None

    @abstractmethod
    def generate(self, prompts: list[list[int]], *, n: int, max_tokens: int, temperature: float,
                 seeds: list[int], top_k: int = 0) -> list[list[Completion]]:
        """n completions per prompt; with top_k, each position's top-K ids too (reverse_kl_topk support
        'student')."""

    @abstractmethod
    def score(self, prompts: list[list[int]], completions: list[list[int]], *, top_k: int) -> list[SequenceScores]:
        """Log-probs at temperature 1 (the model's own distribution), whatever the sampling temperature."""

    @abstractmethod
    def sample_positions(self, prompts: list[list[int]], completions: list[list[int]], *, m: int,
                         temperature: float, seeds: list[int]) -> list[tuple[list[list[int]], list[list[float]]]]:
        """Per completion position: m tokens drawn with replacement from the distribution that sampled that
        position (the behaviour policy at `temperature`), and their log-probs under it. For Monte Carlo
        objectives (reverse_kl_mc)."""

    @abstractmethod
    def score_tokens(self, prompts: list[list[int]], completions: list[list[int]],
                     token_ids: list[list[list[int]]]) -> list[list[list[float]]]:
        """Log-probs at temperature 1 of the given tokens at each completion position ([L][m] per sequence)."""

    @abstractmethod
    def load_weights(self, path: str, version: int) -> None:
        """Swap in the weights in `path` (HF safetensors layout). Called between requests only."""

    def load_tensors(self, tensors: dict, version: int) -> None:
        """Swap in weights given as tensors (HF names -> tensors; tied embeddings may appear once), e.g. a
        version the delta transport rebuilt in memory. Called between requests only."""
        raise NotImplementedError(f"{type(self).__name__} loads weights from a path only")

    def load_adapter(self, path: str, version: int, tensors: dict | None = None) -> None:
        """Serve the base model (loaded once, never changed) with the LoRA adapter at `path` (PEFT layout);
        `tensors` are its weights, already read and verified, for engines that take them in memory. Replaces
        the previous version's adapter. Called between requests only."""
        raise NotImplementedError(f"{type(self).__name__} cannot serve LoRA adapters")

    def close(self) -> None:
        """Free the model."""
