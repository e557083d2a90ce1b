"""The one prompt-file reader: what it accepts, and errors that name the field and the line."""

import pytest

from asyncopd.prompts import PromptFileError, read_prompt_file
from tests.helpers import ROOT


def test_plain_chat_and_answer_rows(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "Q: 1+1= A:", "answer": 2}\n\n'
                 '{"messages": [{"role": "user", "content": "hi"}], "extra": "ignored"}\n'
                 '{"prompt": "third"}\n')
    assert read_prompt_file(f) == [{"prompt": "Q: 1+1= A:", "answer": "2"},
                                   {"messages": [{"role": "user", "content": "hi"}]}, {"prompt": "third"}]
    assert read_prompt_file(f, limit=2) == read_prompt_file(f)[:2]


@pytest.mark.parametrize("text,error", [
    ('{"prompt": "a"}\n{"prompt": 3}\n', "prompts.path: line 2 needs a string `prompt`"),
    ('{"prompt": "a"}\n{oops\n', "prompts.path: line 2 is not JSON"),
    ('["a"]\n', "line 1 needs a string `prompt`"),
    ('{"messages": [{"role": "user"}]}\n', "line 1 needs a string `prompt` or a list of chat `messages`"),
    ('{"prompt": "a", "answer": [1]}\n', "line 1: `answer` must be a string or a number"),
    ("\n\n", "holds no prompts"),
])
def test_bad_files_name_the_field_and_line(tmp_path, text, error):
    f = tmp_path / "p.jsonl"
    f.write_text(text)
    with pytest.raises(PromptFileError, match=error.replace("[", r"\[")):
        read_prompt_file(f)


def test_a_missing_file_names_the_field(tmp_path):
    with pytest.raises(PromptFileError, match="prompts.heldout_path: prompt file .* does not exist"):
        read_prompt_file(tmp_path / "nope.jsonl", "prompts.heldout_path")


def prompts(**kw):
    from asyncopd.jobspec import Prompts

    return Prompts.model_validate(kw)


def test_a_parquet_dataset_with_chat_rows_and_a_heldout_tail():
    """The shipped Parquet file: chat messages + answers; the last 32 rows held out, never trained on."""
    from asyncopd.prompts import heldout_rows, training_rows

    spec = prompts(path=str(ROOT / "examples" / "arith-chat.parquet"), heldout_size=32, heldout_limit=8)
    train, held = training_rows(spec), heldout_rows(spec)
    assert len(train) == 160 and len(held) == 8
    first = read_prompt_file(ROOT / "examples" / "arith-train.jsonl", limit=1)[0]
    assert train[0] == {"messages": [{"role": "user", "content": first["prompt"]}], "answer": first["answer"]}
    all_rows = training_rows(prompts(path=spec.path))
    assert held == all_rows[160:168] and not {str(r) for r in held} & {str(r) for r in train}


def test_arrow_directories_by_split_and_field_names(tmp_path):
    import datasets

    from asyncopd.prompts import heldout_rows, training_rows

    datasets.DatasetDict({
        "train": datasets.Dataset.from_list([{"question": f"q{i}", "solution": f"#### {i}"} for i in range(5)]),
        "test": datasets.Dataset.from_list([{"question": "t0", "solution": "#### 9"}]),
    }).save_to_disk(tmp_path / "ds")
    spec = prompts(path=str(tmp_path / "ds"), prompt_field="question", answer_field="solution", heldout_split="test")
    assert training_rows(spec)[1] == {"prompt": "q1", "answer": "#### 1"}
    assert heldout_rows(spec) == [{"prompt": "t0", "answer": "#### 9"}]
    with pytest.raises(PromptFileError, match=r"has no split 'validation' \(splits: \['test', 'train'\]\)"):
        training_rows(spec.model_copy(update={"split": "validation"}))


def test_csv_and_a_dataset_without_answers(tmp_path):
    from asyncopd.prompts import training_rows

    (tmp_path / "p.csv").write_text("text,other\nhello,1\nworld,2\n")
    rows = training_rows(prompts(path=str(tmp_path / "p.csv"), prompt_field="text"))
    assert rows == [{"prompt": "hello"}, {"prompt": "world"}]


@pytest.mark.parametrize("make,error", [
    (lambda d: d.from_list([{"text": "a"}]), r"has neither a `prompt` nor a `messages` column \(columns: text\)"),
    (lambda d: d.from_list([{"prompt": "a"}, {"prompt": None}]), r"prompts.path: row 1 needs a string `prompt`"),
    (lambda d: d.from_dict({"prompt": []}), r"split 'train' of .* is empty"),
])
def test_dataset_errors_name_the_field_and_cause(tmp_path, make, error):
    import datasets

    from asyncopd.prompts import training_rows

    make(datasets.Dataset).to_parquet(tmp_path / "p.parquet")
    with pytest.raises(PromptFileError, match=error):
        training_rows(prompts(path=str(tmp_path / "p.parquet")))


def test_unreadable_and_unknown_files_fail_with_the_cause(tmp_path):
    from asyncopd.prompts import training_rows

    (tmp_path / "p.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(PromptFileError, match=r"prompts.path: cannot read .*p.parquet"):
        training_rows(prompts(path=str(tmp_path / "p.parquet")))
    (tmp_path / "p.xlsx").write_bytes(b"x")
    with pytest.raises(PromptFileError, match=r"unknown file type '.xlsx'"):
        training_rows(prompts(path=str(tmp_path / "p.xlsx")))
    (tmp_path / "bad.jsonl").write_bytes(b'{"prompt": "\xff\xfe"}\n')
    with pytest.raises(PromptFileError, match="is not UTF-8 text"):
        training_rows(prompts(path=str(tmp_path / "bad.jsonl")))
    with pytest.raises(PromptFileError, match="does not exist"):
        training_rows(prompts(path=str(tmp_path / "missing-dir") + "/"))
    with pytest.raises(PromptFileError, match="heldout_size: 5 leaves no training rows of 2"):
        (tmp_path / "two.jsonl").write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
        training_rows(prompts(path=str(tmp_path / "two.jsonl"), heldout_size=5))


def test_heldout_size_cannot_be_combined_with_another_heldout_source():
    with pytest.raises(ValueError, match="cannot be combined"):
        prompts(path="p.jsonl", heldout_size=4, heldout_split="test")
