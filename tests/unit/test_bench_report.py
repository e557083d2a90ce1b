"""The findings report merged from one bench invocation per run: a grid cut off part-way keeps what
finished, and the merged table is the one a single invocation over the same runs would write."""

import csv

from asyncopd.tools.bench import findings_from, report_findings


def run_row(objective, eta, seed, accuracy, kl):
    return {"max_staleness": eta, "objective": objective, "seed": seed, "state": "succeeded", "steps": 1000,
            "mean_staleness": 0.5 * eta, "final_accuracy": accuracy, "last3_accuracy": accuracy,
            "final_kl": kl, "time_to_target_s": None}


def curve(objective, eta, seed, kl):
    return [{"objective": objective, "max_staleness": eta, "seed": seed, "step": step,
             "accuracy": None if step else 0.2, "kl_to_teacher": kl * step / 1000 + 1.0} for step in (0, 1000)]


def test_findings_merged_from_separate_runs_equal_one_invocations_table(tmp_path):
    runs = [("m2po", 8, 0, 0.25, 0.9), ("m2po", 8, 1, 0.5, 0.6), ("m2po", 0, 0, 0.6, 0.3),
            ("recompute", 8, 0, 0.125, 1.4)]
    dirs = []
    for i, (objective, eta, seed, accuracy, kl) in enumerate(runs):
        dirs.append(tmp_path / f"run{i}")
        report_findings([run_row(objective, eta, seed, accuracy, kl)], curve(objective, eta, seed, kl), dirs[-1],
                        f"asyncopd bench --seeds {seed}", [])
    merged = findings_from(dirs, tmp_path / "merged", "asyncopd bench --findings-from ...")
    together = report_findings([run_row(*r) for r in runs], [c for r in runs for c in curve(r[0], r[1], r[2], r[4])],
                               tmp_path / "together", "asyncopd bench", [])
    assert merged == together
    by_key = {(a["objective"], a["max_staleness"]): a for a in merged}
    assert by_key["m2po", 8]["seeds"] == 2 and by_key["m2po", 8]["final_accuracy_mean"] == 0.375
    assert (by_key["m2po", 8]["final_kl_min"], by_key["m2po", 8]["final_kl_max"]) == (0.6, 0.9)
    assert [a["objective"] for a in merged] == ["m2po", "m2po", "recompute"]
    curves = list(csv.DictReader(open(tmp_path / "merged" / "findings-curves.csv")))
    assert len(curves) == 8 and curves[1]["accuracy"] == ""  # None survives the round trip as an empty cell
    notes = (tmp_path / "merged" / "findings.md").read_text()
    assert "- `asyncopd bench --seeds 1`" in notes
    assert (tmp_path / "merged" / "findings.png").stat().st_size > 1000
