"""The arithmetic task: deterministic, disjoint splits, the shipped example files are exactly the recipe's."""

from pathlib import Path

from asyncopd.ml.tinymodels import DEFAULT
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
    assert arithmetic.read_jsonl(ROOT / "examples" / "arith-train.jsonl") == [
        {"prompt": p.prompt, "answer": p.answer} for p in train]
    assert arithmetic.read_jsonl(ROOT / "examples" / "arith-heldout.jsonl") == [
        {"prompt": p.prompt, "answer": p.answer} for p in held]


def test_exact_match_reads_the_first_word():
    p = arithmetic.Problem(47, 85)
    assert p.prompt == "Q: 47+85= A:" and p.answer == "132"
    assert arithmetic.is_correct(" 132", p.answer)
    assert arithmetic.is_correct(" 132 Q: 1+1", p.answer)
    assert not arithmetic.is_correct(" 1320", p.answer)
    assert not arithmetic.is_correct("", p.answer)
