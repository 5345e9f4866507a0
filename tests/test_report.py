"""`python -m pipeline.report`: one row per run read off its record, what differs as columns, quality figures
when a verify stage recorded them, the CSV, the Markdown and the plots."""

from __future__ import annotations

import csv
import json

import pytest

from pipeline.report.runs import QUALITY_FACTS, find_runs, label_runs, summarize
from pipeline.report.table import main as report_main
from pipeline.runner import StageError
from tests.helpers import entry

PNG = b"\x89PNG\r\n\x1a\n"


def rows(path) -> list[dict[str, str]]:
    return list(csv.DictReader(path.open()))


def test_a_row_per_run_with_what_differs_next_to_the_runs(load, tmp_path):
    quants = ["nf4", "int8", "fp4"]
    records = [load(f"quant={q}")[1] for q in quants]
    assert report_main([str(tmp_path)]) == 0  # no --out: the files go next to the runs
    table = rows(tmp_path / "report.csv")
    assert [r["run"] for r in table] == ["run0", "run1", "run2"]
    assert [r["quant"] for r in table] == quants
    assert "model" not in table[0] and "error" not in table[0]
    for row, rec in zip(table, records, strict=True):
        assert row["status"] == "ok"
        stages = [s for s in rec["stages"] if s["stage"] != "verify"]
        assert float(row["load s"]) == pytest.approx(sum(s["metrics"]["wall_s"] for s in stages))
        assert float(row["load peak MB"]) == max(s["metrics"]["rss_peak_mb"] for s in stages)
        assert float(row["start MB"]) == rec["stages"][0]["metrics"]["rss_start_mb"]
        assert float(row["total s"]) == rec["total"]["wall_s"]
    runs = [summarize(p) for p in find_runs([tmp_path])]
    assert label_runs(runs) == ["quant"]
    assert [r.label for r in runs] == [f"quant={q}" for q in quants]
    for name in ("report_stage_times.png", "report_memory.png"):
        assert (tmp_path / name).read_bytes().startswith(PNG)
    md = (tmp_path / "report.md").read_text()
    assert "\n| run | quant | status | load s |" in md and md.count("\n| run") == 4  # the header, three runs


def test_quality_figures_of_the_verify_stage_become_columns_and_a_plot(load, tmp_path):
    records = {q: load(f"quant={q}", "stages/verify=logits")[1] for q in ("nf4", "int8")}
    out = tmp_path / "report"
    assert report_main([str(tmp_path / "run0"), str(tmp_path / "run1"), "--out", str(out)]) == 0
    table = {r["quant"]: r for r in rows(out / "report.csv")}
    shown = []
    for quant, rec in records.items():
        facts = next(s["facts"] for s in rec["stages"] if s["stage"] == "verify")
        for name in QUALITY_FACTS:
            if isinstance(facts.get(name), (int, float)):
                assert float(table[quant][name]) == pytest.approx(facts[name])
                shown.append(name)
    assert {"kl_mean", "top1_agreement"} <= set(shown)
    assert "tokens" not in table["nf4"] and "seed" not in table["nf4"]  # counts, not quality
    assert (out / "report_quality.png").read_bytes().startswith(PNG)
    assert "](report_quality.png)" in (out / "report.md").read_text()


def test_a_failed_run_shows_its_status_and_error(load, tmp_path, capsys):
    load("quant=nf4")
    with pytest.raises(StageError):
        load("model=llama2_7b")
    assert report_main([str(tmp_path)]) == 0
    failed = rows(tmp_path / "report.csv")[1]
    assert failed["model"] == "llama2_7b" and failed["status"] == "failed"
    assert failed["error"].startswith("CheckpointError: model=llama2_7b")
    assert failed["footprint MB"] == failed["held MB"] == ""
    recorded = json.loads((tmp_path / "run1" / "run.json").read_text())
    assert float(failed["config_merge s"]) == entry(recorded, "config_merge")["metrics"]["wall_s"]
    assert "failed" in capsys.readouterr().out


def test_paths_without_runs_are_named_in_the_error(tmp_path, capsys):
    assert report_main([str(tmp_path / "missing")]) == 2
    assert f"{tmp_path / 'missing'}: no such file or folder" in capsys.readouterr().err
    assert report_main([str(tmp_path)]) == 2
    assert f"no run.json under {tmp_path}" in capsys.readouterr().err
