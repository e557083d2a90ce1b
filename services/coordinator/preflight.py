"""Checks a job must pass before any service loads a model: paths exist, prompts parse, the teacher and the
student share one tokenizer (a teacher scoring student token ids from another vocabulary is silent garbage).
Each failure is a `PreflightError` whose message becomes the job's `reason`."""

from __future__ import annotations

import json
import re
from pathlib import Path

from asyncopd.jobspec import JobSpec

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class PreflightError(ValueError):
    pass


def _is_local(field: str, ref: str) -> bool:
    path = Path(ref)
    if path.exists():
        if not (path / "config.json").exists():
            raise PreflightError(f"{field}: {ref} has no config.json (not a Hugging Face model directory)")
        return True
    if HUB_ID.match(ref) and not ref.startswith((".", "/")):
        return False  # a hub id: the serving engine resolves it (its cache, or the hub where reachable)
    raise PreflightError(f"{field}: model path {ref} does not exist")


def _vocab(model_dir: str) -> dict[str, int] | None:
    from tokenizers import Tokenizer

    path = Path(model_dir) / "tokenizer.json"
    return Tokenizer.from_file(str(path)).get_vocab() if path.exists() else None


def check_models(spec: JobSpec) -> None:
    student_local = _is_local("student.model", spec.student.model)
    teacher_local = _is_local("teacher.model", spec.teacher.model)
    if student_local and teacher_local:
        s, t = _vocab(spec.student.model), _vocab(spec.teacher.model)
        if s is None or t is None:
            raise PreflightError("teacher and student need tokenizer.json to check they share a vocabulary")
        if s != t:
            only_s, only_t = len(s.keys() - t.keys()), len(t.keys() - s.keys())
            raise PreflightError(
                f"teacher and student tokenizers differ (student vocab {len(s)}, teacher vocab {len(t)}, "
                f"{only_s} tokens only in the student, {only_t} only in the teacher, or ids differ): "
                "on-policy distillation needs the same tokenizer on both sides"
            )


def load_prompts(path: str, field: str = "prompts.path") -> list[dict]:
    p = Path(path)
    if not p.is_file():
        raise PreflightError(f"{field}: prompt file {path} does not exist")
    prompts = []
    with open(p) as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise PreflightError(f"{field}: line {n} is not JSON: {exc}") from exc
            if isinstance(row, dict) and isinstance(row.get("prompt"), str):
                prompts.append({"prompt": row["prompt"]})
            elif isinstance(row, dict) and _is_chat(row.get("messages")):
                prompts.append({"messages": row["messages"]})
            else:
                raise PreflightError(f"{field}: line {n} needs a string `prompt` or a list of chat `messages`")
    if not prompts:
        raise PreflightError(f"{field}: {path} holds no prompts")
    return prompts


def _is_chat(messages) -> bool:
    return isinstance(messages, list) and bool(messages) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in messages
    )


def preflight(spec: JobSpec) -> list[dict]:
    check_models(spec)
    return load_prompts(spec.prompts.path)
