"""The arithmetic task: deterministic, disjoint splits, the shipped example files are exactly the recipe's."""

from pathlib import Path

import pytest

from asyncopd import tasks
from asyncopd.ml.tinymodels import DEFAULT
from asyncopd.prompts import read_prompt_file
from asyncopd.tasks import arithmetic

ROOT = Path(__file__).resolve().parents[2]


def test_splits_are_deterministic_and_disjoint():
    a_train, a_held = arithmetic.splits(3, 500, 50)
    b_train, b_held = arithmetic.splits(3, 500, 50)
    assert (a_train, a_held) == (b_train, b_held)
    assert not set(a_train) & set(a_held)
    assert arithmetic.splits(4, 500, 50)[0] != a_train


def test_shipped_prompt_files_are_the_recipe_splits():
    train, held = arithmetic.splits(DEFAULT.split_seed, DEFAULT.train_problems, DEFAULT.heldout_problems,
                                    DEFAULT.max_value)
    assert read_prompt_file(ROOT / "examples" / "arith-train.jsonl") == [
        {"prompt": p.prompt, "answer": p.answer} for p in train]
    assert read_prompt_file(ROOT / "examples" / "arith-heldout.jsonl") == [
        {"prompt": p.prompt, "answer": p.answer} for p in held]


def test_exact_match_reads_the_first_word():
    p = arithmetic.Problem(47, 85)
    assert p.prompt == "Q: 47+85= A:" and p.answer == "132"
    judge = tasks.judge("arithmetic")
    assert judge(" 132", p.answer) == 1.0
    assert judge(" 132 Q: 1+1", p.answer) == 1.0
    assert judge(" 1320", p.answer) == 0.0
    assert judge("", p.answer) == 0.0


@pytest.mark.parametrize("extract,completion,answer,score", [
    ("first_word", " 42 and more", "42", 1.0),
    ("last_number", "so 3 apples plus 4 is 1,234.", "1234", 1.0),
    ("last_number", "42.0", "42", 1.0),
    ("last_number", "no digits here", "4", 0.0),
    ("gsm8k", "Natalia sold 48/2 = 24 clips.\n#### 72", "72", 1.0),
    ("gsm8k", "the answer is 72", "72", 0.0),
    ("boxed", r"so \boxed{\frac{1}{2}} done", r"\frac{1}{2}", 1.0),
    ("boxed", r"\boxed{3} then \boxed{4}", "4", 1.0),
    ("boxed", r"\boxed{3", "3", 0.0),
    (r"regex:answer is (-?\d+)", "answer is 5, no, answer is -7", "-7", 1.0),
    (r"regex:\d+", "x 12 y 13", "13", 1.0),
])
def test_exact_match_extractors(extract, completion, answer, score):
    assert tasks.judge("exact_match", extract)(completion, answer) == score


def test_unknown_tasks_and_extractors_are_refused_by_name():
    with pytest.raises(ValueError, match="eval.task: 'nope' is neither built in"):
        tasks.judge("nope")
    with pytest.raises(ValueError, match="eval.extract: 'middle_word' is none of"):
        tasks.judge("exact_match", "middle_word")
    with pytest.raises(ValueError, match="eval.extract: bad regular expression"):
        tasks.judge("exact_match", "regex:(")


def test_a_judge_registered_by_an_installed_package_is_found_by_its_entry_point(tmp_path, monkeypatch):
    """A real installed distribution (a .dist-info with entry_points.txt on sys.path) registers `contains`."""
    (tmp_path / "judges_demo.py").write_text("def contains(completion, answer):\n    return answer in completion\n")
    info = tmp_path / "judges_demo-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: judges-demo\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[asyncopd.tasks]\ncontains = judges_demo:contains\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    judge = tasks.judge("contains")
    assert judge("it is 42 I think", "42") == 1.0 and judge("no", "42") == 0.0
