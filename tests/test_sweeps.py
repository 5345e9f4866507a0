"""Sweeps as a user runs them: each load in a fresh process with a peak of its own, failures recorded while
the other jobs run, submitit's local launcher, the report of a sweep, replay, and the experiment files."""

from __future__ import annotations

import csv
import itertools
import json
import multiprocessing
import os
import resource
import subprocess
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from pipeline import CONF_DIR, guard
from pipeline import compose as compose_run
from pipeline.core import schema
from pipeline.replay import main as replay_main
from pipeline.replay import replay
from pipeline.report.runs import find_runs, label_runs, summarize
from pipeline.report.table import main as report_main
from pipeline.search.settings import SWEEPER_TARGET
from tests.helpers import entry, sweep

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
LAUNCHERS = sorted(p.stem for p in (CONF_DIR / "hydra" / "launcher").glob("*.yaml"))


def load_peak(record: dict) -> float:
    return max(s["metrics"]["rss_peak_mb"] for s in record["stages"])


@pytest.fixture(scope="module")
def sizes_sweep(tmp_path_factory, cache_dir) -> tuple[subprocess.CompletedProcess, dict[int, dict], Path]:
    """Small, big (a ~400 MB fp16 checkpoint, ~800 MB loaded), small again: three jobs in one Hydra process.
    fp32, so that every weight is converted into memory of the load's own: an fp16 load keeps its weights as
    views of the mapped shards, which no page of the process holds until they are used."""
    sweep_dir = tmp_path_factory.mktemp("sizes") / "sweep"
    proc, records = sweep(
        sweep_dir,
        cache_dir,
        "quant=none",
        "dtype=fp32",
        "model.architecture.intermediate_size=5632",
        "model.architecture.hidden_size=256,2048,256",
    )
    return proc, records, sweep_dir


def test_each_job_loads_in_a_fresh_process_with_a_peak_of_its_own(sizes_sweep):
    proc, records, _ = sizes_sweep
    assert proc.returncode == 0, proc.stdout + proc.stderr
    small, big, small_again = (records[i] for i in range(3))
    assert [r["config"]["model"]["architecture"]["hidden_size"] for r in (small, big, small_again)] == [256, 2048, 256]
    big_weights_mb = (big["footprint_bytes"] - small["footprint_bytes"]) / 2**20
    assert big_weights_mb > 300
    # the big job really was bigger, by about its weights ...
    assert big["total"]["ru_maxrss_mb"] - small["total"]["ru_maxrss_mb"] > 0.8 * big_weights_mb
    # ... and the small job after it measured its own peak, by the kernel's count and by the sampler's
    assert abs(small_again["total"]["ru_maxrss_mb"] - small["total"]["ru_maxrss_mb"]) < 0.1 * big_weights_mb
    assert abs(load_peak(small_again) - load_peak(small)) < 0.1 * big_weights_mb
    processes = [r["process"] for r in (small, big, small_again)]
    assert len({p["pid"] for p in processes}) == 3
    assert len({p["launcher_pid"] for p in processes}) == 1  # one Hydra process, a fresh load per job
    assert all(p["ru_maxrss_at_start_mb"] < 0.5 * small["total"]["ru_maxrss_mb"] for p in processes)


