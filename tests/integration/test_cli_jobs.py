"""`asyncopd validate` and `asyncopd eval` on job files, with real tiny models (no stack)."""

import json

import pytest
import yaml

from asyncopd.tools.cli import main
from tests.helpers import ROOT, tiny_job


@pytest.mark.parametrize("name,flags", [("tiny-job.yaml", []), ("qwen-gsm8k.yaml", ["--spec-only"])])
def test_shipped_job_files_validate_from_the_command_line(name, flags, capsys):
    main(["validate", *flags, str(ROOT / "examples" / name)])
    assert capsys.readouterr().out.strip().endswith("valid")


def test_validate_names_what_is_wrong(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"student": {"model": "s"}, "teacher": {"model": "t"},
                                   "prompts": {"path": str(tmp_path / "none.jsonl")}, "max_staleness": -1}))
    with pytest.raises(SystemExit, match=r"max_staleness: Input should be greater than or equal to 0"):
        main(["validate", str(bad)])
    bad.write_text(yaml.safe_dump({"student": {"model": "s"}, "teacher": {"model": "t"},
                                   "prompts": {"path": str(tmp_path / "none.jsonl")}}))
    with pytest.raises(SystemExit, match=r"prompts.path: prompt source .*none.jsonl does not exist"):
        main(["validate", str(bad)])


def test_eval_judges_a_model_as_the_job_file_says(tiny_models, tmp_path, capsys):
    spec = tiny_job(tiny_models, prompts={"heldout_path": str(tiny_models["heldout"]), "heldout_limit": 8},
                    eval={"task": "exact_match", "extract": "first_word", "samples": 2})
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(spec))
    main(["eval", str(tiny_models["teacher"]), str(job)])
    out = json.loads(capsys.readouterr().out)
    assert out["task"] == "exact_match" and out["judged"] == 8
    assert out["accuracy"] == out["teacher_accuracy"]  # the teacher judged against itself
    assert out["kl_to_teacher"] == pytest.approx(0.0, abs=1e-6) and len(out["samples"]) == 2
