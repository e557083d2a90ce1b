"""Held-out evaluation of a student against its teacher, standalone (`asyncopd eval MODEL_DIR`) and for the
`make run` summary: exact-match accuracy on the task (greedy decoding) and the exact per-token
KL(student || teacher) over the full vocabulary along the student's own samples — the quantity on-policy
distillation minimises. Uses HF transformers (torch): only the CLI, the learner and tests import it, never
the coordinator."""

from __future__ import annotations

import json
from pathlib import Path


def read_rows(path: str | Path, limit: int | None = None) -> list[dict]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "prompt" in r]
    return rows[:limit] if limit else rows


class Evaluator:
    """Loads the teacher once; evaluates any number of student checkpoints on the same held-out rows."""

    def __init__(self, teacher_dir: str, rows: list[dict], max_tokens: int = 8, seed: int = 0,
                 with_kl: bool = True) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.tok = AutoTokenizer.from_pretrained(teacher_dir)
        self.tok.padding_side = "left"
        self.teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval() \
            if with_kl else None
        self.rows, self.max_tokens, self.seed = rows, max_tokens, seed

    def _load(self, model_dir: str):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=self.torch.float32).eval()

    def accuracy(self, model) -> float | None:
        """Exact match of the first word of the greedy completion; None when the rows carry no answers."""
        from asyncopd.tasks.arithmetic import is_correct

        rows = [r for r in self.rows if "answer" in r]
        if not rows:
            return None
        enc = self.tok([r["prompt"] for r in rows], return_tensors="pt", padding=True)
        with self.torch.no_grad():
            out = model.generate(**enc, max_new_tokens=self.max_tokens, do_sample=False,
                                 pad_token_id=self.tok.pad_token_id)
        texts = self.tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        return sum(is_correct(t, r["answer"]) for t, r in zip(texts, rows, strict=True)) / len(rows)

    def kl_to_teacher(self, model) -> float:
        """Mean over sampled completion tokens of the exact KL(student || teacher) at each position."""
        torch = self.torch
        torch.manual_seed(self.seed)
        enc = self.tok([r["prompt"] for r in self.rows], return_tensors="pt", padding=True)
        with torch.no_grad():
            seq = model.generate(**enc, do_sample=True, max_new_tokens=self.max_tokens, temperature=1.0, top_k=0,
                                 top_p=1.0, pad_token_id=self.tok.pad_token_id)
            mask = (seq != self.tok.pad_token_id).long()
            start = enc["input_ids"].shape[1]
            s = torch.log_softmax(model(seq, attention_mask=mask).logits[:, start - 1 : -1].float(), -1)
            t = torch.log_softmax(self.teacher(seq, attention_mask=mask).logits[:, start - 1 : -1].float(), -1)
            kl = (s.exp() * (s - t)).sum(-1)
            # Positions after a sequence ended are padding; the end-of-sequence token itself counts.
            valid = mask[:, start:].bool()
        return float(kl[valid].mean())

    def evaluate(self, model_dir: str) -> dict:
        model = self._load(model_dir)
        kl = self.kl_to_teacher(model) if self.teacher is not None else None
        return {"accuracy": self.accuracy(model), "kl_to_teacher": kl}

    def teacher_accuracy(self) -> float | None:
        return self.accuracy(self.teacher)


def heldout_report(spec: dict, job: dict) -> dict[str, str]:
    """Rows for the `make run` summary: teacher, student before and after, and the share of the gap closed."""
    path = spec["prompts"].get("heldout_path") or spec["prompts"]["path"]
    rows = read_rows(path, spec["prompts"].get("heldout_limit", 16))
    ev = Evaluator(spec["teacher"]["model"], rows, max_tokens=spec.get("generation", {}).get("max_tokens", 8))
    before, after, teacher = ev.evaluate(spec["student"]["model"]), ev.evaluate(job["result_dir"]), \
        ev.teacher_accuracy()
    out = {f"held-out KL(student||teacher), {len(rows)} prompts":
           f"{before['kl_to_teacher']:.4f} before -> {after['kl_to_teacher']:.4f} after"}
    if teacher is not None:
        gap = teacher - before["accuracy"]
        closed = (after["accuracy"] - before["accuracy"]) / gap if gap > 0 else float("nan")
        out["held-out accuracy: teacher"] = f"{teacher:.1%}"
        out["held-out accuracy: student"] = (f"{before['accuracy']:.1%} before -> {after['accuracy']:.1%} after "
                                             f"({closed:.0%} of the gap to the teacher closed)")
    return out
