"""Sweeps on a real Slurm (`-m slurm`; .ci/run starts the local cluster with scripts/local_slurm.sh first):
a job array whose jobs record their Slurm ids and allocation, sharing one cache; a job Slurm kills at its
time limit, and one cancelled with scancel, recorded failed with Slurm's reason by the sweep's process;
the report of all of them."""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import compose
from pipeline.checkpoints import synthetic
from tests.helpers import REPO, sweep

pytestmark = pytest.mark.slurm
_SPAWN = multiprocessing.get_context("spawn")


@pytest.fixture(scope="module", autouse=True)
def cluster() -> None:
    """A Slurm controller must answer: these tests fail, not skip, when it does not."""
    proc = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    if proc.returncode != 0 or not proc.stdout.strip():
        pytest.fail(f"no Slurm cluster answers ({proc.stderr.strip()}); start one: scripts/local_slurm.sh start")


def _checkpoint_folder(cache_dir: Path, seed: int) -> Path:
    from omegaconf import OmegaConf

    cfg = compose([f"cache_dir={cache_dir}", f"model.synthetic.seed={seed}"])
    syn = OmegaConf.to_container(OmegaConf.structured(cfg.model.synthetic), resolve=True)
    return synthetic.folder(cfg.model.name, OmegaConf.to_container(cfg.model.architecture), syn, cache_dir)


def _hold(target: Path, held: Path, release: Path) -> None:
    """Another job building `target` for as long as the test wants: jobs that need it wait."""
    from pipeline.core import cachelock

    with cachelock.exclusive(target):
        held.touch()
        while not release.exists():
            time.sleep(0.1)


class Holder:
    def __init__(self, target: Path, tmp: Path) -> None:
        self.held, self.release = tmp / f"held-{target.name}", tmp / f"release-{target.name}"
        self.proc = _SPAWN.Process(target=_hold, args=(target, self.held, self.release))

    def __enter__(self) -> Holder:
        self.proc.start()
        deadline = time.monotonic() + 60
        while not self.held.exists():
            assert time.monotonic() < deadline and self.proc.is_alive()
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.release.touch()
        self.proc.join(30)


@pytest.fixture(scope="module")
def three_jobs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("slurm3")
    t0 = time.monotonic()
    proc, records = sweep(tmp / "sweep", tmp / "cache", "hydra/launcher=slurm", "quant=nf4,fp4,int8")
    return proc, records, tmp / "sweep", time.monotonic() - t0


@pytest.fixture(scope="module")
def killed_at_time_limit(tmp_path_factory):
    """Two jobs with a 1-minute limit: job 0 needs a checkpoint another process is building and never
    finishes (a load slower than the limit), job 1 builds its own and loads."""
    tmp = tmp_path_factory.mktemp("slurm-limit")
    with Holder(_checkpoint_folder(tmp / "cache", 1), tmp):
        t0 = time.monotonic()
        proc, records = sweep(
            tmp / "sweep",
            tmp / "cache",
            "hydra/launcher=slurm",
            "hydra.launcher.timeout_min=1",
            "model.synthetic.seed=1,2",
        )
        wall = time.monotonic() - t0
    return proc, records, tmp / "sweep", wall


def test_a_slurm_sweep_runs_each_job_in_a_job_array_and_records_where(three_jobs):
    proc, records, _, wall = three_jobs
    print(f"3-job Slurm sweep: {wall:.1f} s")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(records) == [0, 1, 2]
    assert [records[i]["config"]["quant"]["name"] for i in range(3)] == ["nf4", "fp4", "int8"]
    assert all(r["status"] == "ok" for r in records.values())
    slurm = [records[i]["slurm"] for i in range(3)]
    assert len({s["array_job_id"] for s in slurm}) == 1
    assert [s["array_task_id"] for s in slurm] == ["0", "1", "2"]
    assert [s["id"] for s in slurm] == [f"{s['array_job_id']}_{i}" for i, s in enumerate(slurm)]
    assert len({s["job_id"] for s in slurm}) == 3
    for s in slurm:
        assert s["node"] == socket.gethostname().split(".")[0]
        assert s["time_limit"] == "01:00:00"  # hydra/launcher=slurm's timeout_min: 60
        assert "cpu=1" in s["tres"] and "mem=4G" in s["tres"]
        assert s["cpus_per_task"] == "1" and s["mem_per_node_mb"] == "4096"
    launchers = {r["process"]["launcher_pid"] for r in records.values()}
    assert os.getpid() not in launchers and len(launchers) == 3  # each job its own process on the node
    # one cache for all: the checkpoint was built once, by whichever job came first
    builds = [e for r in records.values() for e in r.get("cache", []) if e["built"]]
    assert len(builds) == 1
    assert len({r["checkpoint"]["fingerprint"] for r in records.values()}) == 1


