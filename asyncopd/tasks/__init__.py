"""How held-out answers are judged: the job's `eval.task` and `eval.extract`.

- `exact_match` (the default): the answer extracted from the completion equals the row's answer (itself read
  with the same extractor when it can be: gsm8k's references end in `#### 72`), after normalisation
  (whitespace; numbers compare as numbers, `1,234` = `1234.0`).
- `arithmetic`: the toy task's rule (`tasks/arithmetic.py`), i.e. exact_match with `first_word`.
- any name registered by an installed package in the entry-point group `asyncopd.tasks`: the entry point
  loads to a callable `judge(completion: str, answer: str) -> bool | float` (a float is a score in [0, 1]).
  Code is never sent over the REST API: a job can only name a judge its image already has.

Extractors (`eval.extract`): `first_word`, `last_number`, `gsm8k` (the number after `####`), `boxed` (the
contents of the last `\\boxed{...}`), `regex:<pattern>` (group 1 if the pattern has one, else the match; the
last match in the completion). Torch-free: the coordinator validates job specs with it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from importlib.metadata import entry_points

ENTRY_POINT_GROUP = "asyncopd.tasks"
BUILTIN_TASKS = ("exact_match", "arithmetic")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def _first_word(text: str) -> str | None:
    words = text.split()
    return words[0] if words else None


def _last_number(text: str) -> str | None:
    found = _NUMBER.findall(text)
    return found[-1] if found else None


def _gsm8k(text: str) -> str | None:
    match = re.search(r"####\s*(.+)", text)
    return _last_number(match.group(1)) if match else None


def _boxed(text: str) -> str | None:
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


EXTRACTORS: dict[str, Callable[[str], str | None]] = {
    "first_word": _first_word, "last_number": _last_number, "gsm8k": _gsm8k, "boxed": _boxed}


def extractor(name: str) -> Callable[[str], str | None]:
    if name.startswith("regex:"):
        try:
            pattern = re.compile(name[len("regex:"):])
        except re.error as exc:
            raise ValueError(f"eval.extract: bad regular expression: {exc}") from None

        def by_regex(text: str) -> str | None:
            matches = list(pattern.finditer(text))
            if not matches:
                return None
            return matches[-1].group(1) if pattern.groups else matches[-1].group(0)

        return by_regex
    if name not in EXTRACTORS:
        raise ValueError(f"eval.extract: {name!r} is none of {sorted(EXTRACTORS)} or 'regex:<pattern>'")
    return EXTRACTORS[name]


def normalize(answer: str) -> str:
    text = " ".join(answer.strip().split()).rstrip(".").replace("$", "")
    number = text.replace(",", "")
    try:
        value = float(number)
    except ValueError:
        return text
    return str(int(value)) if value.is_integer() else repr(value)


def registered() -> dict[str, object]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def judge(task: str, extract: str = "first_word") -> Callable[[str, str], float]:
    """A function (completion, answer) -> score in [0, 1] for the job's task; ValueError names what is wrong."""
    if task in BUILTIN_TASKS:
        get = extractor("first_word" if task == "arithmetic" else extract)

        def exact(completion: str, answer: str) -> float:
            got = get(completion)
            # A reference written like the completion (gsm8k's "...#### 72") is read the same way.
            want = get(answer) if task == "exact_match" else None
            return float(got is not None and normalize(got) == normalize(want if want is not None else answer))

        return exact
    plugins = registered()
    if task not in plugins:
        raise ValueError(f"eval.task: {task!r} is neither built in ({', '.join(BUILTIN_TASKS)}) nor registered by "
                         f"an installed package in the entry-point group {ENTRY_POINT_GROUP!r} "
                         f"(registered: {sorted(plugins) or 'none'})")
    scorer = plugins[task].load()
    return lambda completion, answer: float(scorer(completion, answer))
