"""`python -m pipeline` as a user runs it: exit status, the printed table, and RSS against the kernel's."""

from __future__ import annotations

import json

from pipeline.core.schema import STAGE_KINDS
from tests.helpers import cli_with_maxrss


def test_default_run_prints_all_stages_and_matches_outside_rss(tmp_path, cache_dir):
    code, out, record, outside_mb = cli_with_maxrss(tmp_path, cache_dir)
    assert code == 0, out
    table = out[out.index("stage ") :]
    for kind in STAGE_KINDS:
        assert f"\n{kind} " in table
    assert "\ntotal " in table
    ours = max(s["metrics"]["rss_peak_mb"] for s in record["stages"])
    assert abs(ours - outside_mb) <= 0.10 * outside_mb, (ours, outside_mb)
    assert (tmp_path / "run" / ".hydra" / "config.yaml").exists()
    assert (tmp_path / "run" / ".hydra" / "overrides.yaml").exists()


def test_prompt_generates_after_loading(tmp_path, cache_dir):
    code, out, record, _ = cli_with_maxrss(tmp_path, cache_dir, "prompt=hello", "max_new_tokens=4")
    assert code == 0, out
    assert "generated ids: [" in out
    assert len(out.split("generated ids: [")[1].split("]")[0].split(",")) == 4


def test_failure_exits_non_zero_with_the_message(tmp_path, cache_dir):
    code, out, record, _ = cli_with_maxrss(tmp_path, cache_dir, "model=llama2_7b")
    assert code == 1
    assert "error: stage config_merge failed" in out and "model.source=synthetic" in out
    assert record["status"] == "failed"


def test_python_api_returns_model_and_record(tmp_path, cache_dir):
    from pipeline import load

    model, record = load([f"cache_dir={cache_dir}", "quant=fp4"], run_dir=tmp_path / "api")
    assert record["status"] == "ok" and model.is_loaded_in_4bit
    assert json.loads((tmp_path / "api" / "run.json").read_text())["status"] == "ok"


def test_python_api_default_run_dir_is_under_runs(tmp_path, cache_dir, monkeypatch):
    from pipeline import load

    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        load([f"cache_dir={cache_dir}"])
    dirs = sorted((tmp_path / "runs" / "api").glob("*/*"))
    assert len(dirs) == 2 and all((d / "run.json").exists() for d in dirs)
