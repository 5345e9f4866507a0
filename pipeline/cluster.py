"""Sweeps on Slurm: what a job knows of its allocation, how Slurm says a job ended, and the sweep's side of
`hydra/launcher=slurm` and `slurm_gpu` (the launcher class is `hydra_plugins.qload_slurm`, because Hydra
only instantiates launchers from the `hydra_plugins` package; its logic lives here).

The sweep submits one job array, waits until Slurm no longer lists any of its jobs, and then takes each
job's outcome as the local launchers do: a job that recorded its own failure is a failed job. A job that
Slurm ended (time limit, memory limit, `scancel`, a node failure) may have left no record, or only the
record of a load killed by a signal; the sweep's process then writes (or completes) its `run.json` with
Slurm's state and reason, read from `sacct` where accounting is on, else `scontrol show job` (jobs stay
listed `MinJobAge` seconds after they end), else the `jobcomp/filetxt` log (scripts/local_slurm.sh
configures one).
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# what a job's environment says about its allocation -> run.json's `slurm`
_ENV = {
    "job_id": "SLURM_JOB_ID",
    "array_job_id": "SLURM_ARRAY_JOB_ID",
    "array_task_id": "SLURM_ARRAY_TASK_ID",
    "node": "SLURMD_NODENAME",
    "partition": "SLURM_JOB_PARTITION",
    "cluster": "SLURM_CLUSTER_NAME",
    "cpus_on_node": "SLURM_CPUS_ON_NODE",
    "cpus_per_task": "SLURM_CPUS_PER_TASK",
    "mem_per_node_mb": "SLURM_MEM_PER_NODE",
    "mem_per_cpu_mb": "SLURM_MEM_PER_CPU",
    "gpus_on_node": "SLURM_GPUS_ON_NODE",
    "job_gpus": "SLURM_JOB_GPUS",
    "submit_host": "SLURM_SUBMIT_HOST",
}
# states of a job that has ended without finishing its work, and what each means
ENDED_BY_SLURM = {
    "TIMEOUT": "killed at its time limit",
    "OUT_OF_MEMORY": "killed for exceeding its memory limit",
    "CANCELLED": "cancelled (scancel, or an administrator)",
    "NODE_FAIL": "its node failed",
    "PREEMPTED": "preempted",
    "BOOT_FAIL": "its node failed to boot",
    "DEADLINE": "killed at its deadline",
    "FAILED": "failed (non-zero exit of the job script)",
}
_ACTIVE = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING", "STAGE_OUT"}


def _run(cmd: list[str], timeout: float = 30) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None


def _fields(line: str) -> dict[str, str]:
    """`Key=value Key=value` as scontrol and the jobcomp log print them (a value ends at a space)."""
    return dict(re.findall(r"(\w[\w/:]*)=(\S*)", line))


def show_job(job_id: str) -> list[dict[str, str]]:
    """`scontrol show job -o ID`: one dict per job (every task of an array), [] when Slurm no longer knows it."""
    proc = _run(["scontrol", "show", "job", "-o", str(job_id)])
    if proc is None or proc.returncode != 0:
        return []
    return [_fields(line) for line in proc.stdout.splitlines() if line.startswith("JobId=")]


def job_facts() -> dict[str, Any]:
    """`{"slurm": {...}}` inside a Slurm job (its ids, node and allocation), `{}` elsewhere."""
    if "SLURM_JOB_ID" not in os.environ:
        return {}
    facts: dict[str, Any] = {k: os.environ[v] for k, v in _ENV.items() if os.environ.get(v)}
    array, task = facts.get("array_job_id"), facts.get("array_task_id")
    facts["id"] = f"{array}_{task}" if array and task else facts["job_id"]
    for job in show_job(facts["job_id"])[:1]:  # what it was given, as the controller sees it
        facts["time_limit"] = job.get("TimeLimit")
        facts["tres"] = job.get("AllocTRES") or job.get("TRES")
    return {"slurm": facts}


def _key(job: dict[str, str]) -> str:
    array, task = job.get("ArrayJobId"), job.get("ArrayTaskId")
    return f"{array}_{task}" if array and task and task.isdigit() else job.get("JobId", "")


def _from_sacct(ids: list[str]) -> dict[str, dict[str, str]]:
    cmd = ["sacct", "-n", "-P", "-X", "-o", "JobID,State,Reason,ExitCode,NodeList,Timelimit,AllocTRES"]
    for i in ids:
        cmd += ["-j", i]
    proc = _run(cmd)
    if proc is None or proc.returncode != 0:
        return {}  # accounting is off here ("Slurm accounting storage is disabled")
    return parse_sacct(proc.stdout)


def parse_sacct(text: str) -> dict[str, dict[str, str]]:
    """Lines of `sacct -n -P -X -o JobID,State,Reason,ExitCode,NodeList,Timelimit,AllocTRES`."""
    out = {}
    names = ("JobId", "JobState", "Reason", "ExitCode", "NodeList", "TimeLimit", "TRES")
    for line in text.splitlines():
        parts = line.split("|")
        if len(parts) == len(names) and parts[0]:
            job = dict(zip(names, parts, strict=True))
            job["JobState"] = job["JobState"].split()[0]  # "CANCELLED by 0"
            out[job["JobId"]] = job | {"source": "sacct"}
    return out


def _jobcomp_log() -> Path | None:
    proc = _run(["scontrol", "show", "config"])
    if proc is None or proc.returncode != 0:
        return None
    conf = dict(re.findall(r"^(\w+)\s*=\s*(.*?)\s*$", proc.stdout, re.M))
    if conf.get("JobCompType") != "jobcomp/filetxt" or not conf.get("JobCompLoc"):
        return None
    path = Path(conf["JobCompLoc"])
    return path if path.is_file() else None


def final_states(ids: list[str]) -> dict[str, dict[str, str]]:
    """How each job ended ('ARRAY_TASK' or 'ID' -> JobState, Reason, ExitCode, NodeList, TimeLimit, TRES,
    source), from the first source that knows it: sacct, scontrol show job, the jobcomp/filetxt log."""
    mains = sorted({i.split("_")[0] for i in ids})
    states = _from_sacct(mains)
    for main in mains:
        for job in show_job(main):
            states.setdefault(_key(job), job | {"source": "scontrol show job"})
    if any(i not in states for i in ids) and (log := _jobcomp_log()) is not None:
        for line in log.read_text(errors="replace").splitlines():
            job = _fields(line)
            if job.get("ArrayJobId", job.get("JobId")) in mains or job.get("JobId") in mains:
                job.setdefault("TRES", job.get("Tres", ""))
                states.setdefault(_key(job), job | {"source": str(log)})
    return {i: states[i] for i in ids if i in states}


def describe(job_id: str, state: dict[str, str], stepd: list[str] = ()) -> str:
    """One line: what Slurm did to the job and why, as Slurm says it (and slurmstepd, in the job's log)."""
    name = state.get("JobState", "UNKNOWN")
    memory = [line for line in stepd if "memory limit" in line]
    what = ENDED_BY_SLURM["OUT_OF_MEMORY"] if memory else ENDED_BY_SLURM.get(name, "ended")
    labels = {"Reason": "reason", "TimeLimit": "time limit", "ExitCode": "exit code", "NodeList": "node"}
    details = [f"{label} {state[k]}" for k, label in labels.items() if state.get(k) not in (None, "", "None")]
    why = f"Slurm job {job_id} {what}: {name} ({', '.join(details)}; from {state.get('source')})"
    return f"{why}; slurmstepd: {memory[0]}" if memory else why


def stepd_errors(log: Path) -> list[str]:
    """What slurmstepd wrote into a job's log when it killed the job (without cgroups Slurm's state for a
    memory kill is only FAILED; the log says "exceeded memory limit")."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return []
    said = [line.split("error:", 1)[1].strip() for line in lines if line.startswith("slurmstepd") and "error:" in line]
    return list(dict.fromkeys(said))


def active(ids: list[str]) -> set[str] | None:
    """Which of these jobs Slurm still lists (pending, running, completing), or None if squeue fails."""
    mains = sorted({i.split("_")[0] for i in ids})
    proc = _run(["squeue", "-h", "-r", "-o", "%i|%T", "-j", ",".join(mains)])
    if proc is None:
        return None
    if proc.returncode != 0:
        return set() if "Invalid job id" in proc.stderr else None  # all ended and purged, or no controller
    listed = dict(line.split("|", 1) for line in proc.stdout.splitlines() if "|" in line)
    return {i for i in ids if listed.get(i) in _ACTIVE}


def wait(jobs: list[Any], poll_s: float = 1.0, max_poll_s: float = 10.0) -> None:
    """Until Slurm lists none of `jobs` (submitit jobs) as active; where squeue cannot say, until each has
    its result file. Ctrl-C cancels the jobs."""
    ids = [j.job_id for j in jobs]
    t0 = time.monotonic()
    try:
        while True:
            left = active(ids)
            if left is None:
                left = {j.job_id for j in jobs if not j.paths.result_pickle.exists()}
            if not left:
                return
            time.sleep(min(poll_s + (time.monotonic() - t0) / 20, max_poll_s))
    except KeyboardInterrupt:
        _run(["scancel", *sorted({i.split("_")[0] for i in ids})])
        print(f"cancelled the sweep's Slurm jobs: {' '.join(sorted(set(ids)))}", file=sys.stderr)
        raise


def record_end(
    job_dir: Path, cfg: Any, job_id: str, state: dict[str, str] | None, why: str, stepd: list[str] | None = None
) -> Path:
    """Write the run.json of a job that Slurm ended: the job's own record when it wrote one (a load killed
    by Slurm's signal), now failed and with Slurm's reason; else one made from its stages.jsonl."""
    from pipeline import isolate
    from pipeline.core import record

    path = job_dir / "run.json"
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        rec = None
    if rec is None:
        job_dir.mkdir(parents=True, exist_ok=True)
        rec = isolate._crash_record(cfg, job_dir, why)
    else:
        if rec.get("status") != "failed":
            rec["failed_stage"] = rec.get("failed_stage") or "after the load"
        own = rec.get("error")
        rec["status"] = "failed"
        rec["error"] = f"{why}; the job's own record said: {own}" if own else why
    facts = dict(rec.get("slurm") or {"id": job_id})
    if state:
        facts["state"] = state.get("JobState")
        facts["reason"] = state.get("Reason")
        facts["exit_code"] = state.get("ExitCode")
        facts.setdefault("node", state.get("NodeList"))
        facts.setdefault("time_limit", state.get("TimeLimit"))
        facts.setdefault("tres", state.get("TRES"))
        facts["state_from"] = state.get("source")
    if stepd:
        facts["slurmstepd"] = stepd
    facts["recorded_by"] = "the sweep's process"
    rec["slurm"] = facts
    record.write_json_atomic(path, rec)
    return path


def job_error(err: Exception) -> str:
    """What a job that raised outside the load said: the last line of the traceback submitit kept (the
    exception and its message), which submitit's error puts between two lines of dashes."""
    parts = str(err).split("----------------------\n")
    trace = parts[1] if len(parts) >= 3 else str(err)
    lines = [line.strip() for line in trace.splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__


def make_executor(params: dict[str, Any]) -> Any:
    """submitit's Slurm executor for the launcher's parameters, as hydra-submitit-launcher makes it, but for
    the warning signal. submitit asks Slurm for SIGUSR2 `signal_delay_s` before the time limit, so that a job
    can checkpoint and requeue. A load can do neither: submitit's handler ends the job when the signal comes
    (FAILED, not TIMEOUT), which with a limit shorter than the delay is at its start, and before the handler
    is set the signal's default action kills the job. SIGCONT takes its place (submitit always asks for a
    signal): a running process ignores it, so the job runs until Slurm's limit ends it. A `signal` in
    `additional_parameters` still wins."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf

    executor = submitit.AutoExecutor(
        cluster="slurm", folder=params.pop("submitit_folder"), slurm_max_num_timeout=params.pop("max_num_timeout")
    )
    warning = {"signal": f"CONT@{params['signal_delay_s']}"}  # hydra-submitit-launcher's default: 120
    params["additional_parameters"] = warning | dict(params.get("additional_parameters") or {})
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    return executor


def launch(launcher: Any, job_overrides: list[list[str]], initial_job_idx: int) -> list[Any]:
    """The sweep's side of the Slurm launcher: as hydra-submitit-launcher submits, then our waiting and
    outcomes (theirs waits on `sacct` alone, which many clusters and this repo's local one do not have,
    and stops at the first job that left no result)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.singleton import Singleton
    from hydra.core.utils import JobReturn, JobStatus, filter_overrides
    from omegaconf import open_dict

    from pipeline import startup
    from pipeline.cli import JobFailed

    startup.discard_early()  # the jobs load on the cluster's nodes, not in the CLI's early load process
    config = launcher.config
    executor = make_executor(dict(launcher.params))
    sweep_dir = Path(str(config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    if "mode" in config.hydra.sweep:  # as hydra-submitit-launcher does
        os.chmod(sweep_dir, mode=int(str(config.hydra.sweep.mode), 8))
    numbered = [(initial_job_idx + i, list(o)) for i, o in enumerate(job_overrides)]
    args = [(o, "hydra.sweep.dir", n, f"job_id_for_{n}", Singleton.get_state()) for n, o in numbered]
    jobs = executor.map_array(launcher, *zip(*args, strict=True))
    ids = [j.job_id for j in jobs]
    print(f"Slurm: submitted {len(jobs)} job(s) {ids[0]}..{ids[-1]}; sweep folder {sweep_dir}", file=sys.stderr)
    wait(jobs)
    states = final_states(ids)

    results = []
    for (num, overrides), job in zip(numbered, jobs, strict=True):
        ret, error = None, None
        if job.paths.result_pickle.exists():
            try:
                ret = job.results()[0]
            except Exception as err:  # the job raised outside Hydra's run_job (submitit's own failure)
                error = job_error(err)
        state = states.get(job.job_id)
        ended_by_slurm = state is not None and state.get("JobState") in ENDED_BY_SLURM
        if ret is not None and (ret.status == JobStatus.COMPLETED or not ended_by_slurm):
            results.append(ret)  # done, or failed and recorded by the job itself: as the local launchers
            continue
        cfg = launcher.hydra_context.config_loader.load_sweep_config(config, overrides)
        with open_dict(cfg.hydra.job):
            cfg.hydra.job.num = num
        HydraConfig.instance().set_config(cfg)
        job_dir = Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir)
        task_cfg = copy.deepcopy(cfg)
        with open_dict(task_cfg):
            del task_cfg["hydra"]
        stepd = stepd_errors(job.paths.stderr)
        if ended_by_slurm:
            why = describe(job.job_id, state, stepd)
            why += f"; the job said: {error}" if error else ""
        else:
            why = f"Slurm job {job.job_id} ended without a result ({error or 'no result file'}; Slurm state {state})"
        path = record_end(job_dir, task_cfg, job.job_id, state, why, stepd)
        job_name = f"job {num} ({' '.join(filter_overrides(overrides))})"
        print(f"\nerror: {job_name}: {why}\nrecord: {path}", file=sys.stderr)
        failure = JobFailed(
            f"error: {job_name}: {why}\nrecord: {path}\nevery job of the sweep: python -m pipeline.report {sweep_dir}"
        )
        results.append(
            JobReturn(
                overrides=overrides,
                cfg=task_cfg,
                hydra_cfg=cfg,
                working_dir=str(job_dir),
                task_name=str(cfg.hydra.job.name),
                status=JobStatus.FAILED,
                _return_value=failure,
            )
        )
    return results
