"""The one reader of prompt sources, for the coordinator's preflight, the evaluator and the tests.

A source (`prompts.path`) is a JSONL file, a local dataset file (`.parquet`, `.arrow`, `.json`/`.jsonl`,
`.csv`) or directory in a format Hugging Face `datasets` reads (a `save_to_disk` directory included), or a
hub dataset id (read where the cluster has network; never in tests). Each row gives a prompt — the text
column `prompt_field`, or the chat column `messages_field` (a list of `{"role", "content"}`) — and
optionally the answer column `answer_field` that held-out evaluation compares with. Rows come out as
`{"prompt": str}` or `{"messages": [...]}`, plus `"answer": str` when the row has one.

Held-out rows: `heldout_path` (another source), or `heldout_split` (another split of the same source), or
`heldout_size` (the last N rows of the training split, which training then never sees).

Every error names the job-spec field and the cause (missing column, empty split, unreadable file, the line
or row without a prompt), so a broken source fails its job with a reason instead of training on part of it.
JSONL files are read line by line here (error messages carry line numbers); everything else goes through
`datasets`, imported only then.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from asyncopd.jobspec import Prompts

# Extensions `datasets` reads with a packaged builder, by builder name.
BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".json": "json", ".jsonl": "json", ".csv": "csv"}


class PromptFileError(ValueError):
    pass


def is_chat(messages) -> bool:
    return isinstance(messages, list) and bool(messages) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in messages
    )


def parse_row(row, where: str, prompt_field: str = "prompt", messages_field: str = "messages",
              answer_field: str | None = "answer") -> dict:
    if not isinstance(row, dict):
        raise PromptFileError(f"{where} needs a string `{prompt_field}` or a list of chat `{messages_field}`")
    if isinstance(row.get(prompt_field), str):
        out = {"prompt": row[prompt_field]}
    elif is_chat(row.get(messages_field)):
        out = {"messages": [{"role": m["role"], "content": m["content"]} for m in row[messages_field]]}
    else:
        raise PromptFileError(f"{where} needs a string `{prompt_field}` or a list of chat `{messages_field}`")
    answer = row.get(answer_field) if answer_field else None
    if answer is not None:
        if not isinstance(answer, str | int | float) or isinstance(answer, bool):
            raise PromptFileError(f"{where}: `{answer_field}` must be a string or a number")
        out["answer"] = str(answer)
    return out


def read_prompt_file(path: str | Path, field: str = "prompts.path", limit: int | None = None, *,
                     prompt_field: str = "prompt", messages_field: str = "messages",
                     answer_field: str | None = "answer") -> list[dict]:
    """The rows of a JSONL prompt file, in order (the first `limit` when given)."""
    p = Path(path)
    if not p.is_file():
        raise PromptFileError(f"{field}: prompt file {path} does not exist")
    rows = []
    try:
        with open(p, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except (json.JSONDecodeError, RecursionError) as exc:
                    raise PromptFileError(f"{field}: line {n} is not JSON: {exc}") from None
                rows.append(parse_row(row, f"{field}: line {n}", prompt_field, messages_field, answer_field))
                if limit is not None and len(rows) >= limit:
                    break
    except UnicodeDecodeError as exc:
        raise PromptFileError(f"{field}: {path} is not UTF-8 text: {exc}") from None
    if not rows:
        raise PromptFileError(f"{field}: {path} holds no prompts")
    return rows


def _is_jsonl(path: str) -> bool:
    return path.endswith(".jsonl") and Path(path).is_file()


def load_dataset_rows(source: str, split: str, field: str, config: str | None = None) -> list[dict]:
    """Raw rows of a `datasets` source (local file or directory, or hub id), as dicts."""
    import datasets

    p = Path(source)
    try:
        if p.is_dir() and ((p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists()):
            loaded = datasets.load_from_disk(str(p))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise PromptFileError(f"{field}: {source} has no split {split!r} (splits: {sorted(loaded)})")
                loaded = loaded[split]
            return list(loaded)
        if p.is_file():
            builder = BUILDERS.get(p.suffix.lower())
            if builder is None:
                raise PromptFileError(f"{field}: {source}: unknown file type {p.suffix!r} "
                                      f"(one of {', '.join(sorted(BUILDERS))})")
            # A local file is one split; its rows are the training rows whatever `split` says.
            return list(datasets.load_dataset(builder, data_files=str(p), split="train"))
        if p.is_absolute() or source.startswith(".") or p.suffix.lower() in BUILDERS:
            raise PromptFileError(f"{field}: prompt source {source} does not exist")
        return list(datasets.load_dataset(source, config, split=split))  # a hub id
    except PromptFileError:
        raise
    except ValueError as exc:
        if "corresponds to no data" in str(exc):  # how `datasets` reports a file without rows
            raise PromptFileError(f"{field}: split {split!r} of {source} is empty") from None
        if "split" in str(exc).lower():
            raise PromptFileError(f"{field}: {source} has no split {split!r}: {exc}") from None
        raise PromptFileError(f"{field}: cannot read {source}: {exc}") from None
    except Exception as exc:  # unreadable file, unreachable hub, corrupt Arrow: the job fails with the cause
        raise PromptFileError(f"{field}: cannot read {source}: {type(exc).__name__}: {exc}") from None


def read_source(source: str, field: str, split: str, spec: Prompts) -> list[dict]:
    rows = _read_source(source, field, split, spec)
    if spec.as_chat:
        rows = [_as_chat(r) if "prompt" in r else r for r in rows]
    return rows


def _as_chat(row: dict) -> dict:
    out = {"messages": [{"role": "user", "content": row["prompt"]}]}
    return {**out, "answer": row["answer"]} if "answer" in row else out


def _read_source(source: str, field: str, split: str, spec: Prompts) -> list[dict]:
    if _is_jsonl(source):
        return read_prompt_file(source, field, prompt_field=spec.prompt_field,
                                messages_field=spec.messages_field, answer_field=spec.answer_field)
    raw = load_dataset_rows(source, split, field, spec.config)
    if not raw:
        raise PromptFileError(f"{field}: split {split!r} of {source} is empty")
    columns = set(raw[0])
    if spec.prompt_field not in columns and spec.messages_field not in columns:
        raise PromptFileError(f"{field}: {source} has neither a `{spec.prompt_field}` nor a `{spec.messages_field}` "
                              f"column (columns: {', '.join(sorted(columns))}); set prompts.prompt_field or "
                              "prompts.messages_field")
    return [parse_row(row, f"{field}: row {i}", spec.prompt_field, spec.messages_field, spec.answer_field)
            for i, row in enumerate(raw)]


def training_rows(spec: Prompts) -> list[dict]:
    """The rows prompts are released from (without the `heldout_size` tail)."""
    rows = read_source(spec.path, "prompts.path", spec.split, spec)
    if spec.heldout_size:
        if spec.heldout_size >= len(rows):
            raise PromptFileError(f"prompts.heldout_size: {spec.heldout_size} leaves no training rows of {len(rows)}")
        rows = rows[: -spec.heldout_size]
    return rows


def heldout_rows(spec: Prompts) -> list[dict] | None:
    """The held-out rows (the first `heldout_limit`), or None when the job names none."""
    if spec.heldout_path:
        rows = read_source(spec.heldout_path, "prompts.heldout_path", spec.heldout_split or spec.split, spec)
    elif spec.heldout_split:
        rows = read_source(spec.path, "prompts.heldout_split", spec.heldout_split, spec)
    elif spec.heldout_size:
        rows = read_source(spec.path, "prompts.path", spec.split, spec)[-spec.heldout_size:]
    else:
        return None
    return rows[: spec.heldout_limit]