def test_a_job_slurm_kills_at_its_time_limit_is_recorded_failed_with_slurms_reason(killed_at_time_limit):
    proc, records, sweep_dir, wall = killed_at_time_limit
    print(f"sweep with a job killed at its 1-minute limit: {wall:.1f} s")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "error: job 0 (" in proc.stderr and "TIMEOUT" in proc.stderr
    assert str(sweep_dir / "0" / "run.json") in proc.stderr
    killed, other = records[0], records[1]
    assert other["status"] == "ok" and other["slurm"]["time_limit"] == "00:01:00"
    assert killed["status"] == "failed" and killed["failed_stage"] == "config_merge"
    assert killed["error"].startswith(f"Slurm job {killed['slurm']['id']} killed at its time limit: TIMEOUT")
    s = killed["slurm"]
    assert s["state"] == "TIMEOUT" and s["recorded_by"] == "the sweep's process"
    assert s["reason"] in ("TimeLimit", None)  # scontrol and sacct say TimeLimit; the jobcomp log has no reason
    assert s["array_task_id"] == "0" and s["array_job_id"] == other["slurm"]["array_job_id"]
    assert 60 <= wall < 240  # killed by Slurm after its minute, not before, and the sweep did not hang
    script = next((sweep_dir / ".submitit").glob("*/*_submission.sh")).read_text()
    assert "#SBATCH --time=1" in script and "USR2" not in script  # no early signal that would end the load


def test_a_cancelled_job_is_recorded_failed_with_slurms_state(tmp_path):
    with Holder(_checkpoint_folder(tmp_path / "cache", 3), tmp_path):
        args = ["-m", f"hydra.sweep.dir={tmp_path / 'sweep'}", f"cache_dir={tmp_path / 'cache'}"]
        args += ["hydra/launcher=slurm", "model.synthetic.seed=3", "stages.stream.progress=false"]
        sweeper = subprocess.Popen(
            [sys.executable, "-m", "pipeline", *args],
            cwd=REPO,
            env=os.environ | {"HF_HUB_OFFLINE": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 120
        while not (tmp_path / "sweep" / "0" / ".hydra").exists():  # the job runs: Hydra wrote its folder
            assert time.monotonic() < deadline and sweeper.poll() is None
            time.sleep(0.2)
        (job_id,) = [p.name for p in (tmp_path / "sweep" / ".submitit").iterdir() if p.name.isdigit()]  # no array
        subprocess.run(["scancel", job_id], check=True)
        out, err = sweeper.communicate(timeout=120)
    assert sweeper.returncode == 1, out + err
    rec = json.loads((tmp_path / "sweep" / "0" / "run.json").read_text())
    assert rec["status"] == "failed" and rec["slurm"]["state"] == "CANCELLED"
    assert rec["error"].startswith(f"Slurm job {job_id} cancelled")
    assert "CANCELLED" in err


def test_the_report_shows_slurm_jobs_and_the_killed_one(three_jobs, killed_at_time_limit, tmp_path):
    from pipeline.report.table import main as report_main

    runs = [three_jobs[2], killed_at_time_limit[2]]
    assert report_main([str(p) for p in runs] + ["--out", str(tmp_path)]) == 0
    rows = {r["run"]: r for r in csv.DictReader((tmp_path / "report.csv").open())}
    assert len(rows) == 5
    by_id = {r["slurm job"]: r for r in rows.values()}
    for rec in [*three_jobs[1].values(), *killed_at_time_limit[1].values()]:
        row = by_id[rec["slurm"]["id"]]
        assert row["node"] == rec["slurm"]["node"] and row["status"] == rec["status"]
    killed = by_id[killed_at_time_limit[1][0]["slurm"]["id"]]
    assert killed["slurm state"] == "TIMEOUT" and "killed at its time limit: TIMEOUT" in killed["error"]
    assert "TIMEOUT" in (tmp_path / "report.md").read_text()


def test_starting_the_local_cluster_again_is_harmless():
    pids = {name: Path(f"/run/qload-{name}.pid").read_text() for name in ("slurmctld", "slurmd")}
    proc = subprocess.run([str(REPO / "scripts" / "local_slurm.sh"), "start"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "already running" in proc.stderr
    assert {name: Path(f"/run/qload-{name}.pid").read_text() for name in pids} == pids  # the same daemons
    assert subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True).stdout.split()[0] in (
        "idle",
        "mixed",
        "allocated",
    )


def test_a_job_over_its_memory_limit_is_recorded_failed_with_what_slurm_said(tmp_path, cache_dir):
    proc, records = sweep(
        tmp_path / "sweep",
        cache_dir,
        "hydra/launcher=slurm",
        "hydra.launcher.mem_gb=null",
        "+hydra.launcher.additional_parameters.mem=150M",  # less than a Python with torch imported (~220 MB)
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    rec = records[0]
    assert rec["status"] == "failed" and rec["slurm"]["tres"].startswith("cpu=1,mem=150M")
    # without cgroups Slurm's state is FAILED (with cgroups, OUT_OF_MEMORY); slurmstepd's log line says why
    assert rec["slurm"]["state"] in ("FAILED", "OUT_OF_MEMORY")
    assert rec["error"].startswith(f"Slurm job {rec['slurm']['id']} killed for exceeding its memory limit")
    assert any("exceeded memory limit" in line for line in rec["slurm"]["slurmstepd"])