def test_report_of_a_sweep_writes_a_row_per_job_markdown_and_plots(sizes_sweep, tmp_path):
    _, records, sweep_dir = sizes_sweep
    assert report_main([str(sweep_dir), "--out", str(tmp_path)]) == 0
    rows = list(csv.DictReader((tmp_path / "report.csv").open()))
    assert [r["run"] for r in rows] == ["0", "1", "2"]
    assert [r["model.architecture.hidden_size"] for r in rows] == ["256", "2048", "256"]
    assert "quant" not in rows[0]  # the same in every job: not a column
    for row, i in zip(rows, range(3), strict=True):
        rec = records[i]
        assert row["status"] == rec["status"] == "ok"
        for stage in rec["stages"]:
            assert float(row[f"{stage['stage']} s"]) == stage["metrics"]["wall_s"]
            assert float(row[f"{stage['stage']} MB"]) == stage["metrics"]["rss_peak_mb"]
        assert float(row["process peak MB"]) == rec["total"]["ru_maxrss_mb"]
        assert float(row["footprint MB"]) == round(rec["footprint_bytes"] / 2**20, 1)
        assert float(row["held MB"]) == round(entry(rec, "postprocess")["facts"]["held_bytes"] / 2**20, 1)
    md = (tmp_path / "report.md").read_text()
    assert md.count("\n| ") == 4  # the header and three runs
    for png in ("report_stage_times.png", "report_memory.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({png})" in md
    assert not (tmp_path / "report_quality.png").exists()  # no verify stage figures in these runs
    runs = [summarize(p) for p in find_runs([sweep_dir])]
    label_runs(runs)
    assert len({r.label for r in runs}) == 3  # the plots tell the two small jobs apart


def test_a_failing_job_is_recorded_and_the_next_one_still_runs(tmp_path, cache_dir):
    proc, records = sweep(tmp_path / "sweep", cache_dir, "model.synthetic.shard_size=lots,2MB")
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert [records[i]["status"] for i in (0, 1)] == ["failed", "ok"]
    assert records[0]["failed_stage"] == "config_merge"
    assert "model.synthetic.shard_size='lots'" in records[0]["error"]
    assert "error: job 0 (" in proc.stderr and "shard_size=lots" in proc.stderr
    assert str(tmp_path / "sweep" / "0" / "run.json") in proc.stderr
    assert records[1]["footprint_bytes"] > 0


def _child_maxrss_mb(queue) -> None:
    queue.put(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def test_a_spawned_child_starts_at_its_parents_peak():
    """Why the load goes through a go-between: a plain spawn child could not measure a smaller peak."""
    ballast = bytearray(1024 * 2**20)  # this process's peak is now at least 1 GiB
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_maxrss_mb, args=(queue,))
    child.start()
    spawned_start_mb = queue.get(timeout=60)
    child.join()
    del ballast
    assert spawned_start_mb >= 1024


def test_replay_runs_the_recorded_config_again_with_a_fresh_peak(sizes_sweep, tmp_path):
    _, records, sweep_dir = sizes_sweep
    ballast = bytearray(1024 * 2**20)  # the caller's peak must not become the replay's
    status, out_dir = replay(sweep_dir / "2", out=tmp_path / "replayed")
    del ballast
    assert status == 0
    again = json.loads((out_dir / "run.json").read_text())
    assert again["status"] == "ok"
    assert again["config"] == records[2]["config"]
    assert again["replay_of"]["run_dir"] == str((sweep_dir / "2").resolve())
    assert again["replay_of"]["git"] == records[2]["git"]
    assert again["checkpoint"]["fingerprint"] == records[2]["checkpoint"]["fingerprint"]
    assert again["process"]["ru_maxrss_at_start_mb"] < 200
    assert again["total"]["ru_maxrss_mb"] < 1024


def test_replay_refuses_a_folder_without_a_record(tmp_path, capsys):
    assert replay_main([str(tmp_path)]) == 2
    assert "neither run.json" in capsys.readouterr().err


def test_submitit_local_launcher_runs_each_job_in_its_own_process(tmp_path, cache_dir):
    proc, records = sweep(tmp_path / "sweep", cache_dir, "hydra/launcher=local", "quant=nf4,fp4")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(records) == [0, 1]
    assert [records[i]["config"]["quant"]["name"] for i in (0, 1)] == ["nf4", "fp4"]
    assert all(r["status"] == "ok" for r in records.values())
    launchers = {r["process"]["launcher_pid"] for r in records.values()}
    assert len(launchers) == 2 and os.getpid() not in launchers
    for i in (0, 1):
        overrides = OmegaConf.load(tmp_path / "sweep" / str(i) / ".hydra" / "overrides.yaml")
        assert f"quant={['nf4', 'fp4'][i]}" in overrides
        lines = (tmp_path / "sweep" / str(i) / "stages.jsonl").read_text().splitlines()
        assert [json.loads(line)["stage"] for line in lines] == [s["stage"] for s in records[i]["stages"]]
    assert list((tmp_path / "sweep" / ".submitit").glob("*/*_log.out"))


def _sweep_config(overrides: list[str]):
    schema.register()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_is_headed_by_its_command_and_every_job_composes(name):
    lines = (CONF_DIR / "experiment" / f"{name}.yaml").read_text().splitlines()
    assert lines[0] == "# @package _global_"
    assert lines[1] == f"# python -m pipeline -m experiment={name}"
    cfg = _sweep_config([f"experiment={name}"])
    if cfg.hydra.sweeper._target_ == SWEEPER_TARGET:  # a budget search: its jobs are the settings of its space
        assert f"/{name}/" in cfg.hydra.sweep.dir
        guard.check_argv(["-m", f"experiment={name}"])  # every option composed, the space checked (test_search.py)
        return
    params = cfg.hydra.sweeper.params
    assert params, f"experiment {name} sweeps nothing"
    assert f"/{name}/" in cfg.hydra.sweep.dir
    keys = list(params)
    for values in itertools.product(*(str(params[k]).split(",") for k in keys)):
        typed = OmegaConf.to_object(  # the schemas' checks, as each job of the sweep will run them
            compose_run([f"experiment={name}", *(f"{k}={v}" for k, v in zip(keys, values, strict=True))])
        )
        for k, v in zip(keys, values, strict=True):
            # a backend's option is <backend>/<scheme>; its name <backend>-<scheme> (a path-safe run folder),
            # bitsandbytes' the short name it had before the backends (records stay comparable)
            assert getattr(typed, k).name in {v, v.replace("/", "-"), v.removeprefix("bnb/")}


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_config_composes_on_submitit(name):
    from hydra.utils import get_class

    launcher = _sweep_config([f"hydra/launcher={name}"]).hydra.launcher
    bases = {c.__name__ for c in get_class(launcher._target_).__mro__}  # by name: Hydra imports plugins twice
    assert "BaseSubmititLauncher" in bases
    assert launcher.timeout_min > 0
    if "SlurmLauncher" in bases:
        assert launcher._target_ == "hydra_plugins.qload_slurm.QloadSlurmLauncher"  # waits, records Slurm's kills
        if name == "slurm_gpu":
            assert launcher.partition and launcher.gres == "gpu:1"
        else:
            assert not launcher.gres and not launcher.gpus_per_node and launcher.mem_gb
