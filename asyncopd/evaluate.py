"""Held-out check of a student against its teacher: the exact per-token KL(student || teacher) over the full
vocabulary along the student's own samples, the quantity on-policy distillation minimises. Uses HF
transformers (torch), so only the CLI and tests import it, never the coordinator."""

from __future__ import annotations

import json
from pathlib import Path


def load_prompts(spec: dict) -> list[str]:
    path = spec["prompts"].get("heldout_path") or spec["prompts"]["path"]
    limit = spec["prompts"].get("heldout_limit", 16)
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [r["prompt"] for r in rows if "prompt" in r][:limit]


def reverse_kl(student_dir: str, teacher_dir: str, prompts: list[str], max_tokens: int, seed: int = 0) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(student_dir)
    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval()
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    torch.manual_seed(seed)
    total, count = 0.0, 0
    with torch.no_grad():
        for prompt in prompts:
            ids = tok(prompt, return_tensors="pt")["input_ids"]
            seq = student.generate(ids, do_sample=True, max_new_tokens=max_tokens, temperature=1.0, top_k=0,
                                   top_p=1.0, pad_token_id=tok.pad_token_id)
            n = seq.shape[1] - ids.shape[1]
            if n == 0:
                continue
            s = torch.log_softmax(student(seq).logits[0, ids.shape[1] - 1 : -1].float(), -1)
            t = torch.log_softmax(teacher(seq).logits[0, ids.shape[1] - 1 : -1].float(), -1)
            total += float((s.exp() * (s - t)).sum())
            count += n
    return total / max(count, 1)


def heldout_report(spec: dict, job: dict) -> dict[str, str]:
    prompts = load_prompts(spec)
    max_tokens = spec.get("generation", {}).get("max_tokens", 32)
    before = reverse_kl(spec["student"]["model"], spec["teacher"]["model"], prompts, max_tokens)
    after = reverse_kl(job["result_dir"], spec["teacher"]["model"], prompts, max_tokens)
    return {f"held-out KL(student||teacher), {len(prompts)} prompts": f"{before:.4f} before -> {after:.4f} after"}
