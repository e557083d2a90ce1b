"""Checks a job must pass before any service loads a model: paths exist, prompts parse, the teacher and the
student share one tokenizer (a teacher scoring student token ids from another vocabulary is silent garbage).
Each failure is a `PreflightError` whose message becomes the job's `reason`."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from asyncopd.jobspec import JobSpec
from asyncopd.prompts import PromptFileError, heldout_rows, training_rows

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class PreflightError(ValueError):
    pass


def _is_local(field: str, ref: str) -> bool:
    path = Path(ref)
    if path.exists():
        if not (path / "config.json").exists():
            raise PreflightError(f"{field}: {ref} has no config.json (not a Hugging Face model directory)")
        # The services run as one non-root user (uid 10001 in the images); a weight file it cannot read would
        # otherwise fail in the learner as "No such file or directory" (safetensors' message for EACCES).
        unreadable = sorted(f.name for f in path.iterdir() if f.is_file() and not os.access(f, os.R_OK))
        if unreadable:
            raise PreflightError(f"{field}: {', '.join(unreadable)} in {ref} not readable by uid {os.getuid()}, "
                                 "the user the services run as (make the model files readable to it)")
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


def load_prompts(spec: JobSpec) -> list[dict]:
    """The prompts to release, without the answers (those are for evaluation only). The held-out rows are read
    too, so a job whose held-out source is broken fails now rather than at its first evaluation."""
    try:
        rows = training_rows(spec.prompts)
        if spec.eval.every:
            heldout_rows(spec.prompts)
    except PromptFileError as exc:
        raise PreflightError(str(exc)) from exc
    return [{k: v for k, v in row.items() if k != "answer"} for row in rows]


def has_chat_template(model_dir: str) -> bool:
    """Whether a local HF tokenizer renders chat messages (in tokenizer_config.json or a chat_template file)."""
    path = Path(model_dir)
    if (path / "chat_template.jinja").exists() or (path / "chat_template.json").exists():
        return True
    config = path / "tokenizer_config.json"
    return config.exists() and bool(json.loads(config.read_text()).get("chat_template"))


def _jsonl_line(path: str, index: int) -> int | None:
    """The line number of the `index`-th row of a JSONL file (blank lines are skipped when reading)."""
    if not (path.endswith(".jsonl") and Path(path).is_file()):
        return None
    with open(path, encoding="utf-8") as fh:
        rows = (n for n, line in enumerate(fh, 1) if line.strip())
        return next((n for i, n in enumerate(rows) if i == index), None)


def check_lengths(spec: JobSpec, prompts: list[dict], max_model_len: int) -> None:
    """A prompt the engines cannot take (its tokens + generation.max_tokens over their max_model_len) fails the
    job now, naming its line, instead of being dead-lettered at the rollout. Needs the student's tokenizer.json
    (a hub id is not checked; the rollout then isolates such a prompt from its batch). Chat rows are counted
    by their contents alone, a lower bound (the template adds a few tokens)."""
    room = max_model_len - spec.generation.max_tokens
    if room < 1:
        raise PreflightError(f"generation.max_tokens: {spec.generation.max_tokens} leaves no room for a prompt "
                             f"within the engines' max_model_len of {max_model_len}")
    path = Path(spec.student.model) / "tokenizer.json"
    if not path.is_file():
        return
    texts = [p["prompt"] if "prompt" in p else "".join(m["content"] for m in p["messages"]) for p in prompts]
    # A token holds at least one byte (byte-level BPE; byte fallback): short prompts need no tokenizing.
    suspects = [i for i, text in enumerate(texts) if len(text.encode()) + 16 > room]
    if not suspects:
        return
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(path))
    for i, encoding in zip(suspects, tokenizer.encode_batch([texts[i] for i in suspects]), strict=True):
        if len(encoding.ids) > room:
            line = _jsonl_line(spec.prompts.path, i)
            where = f"line {line}" if line is not None else f"row {i}"
            raise PreflightError(
                f"prompts.path: {where} has {len(encoding.ids)} prompt tokens; with generation.max_tokens "
                f"{spec.generation.max_tokens} that is over the engines' max_model_len of {max_model_len} "
                "(shorten or drop the prompt, or raise ASYNCOPD_MAX_MODEL_LEN on the rollout, teacher and "
                "coordinator)")


def preflight(spec: JobSpec, max_model_len: int | None = None) -> list[dict]:
    check_models(spec)
    prompts = load_prompts(spec)
    if max_model_len is not None:
        check_lengths(spec, prompts, max_model_len)
    if (any("messages" in p for p in prompts) and Path(spec.student.model).is_dir()
            and not has_chat_template(spec.student.model)):
        raise PreflightError(f"prompts.path: rows carry chat messages but the student's tokenizer "
                             f"({spec.student.model}) has no chat template to render them")
    return prompts
