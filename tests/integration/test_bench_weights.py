"""`asyncopd models --sizes` and `asyncopd bench --suite weights --smoke`: the cost-curve harness runs end to
end (a real DeepSpeed run, every transport, HF and vLLM engines, an `nccl` transfer round) and writes its
report. It measures nothing (its host-memory rows at the example size are allocator noise)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

from tests.helpers import ROOT


def test_size_presets_build_llama_models_of_the_named_shape(tmp_path):
    from asyncopd.ml.tinymodels import SIZES, build_sizes

    path = build_sizes(tmp_path, ["example"], log=lambda _: None)["example"]
    config = json.loads((path / "config.json").read_text())
    preset = SIZES["example"]
    assert (config["model_type"], config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == \
        ("llama", preset.hidden, preset.layers, preset.vocab)
    assert (path / "model.safetensors").exists() and (path / "tokenizer.json").exists()
    assert build_sizes(tmp_path, ["example"], log=lambda _: None)["example"] == path  # cached


def test_weights_bench_smoke_writes_its_report(tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, "-m", "asyncopd.tools.cli", "bench", "--suite", "weights", "--smoke",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {"weights.md", "weights.csv", "weights-runs.csv", "weights-async.csv", "weights-memory.csv",
            "weights.png"} <= {
        p.name for p in out.iterdir()}
    rows = {(r["transport"], r["dtype"]): r for r in csv.DictReader(open(out / "weights.csv"))}
    assert set(rows) == {("filesystem", "float32"), ("filesystem", "bfloat16"), ("delta", "bfloat16"),
                         ("nccl", "bfloat16")}
    assert float(rows["delta", "bfloat16"]["vs_full_bf16"]) < float(rows["filesystem", "bfloat16"]["vs_full_bf16"])
    assert float(rows["filesystem", "float32"]["reload_hf_s"]) > 0
    assert float(rows["nccl", "bfloat16"]["reload_vllm_s"]) > 0 and not rows["nccl", "bfloat16"]["reload_hf_s"]
    assert "## Extrapolated" in (out / "weights.md").read_text()
    overlap = list(csv.DictReader(open(out / "weights-async.csv")))
    assert {r["transport"] for r in overlap} == {"filesystem", "delta"}
    assert all(float(r["step_async_publish_s"]) > 0 and float(r["step_sync_publish_s"]) > 0 for r in overlap)
    for r in overlap:  # interleaved rounds: the whole-run figure and the range of the per-round ones
        low, high = map(float, r["async_overhead_pct_rounds"].split(".."))
        assert int(r["rounds"]) >= 2 and low <= high, r
    assert float(rows["filesystem", "bfloat16"]["snapshot_s"]) > 0
    memory = {(r["side"], r["transport"]): r for r in csv.DictReader(open(out / "weights-memory.csv"))}
    assert set(memory) == {("learner (rank 0)", t) for t in ("filesystem", "delta", "nccl")} | {
        ("rollout worker", t) for t in ("filesystem", "delta")}
    assert all(float(r["served_copy_mib"]) > 0 and float(r["peak_served_copies"]) >= 0 for r in memory.values())
