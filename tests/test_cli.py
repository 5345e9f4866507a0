"""`python -m pipeline` as a user runs it: exit status, the printed table, and RSS against the kernel's."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from pipeline.core.schema import SETUP, STAGE_KINDS
from tests.conftest import REPO

# Runs the CLI and reports its max RSS as the kernel kept it. The go-between matters: a process started
# straight from pytest inherits pytest's own high-water mark across fork and exec.
MAXRSS = (
    "import os, subprocess, sys; p = subprocess.Popen(sys.argv[2:]); _, status, ru = os.wait4(p.pid, 0); "
    "open(sys.argv[1], 'w').write(str(ru.ru_maxrss)); sys.exit(os.waitstatus_to_exitcode(status))"
)


def cli(tmp_path, cache_dir, *overrides: str) -> tuple[int, str, dict, float]:
    """Run the CLI in a child process; return exit code, output, run.json and its max RSS in MB."""
    run_dir, maxrss = tmp_path / "run", tmp_path / "maxrss"
    args = [sys.executable, "-m", "pipeline", f"hydra.run.dir={run_dir}", f"cache_dir={cache_dir}", *overrides]
    env = os.environ | {"HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", MAXRSS, str(maxrss), *args], cwd=REPO, env=env, capture_output=True, text=True
    )
    record = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").exists() else {}
    return proc.returncode, proc.stdout + proc.stderr, record, int(maxrss.read_text()) / 1024


def test_default_run_prints_all_stages_and_matches_outside_rss(tmp_path, cache_dir):
    code, out, record, outside_mb = cli(tmp_path, cache_dir)
    assert code == 0, out
    table = out[out.index("stage ") :]
    for kind in (SETUP, *STAGE_KINDS):
        assert f"\n{kind} " in table
    assert "\ntotal " in table
    # every second of the recorded total is in an entry: the runner's setup, then the stages
    assert [s["stage"] for s in record["stages"]] == [SETUP, *STAGE_KINDS]
    entries_s, total_s = sum(s["metrics"]["wall_s"] for s in record["stages"]), record["total"]["wall_s"]
    assert abs(total_s - entries_s) <= 0.02 * total_s, (entries_s, total_s)
    ours = max(s["metrics"]["rss_peak_mb"] for s in record["stages"])
    assert abs(ours - outside_mb) <= 0.10 * outside_mb, (ours, outside_mb)
    assert (tmp_path / "run" / ".hydra" / "config.yaml").exists()
    assert (tmp_path / "run" / ".hydra" / "overrides.yaml").exists()


def test_prompt_generates_after_loading(tmp_path, cache_dir):
    code, out, record, _ = cli(tmp_path, cache_dir, "prompt=hello", "max_new_tokens=4")
    assert code == 0, out
    assert "generated ids: [" in out
    assert len(out.split("generated ids: [")[1].split("]")[0].split(",")) == 4


def test_failure_exits_non_zero_with_the_message(tmp_path, cache_dir):
    code, out, record, _ = cli(tmp_path, cache_dir, "model=llama2_7b")
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
