"""A benchmark instrument, never a default: an engine that takes a fixed time per call and returns random
tokens with exact uniform log-probs. With every stage's latency fixed, the pipeline's achieved throughput
can be compared with the ideal (Σ stage time / max stage time) whatever else the machine is doing."""

from __future__ import annotations

import math
import random
import time

from asyncopd.ml.engines.base import Completion, Engine, SequenceScores


class SyntheticEngine(Engine):
    def __init__(self, vocab_size: int, latency_s: float, seed: int) -> None:
        self.vocab_size, self.latency_s = vocab_size, latency_s
        self.rnd = random.Random(seed)
        self.logp = -math.log(vocab_size)

    def generate(self, prompts, *, n, max_tokens, temperature, seeds, top_k=0):
        time.sleep(self.latency_s)
        top = [list(range(min(top_k, self.vocab_size)))] * max_tokens if top_k else None
        return [[Completion([self.rnd.randrange(3, self.vocab_size) for _ in range(max_tokens)],
                            [self.logp] * max_tokens, "length", top) for _ in range(n)] for _ in prompts]

    def score(self, prompts, completions, *, top_k):
        time.sleep(self.latency_s)
        k = min(top_k, self.vocab_size)
        return [SequenceScores([self.logp] * len(c), [list(range(k)) for _ in c], [[self.logp] * k for _ in c])
                for c in completions]

    def sample_positions(self, prompts, completions, *, m, temperature, seeds):
        return [([[self.rnd.randrange(3, self.vocab_size) for _ in range(m)] for _ in c], [[self.logp] * m for _ in c])
                for c in completions]

    def score_tokens(self, prompts, completions, token_ids):
        return [[[self.logp] * len(row) for row in ids] for ids in token_ids]

    def load_weights(self, path, version):
        self.version = version

    def load_tensors(self, tensors, version):
        self.version = version

    def load_adapter(self, path, version, tensors=None):
        self.version = version
