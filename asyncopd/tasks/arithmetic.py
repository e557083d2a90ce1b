"""Multi-digit addition with the sum written least-significant digit first: `Q: 47+85= A:` → ` 231` (132).

Writing the sum in the order a person adds (units, then tens with the carry) makes it learnable by a
two-layer model in minutes on a CPU; writing it most-significant first needs the whole carry chain before
the first digit and a model this small stays near 20 %. Exact-match accuracy is meaningful, splits are
deterministic from a seed, and held-out problems never appear in the training split."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Problem:
    a: int
    b: int

    @property
    def prompt(self) -> str:
        return f"Q: {self.a}+{self.b}= A:"

    @property
    def answer(self) -> str:
        return str(self.a + self.b)

    @property
    def completion(self) -> str:
        """What a correct model writes after the prompt (the tokenizer adds end-of-sequence)."""
        return f" {self.answer}"


def problems(seed: int, count: int, max_value: int = 999) -> list[Problem]:
    rnd = random.Random(seed)
    seen, out = set(), []
    while len(out) < count:
        p = Problem(rnd.randint(0, max_value), rnd.randint(0, max_value))
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


def splits(seed: int, train: int, heldout: int, max_value: int = 999) -> tuple[list[Problem], list[Problem]]:
    """Disjoint train and held-out problems."""
    allp = problems(seed, train + heldout, max_value)
    return allp[:train], allp[train:]


def write_jsonl(path: Path, items: list[Problem]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        for p in items:
            fh.write(json.dumps({"prompt": p.prompt, "answer": p.answer}) + "\n")

