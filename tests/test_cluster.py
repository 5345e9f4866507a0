"""How the sweep reads Slurm's word on a job (pipeline/cluster.py), without a cluster: sacct's lines where
accounting is on, the jobcomp log where neither sacct nor scontrol knows the job any more, slurmstepd's lines,
and what a job records of its allocation. tests/test_slurm.py does the same against a running Slurm."""

from __future__ import annotations

import subprocess

from pipeline import cluster

JOBCOMP = (
    "JobId=23 UserId=root(0) GroupId=root(0) Name=__main__ JobState=TIMEOUT Partition=debug TimeLimit=1 "
    "StartTime=2026-11-30T05:10:40 EndTime=2026-11-30T05:12:02 NodeList=vm NodeCnt=1 ProcCnt=1 WorkDir=/w "
    "ReservationName= Tres=cpu=1,mem=4G,node=1,billing=1 Account= QOS= WcKey=submitit Cluster=unknown "
    "SubmitTime=2026-11-30T05:10:40 EligibleTime=2026-11-30T05:10:40 ArrayJobId=22 ArrayTaskId=0 "
    "DerivedExitCode=0:0 ExitCode=0:0\n"
    "JobId=22 UserId=root(0) GroupId=root(0) Name=__main__ JobState=COMPLETED Partition=debug TimeLimit=1 "
    "NodeList=vm Tres=cpu=1,mem=4G,node=1,billing=1 ArrayJobId=22 ArrayTaskId=1 ExitCode=0:0\n"
    "JobId=7 UserId=root(0) Name=other JobState=CANCELLED Partition=debug TimeLimit=5 NodeList=vm ExitCode=0:0\n"
)


def test_sacct_lines_give_state_and_reason():
    text = "41_0|TIMEOUT|TimeLimit|0:15|node3|00:01:00|cpu=1,mem=4G\n41_1|CANCELLED by 0|None|0:0|node4|00:01:00|\n"
    states = cluster.parse_sacct(text)
    assert states["41_0"]["JobState"] == "TIMEOUT" and states["41_0"]["Reason"] == "TimeLimit"
    assert states["41_1"]["JobState"] == "CANCELLED"  # "by 0" is who, not the state
    why = cluster.describe("41_0", states["41_0"])
    assert why == (
        "Slurm job 41_0 killed at its time limit: TIMEOUT (reason TimeLimit, time limit 00:01:00, "
        "exit code 0:15, node node3; from sacct)"
    )


def test_without_sacct_or_scontrol_the_jobcomp_log_tells(monkeypatch, tmp_path):
    log = tmp_path / "jobcomp.log"
    log.write_text(JOBCOMP)

    def fake_run(cmd, timeout=30):
        if cmd[0] == "sacct":
            return subprocess.CompletedProcess(cmd, 1, "", "Slurm accounting storage is disabled\n")
        if cmd[:3] == ["scontrol", "show", "job"]:  # purged after MinJobAge
            return subprocess.CompletedProcess(cmd, 1, "", "slurm_load_jobs error: Invalid job id specified\n")
        if cmd[:3] == ["scontrol", "show", "config"]:
            return subprocess.CompletedProcess(
                cmd, 0, f"JobCompLoc              = {log}\nJobCompType = jobcomp/filetxt\n", ""
            )
        raise AssertionError(cmd)

    monkeypatch.setattr(cluster, "_run", fake_run)
    states = cluster.final_states(["22_0", "22_1", "22_2"])
    assert sorted(states) == ["22_0", "22_1"]  # 22_2 is in no source: the sweep says so, not a guess
    assert states["22_0"]["JobState"] == "TIMEOUT" and states["22_0"]["source"] == str(log)
    assert states["22_0"]["TRES"] == "cpu=1,mem=4G,node=1,billing=1"
    assert states["22_1"]["JobState"] == "COMPLETED"
    assert cluster.describe("22_0", states["22_0"]).startswith("Slurm job 22_0 killed at its time limit: TIMEOUT")


