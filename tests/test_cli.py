"""`python -m pipeline` as a user runs it: exit status, the printed table, and RSS against the kernel's."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from pipeline import CONF_DIR, compose
from pipeline.core import record as records
from pipeline.core.schema import SETUP, STAGE_KINDS
from pipeline.isolate import LoadFailed
from pipeline.replay import default_out
from pipeline.runner import StageError
from pipeline.startup import DIRECT_BELOW_MB
from tests.helpers import MAXRSS, REPO, cli_env, cli_with_maxrss, pipeline_cmd

# variables that would point a run at caches a new machine does not have
CACHE_VARS = ("QLOAD_CACHE", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "HF_HOME", "XDG_CACHE_HOME")


def test_default_run_prints_all_stages_and_matches_outside_rss(tmp_path, cache_dir):
    code, out, record, outside_mb = cli_with_maxrss(tmp_path, cache_dir)
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


def test_the_default_command_runs_on_a_fresh_machine(tmp_path):
    """The first command on a new machine: `python -m pipeline`, no flags, with an empty HOME (no qload cache:
    the tiny checkpoint is built there) and an empty TMPDIR (no compile cache), no variable naming a cache."""
    home, tmp, work = (tmp_path / name for name in ("home", "tmp", "work"))
    for folder in (home, tmp, work):
        folder.mkdir()
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)  # this checkout, from work/
    env = {k: v for k, v in cli_env().items() if k not in CACHE_VARS}
    env |= {"HOME": str(home), "TMPDIR": str(tmp), "PYTHONPATH": path}
    # started from a small process, as from a shell: a child of pytest would inherit pytest's peak (see MAXRSS)
    small = [sys.executable, "-c", MAXRSS, str(tmp_path / "maxrss"), *pipeline_cmd()]
    proc = subprocess.run(small, cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [run_json] = work.glob("runs/*/*/run.json")
    record = json.loads(run_json.read_text())
    assert record["status"] == "ok" and f"record: {run_json.resolve()}" in proc.stdout
    assert Path(record["checkpoint"]["path"]).is_relative_to(home)  # built in the fresh home
    # the CLI's small process spawned the load itself, whose counter started below anything the load reaches
    assert record["process"]["start"] == "spawn" and "go_between_pid" not in record["process"]
    assert record["process"]["ru_maxrss_at_start_mb"] < DIRECT_BELOW_MB
    setup = record["stages"][0]
    assert setup["stage"] == SETUP and setup["facts"]["hidden_libraries"] == ["torchao", "hqq"]  # bnb uses neither
    assert setup["metrics"]["rss_start_mb"] < DIRECT_BELOW_MB  # torch is imported in setup, inside the total
    # the load process started before the CLI composed its config and imported torch meanwhile: in setup's time
    early = record["process"]["imported_before_config"]
    assert early["modules"] == ["torch"] and early["waited_s"] >= 0
    assert setup["metrics"]["wall_s"] > early["wall_s"] > 0 and setup["metrics"]["cpu_s"] > early["cpu_s"] > 0
    entries_s, total_s = sum(s["metrics"]["wall_s"] for s in record["stages"]), record["total"]["wall_s"]
    assert abs(total_s - entries_s) <= 0.02 * total_s, (entries_s, total_s)


def test_prompt_generates_after_loading(tmp_path, cache_dir):
    code, out, record, _ = cli_with_maxrss(tmp_path, cache_dir, "prompt=hello", "max_new_tokens=4")
    assert code == 0, out
    assert "generated ids: [" in out
    assert len(out.split("generated ids: [")[1].split("]")[0].split(",")) == 4
    assert record["generation"]["output"] in out and record["generation"]["prompt"] == "hello"


def test_failure_exits_non_zero_with_the_message(tmp_path, cache_dir):
    code, out, record, _ = cli_with_maxrss(tmp_path, cache_dir, "model=llama2_7b")
    assert code == 1
    assert "error: stage config_merge failed" in out and "model.source=synthetic" in out
    assert record["status"] == "failed"


def test_python_api_returns_model_and_record_generates_and_prints_nothing(tmp_path, cache_dir, capfd):
    from pipeline import load

    model, record = load([f"cache_dir={cache_dir}", "quant=fp4", "prompt=Hi", "max_new_tokens=3"], tmp_path / "api")
    assert record["status"] == "ok" and model.is_loaded_in_4bit
    generation = record["generation"]
    assert generation["prompt"] == "Hi" and generation["max_new_tokens"] == 3 and generation["wall_s"] > 0
    assert len(generation["output"].split("generated ids: [")[1].rstrip("]").split(",")) == 3
    assert json.loads((tmp_path / "api" / "run.json").read_text())["generation"] == generation
    out, err = capfd.readouterr()
    assert out == "" and "Streaming shards" not in err


def test_python_api_plan_returns_the_plan_and_verbose_prints_as_the_cli(tmp_path, cache_dir, capfd):
    from pipeline import load

    plan, record = load([f"cache_dir={cache_dir}", "plan=true"], tmp_path / "plan", verbose=True)
    assert record["status"] == "planned" and plan["footprint_bytes"] == record["plan"]["footprint_bytes"] > 0
    out = capfd.readouterr().out
    assert "\nsetup " in out and "\ntotal " in out and "  predicted peak" in out


def test_python_api_isolated_load_returns_the_record_of_a_fresh_process(tmp_path, cache_dir, capfd):
    from pipeline import load

    model, record = load([f"cache_dir={cache_dir}", "prompt=Hi", "max_new_tokens=2"], tmp_path / "iso", isolate=True)
    assert model is None and record["status"] == "ok"
    assert record["process"]["pid"] != os.getpid() and record["process"]["launcher_pid"] == os.getpid()
    assert "generated ids: [" in record["generation"]["output"]
    assert capfd.readouterr().out == ""
    with pytest.raises(LoadFailed, match="stage config_merge failed: CheckpointError: model=llama2_7b") as failed:
        load([f"cache_dir={cache_dir}", "model=llama2_7b"], tmp_path / "iso-failed", isolate=True)
    assert failed.value.exit_status == 1 and failed.value.record["failed_stage"] == "config_merge"


def test_python_api_failure_raises_the_stage_error(tmp_path, cache_dir):
    from pipeline import load

    with pytest.raises(StageError, match="stage config_merge failed: CheckpointError: model=llama2_7b"):
        load([f"cache_dir={cache_dir}", "model=llama2_7b"], tmp_path / "failed")
    assert json.loads((tmp_path / "failed" / "run.json").read_text())["failed_stage"] == "config_merge"


@pytest.mark.parametrize(
    ("override", "message"),
    [("max_new_tokens=0", "max_new_tokens=0: must be >= 1"), ("prompt=' '", "prompt=' ': give some text")],
)
def test_python_api_refuses_a_bad_prompt_setting_before_loading(tmp_path, cache_dir, override, message):
    from pipeline import load

    with pytest.raises(StageError, match=f"^stage setup failed: ValueError: {re.escape(message)}"):
        load([f"cache_dir={cache_dir}", "prompt=Hi", override], tmp_path / "bad")
    assert [s["stage"] for s in json.loads((tmp_path / "bad" / "run.json").read_text())["stages"]] == [SETUP]


def test_python_api_refuses_hydras_own_keys_it_would_ignore(tmp_path):
    from pipeline import load

    with pytest.raises(ValueError, match=r"^hydra.run.dir=x: Hydra's own settings .* load\(\.\.\., run_dir=\.\.\.\)"):
        load(["hydra.run.dir=x"], tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_python_api_default_run_dir_is_under_runs_stamped_as_hydra_stamps(tmp_path, cache_dir, monkeypatch):
    from pipeline import load

    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        load([f"cache_dir={cache_dir}"])
    dirs = sorted((tmp_path / "runs" / "api").glob("*/*"))
    assert len(dirs) == 2 and all((d / "run.json").exists() for d in dirs)
    assert all(re.fullmatch(r"\d{4}-\d{2}-\d{2}/\d{2}-\d{2}-\d{2}-\d{6}", f"{d.parent.name}/{d.name}") for d in dirs)


def test_one_run_folder_stamp_for_the_cli_the_api_and_replay():
    """hydra.run.dir (and the sweep dir) stamp with the formats record.run_folder uses for load() and replay."""
    hydra = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "config.yaml"), resolve=False)["hydra"]
    stamp = f"${{now:{records.DATE_FORMAT}}}/${{now:{records.TIME_FORMAT}}}"
    assert hydra["run"]["dir"] == f"runs/{stamp}_${{qload_model:${{model.path}},${{model.name}}}}_${{quant.name}}"
    assert hydra["sweep"]["dir"] == f"runs/multirun/{stamp}"
    replayed = default_out(compose(["quant=fp4"]))
    assert re.fullmatch(r"runs/replay/\d{4}-\d{2}-\d{2}/\d{2}-\d{2}-\d{2}-\d{6}_tiny_llama_fp4", str(replayed))
