"""Held-out evaluation of a student against its teacher, in the learner (`eval.every`), standalone
(`asyncopd eval MODEL_DIR`) and for the `make run` summary: the judged accuracy of greedy completions on the
rows that carry an answer (`eval.task` / `eval.extract`, see `asyncopd.tasks`), and the exact per-token
KL(student || teacher) over the full vocabulary along the student's own samples — the quantity on-policy
distillation minimises, and the only figure for rows without answers. Chat rows are rendered with the
tokenizer's chat template. Uses HF transformers (torch): never imported by the coordinator."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from asyncopd.jobspec import JobSpec
from asyncopd.prompts import heldout_rows, training_rows
from asyncopd.tasks import judge


@dataclass
class EvalResult:
    accuracy: float | None  # None: no row carries an answer
    kl_to_teacher: float | None  # None: the job turned it off
    judged: int  # rows with an answer
    samples: list[dict] = field(default_factory=list)  # prompt, student, teacher, answer, score


class Evaluator:
    """Loads the teacher once; evaluates any number of student checkpoints on the same held-out rows."""

    def __init__(self, teacher_dir: str, rows: list[dict], *, max_tokens: int, scorer: Callable[[str, str], float],
                 seed: int = 0, with_kl: bool = True, samples: int = 0) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.tok = AutoTokenizer.from_pretrained(teacher_dir)
        self.teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval() \
            if with_kl else None
        self.rows, self.max_tokens, self.seed, self.scorer = rows, max_tokens, seed, scorer
        self.n_samples = min(samples, len(rows))
        self.encoded = [self._encode(r) for r in rows]
        self._teacher_texts: list[str] | None = None

    @classmethod
    def for_job(cls, spec: JobSpec, rows: list[dict] | None = None) -> Evaluator:
        rows = rows if rows is not None else heldout_rows(spec.prompts)
        return cls(spec.teacher.model, rows, max_tokens=spec.eval.max_tokens or spec.generation.max_tokens,
                   scorer=judge(spec.eval.task, spec.eval.extract), seed=spec.train.seed, with_kl=spec.eval.kl,
                   samples=spec.eval.samples)

    def _encode(self, row: dict) -> list[int]:
        if "messages" in row:
            if not self.tok.chat_template:
                raise ValueError("a held-out row has chat messages but the tokenizer has no chat template")
            text = self.tok.apply_chat_template(row["messages"], add_generation_prompt=True, tokenize=False)
            return self.tok(text, add_special_tokens=False)["input_ids"]
        return self.tok(row["prompt"])["input_ids"]

    def _batch(self, encoded: list[list[int]]):
        """Left-padded input ids and attention mask (generation continues every row at the same position)."""
        torch, pad = self.torch, self.tok.pad_token_id
        width = max(len(x) for x in encoded)
        ids = torch.full((len(encoded), width), pad, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for i, x in enumerate(encoded):
            ids[i, width - len(x):], mask[i, width - len(x):] = torch.tensor(x), 1
        return ids, mask

    def _load(self, model_dir: str):
        from asyncopd.ml.weights.hf import load_causal_lm  # a published delta version too (weights_transport)

        return load_causal_lm(model_dir, self.torch.float32).eval()

    def greedy(self, model, encoded: list[list[int]]) -> list[str]:
        ids, mask = self._batch(encoded)
        with self.torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=self.max_tokens, do_sample=False,
                                 pad_token_id=self.tok.pad_token_id)
        return self.tok.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)

    def accuracy(self, model) -> tuple[float | None, list[str]]:
        """The score of greedy completions on the rows with an answer, and every row's completion."""
        texts = self.greedy(model, self.encoded)
        scores = [self.scorer(t, r["answer"]) for t, r in zip(texts, self.rows, strict=True) if "answer" in r]
        return (sum(scores) / len(scores) if scores else None), texts

    def kl_to_teacher(self, model) -> float:
        """Mean over sampled completion tokens of the exact KL(student || teacher) at each position."""
        torch = self.torch
        torch.manual_seed(self.seed)
        ids, mask = self._batch(self.encoded)
        with torch.no_grad():
            seq = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, max_new_tokens=self.max_tokens,
                                 temperature=1.0, top_k=0, top_p=1.0, pad_token_id=self.tok.pad_token_id)
            start = ids.shape[1]
            full_mask = torch.cat([mask, (seq[:, start:] != self.tok.pad_token_id).long()], dim=1)
            s = torch.log_softmax(model(seq, attention_mask=full_mask).logits[:, start - 1 : -1].float(), -1)
            t = torch.log_softmax(self.teacher(seq, attention_mask=full_mask).logits[:, start - 1 : -1].float(), -1)
            kl = (s.exp() * (s - t)).sum(-1)
            # Positions after a sequence ended are padding; the end-of-sequence token itself counts.
            valid = full_mask[:, start:].bool()
        return float(kl[valid].mean())

    def teacher_texts(self) -> list[str] | None:
        """The teacher's greedy completions of the sample rows (computed once; None without the teacher)."""
        if self.teacher is None or not self.n_samples:
            return None
        if self._teacher_texts is None:
            self._teacher_texts = self.greedy(self.teacher, self.encoded[: self.n_samples])
        return self._teacher_texts

    def evaluate(self, model_dir: str) -> EvalResult:
        model = self._load(model_dir)
        accuracy, texts = self.accuracy(model)
        kl = self.kl_to_teacher(model) if self.teacher is not None else None
        teacher = self.teacher_texts()
        samples = []
        for i in range(self.n_samples):
            row = self.rows[i]
            samples.append({"prompt": row.get("prompt", row.get("messages")), "student": texts[i],
                            "teacher": teacher[i] if teacher else None, "answer": row.get("answer"),
                            "score": self.scorer(texts[i], row["answer"]) if "answer" in row else None})
        return EvalResult(accuracy, kl, sum("answer" in r for r in self.rows), samples)

    def teacher_accuracy(self) -> float | None:
        return self.accuracy(self.teacher)[0] if self.teacher is not None else None


def heldout_report(spec: JobSpec, result_dir: str) -> dict[str, str]:
    """Rows for the `make run` summary: teacher, student before and after, and the share of the gap closed."""
    rows = heldout_rows(spec.prompts) or training_rows(spec.prompts)[: spec.prompts.heldout_limit]
    ev = Evaluator.for_job(spec.model_copy(update={"eval": spec.eval.model_copy(update={"kl": True})}), rows)
    before, after, teacher = ev.evaluate(spec.student.model), ev.evaluate(result_dir), ev.teacher_accuracy()
    out = {f"held-out KL(student||teacher), {len(rows)} prompts":
           f"{before.kl_to_teacher:.4f} before -> {after.kl_to_teacher:.4f} after"}
    if teacher is None or before.accuracy is None or after.accuracy is None:
        out["held-out accuracy"] = "not measured: no held-out row has an answer (KL only)"
        return out
    gap = teacher - before.accuracy
    closed = (after.accuracy - before.accuracy) / gap if gap > 0 else float("nan")
    out[f"held-out accuracy ({spec.eval.task}): teacher"] = f"{teacher:.1%}"
    out[f"held-out accuracy ({spec.eval.task}): student"] = (
        f"{before.accuracy:.1%} before -> {after.accuracy:.1%} after ({closed:.0%} of the gap to the teacher closed)")
    return out