def test_slurmstepd_lines_name_a_memory_kill(tmp_path):
    log = tmp_path / "job.err"
    log.write_text(
        "some output\n"
        "slurmstepd-vm: error: StepId=17.0 exceeded memory limit (352948224 > 314572800), being killed\n"
        "slurmstepd-vm: error: Exceeded job memory limit\n"
        "slurmstepd-vm: error: Exceeded job memory limit\n"
    )
    stepd = cluster.stepd_errors(log)
    assert stepd == [
        "StepId=17.0 exceeded memory limit (352948224 > 314572800), being killed",
        "Exceeded job memory limit",
    ]
    why = cluster.describe("17", {"JobState": "FAILED", "Reason": "NonZeroExitCode", "source": "scontrol"}, stepd)
    assert why.startswith("Slurm job 17 killed for exceeding its memory limit: FAILED (reason NonZeroExitCode")
    assert why.endswith("slurmstepd: StepId=17.0 exceeded memory limit (352948224 > 314572800), being killed")
    assert cluster.stepd_errors(tmp_path / "missing") == []


def test_a_job_records_its_allocation(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert cluster.job_facts() == {}  # outside Slurm: nothing
    env = {"SLURM_JOB_ID": "23", "SLURM_ARRAY_JOB_ID": "22", "SLURM_ARRAY_TASK_ID": "0", "SLURMD_NODENAME": "n1"}
    env |= {"SLURM_CPUS_PER_TASK": "4", "SLURM_MEM_PER_NODE": "8192", "SLURM_JOB_GPUS": "1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(cluster, "show_job", lambda i: [{"TimeLimit": "02:00:00", "TRES": "cpu=4,mem=8G,gres/gpu=1"}])
    facts = cluster.job_facts()["slurm"]
    assert facts["id"] == "22_0" and facts["job_id"] == "23" and facts["node"] == "n1"
    assert facts["cpus_per_task"] == "4" and facts["mem_per_node_mb"] == "8192" and facts["job_gpus"] == "1"
    assert facts["time_limit"] == "02:00:00" and facts["tres"] == "cpu=4,mem=8G,gres/gpu=1"


def test_the_job_script_asks_slurm_for_no_signal_that_ends_a_load(tmp_path):
    params = {"submitit_folder": str(tmp_path), "max_num_timeout": 0, "timeout_min": 1, "mem_gb": 4}
    params["signal_delay_s"] = 120  # hydra-submitit-launcher's default
    text = cluster.make_executor(dict(params))._executor._make_submission_file_text("job", "u")
    assert "#SBATCH --signal=CONT@120" in text and "USR2" not in text  # submitit's default is USR2@120
    assert "#SBATCH --time=1" in text and "#SBATCH --mem=4GB" in text and text.rstrip().endswith("job")
    mine = params | {"additional_parameters": {"signal": "USR1@300", "mem": "300M"}}  # the user's own wins
    text = cluster.make_executor(mine)._executor._make_submission_file_text("job", "u")
    assert "#SBATCH --signal=USR1@300" in text and "CONT" not in text and "#SBATCH --mem=300M" in text


def test_a_job_that_raised_is_named_by_the_last_line_of_its_trace():
    trace = 'Traceback (most recent call last):\n  File "x.py", line 1\nValueError: bad shard\n'
    err = RuntimeError(
        "Job (task=0) failed during processing with trace:\n"
        f"----------------------\n{trace}\n----------------------\n"
        "You can check full logs with 'job.stderr(0)' and 'job.stdout(0)'or at paths:\n  - a.err\n  - a.out"
    )
    assert cluster.job_error(err) == "ValueError: bad shard"
    assert cluster.job_error(RuntimeError("no result file\n")) == "no result file"
    assert cluster.job_error(RuntimeError("")) == "RuntimeError"
