"""The budget search (experiment=fit_budget, pipeline/search/): the space checked before anything runs, the
study's storage and resume, the answer read off the records, the report, and real studies.

Fast by default: the checks of the space and the guard, the study's bookkeeping on an in-process Optuna
study, the answer and the report on records made here, and a study whose budget nothing fits (two plans, no
load). Slow: a study on tiny_llama interrupted in a load and resumed, then checked against its records (its
answer, its command loaded), and the acceptance study on SmolLM2 (12 trials, minutes).
"""

from __future__ import annotations

import itertools
import json
import os
import random
import re
import signal
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from pipeline import CONF_DIR, compose, guard, load
from pipeline.checkpoints import checkpoint
from pipeline.core.sizes import gib, parse_size
from pipeline.report import study as study_report
from pipeline.search import answer, space, study
from pipeline.search.command import arguments_of, command, load_arguments
from pipeline.search.settings import SearchSettings
from tests.helpers import run_cli, start_cli

TINY_STUDY = ("hydra/sweeper=qload_optuna", "stages/verify=logits", "stages.verify.max_new_tokens=0")


def _quant_of(option: str):
    return compose([f"quant={option}"]).quant


# ---- the space: checked against the backends' schemas before anything runs ----


def test_an_unknown_hyperparameter_is_refused_before_anything_runs(tmp_path):
    sweep_dir = tmp_path / "study"
    proc = run_cli(
        "-m",
        "experiment=fit_budget",
        "++hydra.sweeper.space={bnb/nf4: {bnb_4bit_quant_typo: [nf4]}}",
        f"hydra.sweep.dir={sweep_dir}",
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    assert "hydra.sweeper.space (conf/experiment/fit_budget.yaml or an override).bnb/nf4.bnb_4bit_quant_typo" in (
        proc.stderr
    )
    assert "not a hyperparameter of quant=bnb/nf4 (backend bnb, BnbQuantConfig)" in proc.stderr
    assert "valid: method, bnb_4bit_quant_type, bnb_4bit_use_double_quant" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not sweep_dir.exists()  # no study, no trial, no plan


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("++hydra.sweeper.space={bnb/nf5: {}}", "hydra.sweeper.space.bnb/nf5: not a quant option; valid: bnb/fp4,"),
        ("++hydra.sweeper.space={hqq/b4_g64: {nbits: [4, 5]}}", "quant.nbits=5: HQQ takes one of 1, 2, 3, 4, 8"),
        ("++hydra.sweeper.space={hqq/b4_g64: {group_size: [big]}}", "group_size: choice 'big': Value 'big'"),
        (
            "++hydra.sweeper.space={bnb/int8: {bnb_4bit_use_double_quant: [false, true]}}",
            "is not a valid setting: quant.bnb_4bit_use_double_quant=true contradicts quant.method=bnb_8bit",
        ),
        ("++hydra.sweeper.space={none: {nbits: [4]}}", "none (this option has no hyperparameters)"),
        ("++hydra.sweeper.space={bnb/nf4: {_target_: [os.system]}}", "a config may not ask for objects to be built"),
        ("++hydra.sweeper.space={bnb/nf4: {method: [[1]]}}", "is not a string, number or boolean"),
        ("hydra.sweeper.storage=evil+x://host/db", "hydra.sweeper.storage='evil+x://host/db': expected an SQLAlchemy"),
    ],
)
def test_a_bad_space_or_storage_is_refused_by_the_guard(override, message):
    with pytest.raises(guard.UntrustedConfig) as err:
        guard.check_argv(["-m", "experiment=fit_budget", override])
    assert message in str(err.value)


def test_the_checked_in_study_passes_the_guard_and_its_space_holds_every_setting_once():
    guard.check_argv(["-m", "experiment=fit_budget", "model=smollm2_135m", "budget=200MB"])
    cfg = compose(["experiment=fit_budget"], hydra_config=True)
    parsed = space.parse(cfg.hydra.sweeper.space, _quant_of, CONF_DIR, "hydra.sweeper.space")
    settings = {
        tuple(parsed.overrides(p))
        for p in (
            {"quant": option, **{f"{option}.{k}": v for k, v in zip(params, combo, strict=True)}}
            for option, params in parsed.options.items()
            for combo in itertools.product(*params.values())
        )
    }
    assert len(settings) == parsed.size() > 12  # more settings than trials: a search, not every setting


def test_a_trial_s_overrides_compose_to_its_setting():
    """What Optuna suggests becomes overrides that Hydra reads back as the same values."""
    parsed = space.parse(
        {"bnb/nf4": {"bnb_4bit_use_double_quant": [False, True], "llm_int8_threshold": [0.0, 6.5]},
         "hqq/b4_g64": {"nbits": [3, 8], "group_size": [32]}},
        _quant_of, CONF_DIR, "hydra.sweeper.space",
    )  # fmt: skip
    for params in (
        {"quant": "bnb/nf4", "bnb/nf4.bnb_4bit_use_double_quant": True, "bnb/nf4.llm_int8_threshold": 0.0},
        {"quant": "hqq/b4_g64", "hqq/b4_g64.nbits": 3, "hqq/b4_g64.group_size": 32},
    ):
        assert parsed.suggest(optuna.trial.FixedTrial(params)) == params
        quant = compose(parsed.overrides(params)).quant
        option, values = parsed.setting(params)
        for key, value in values.items():
            assert quant[key] == value and type(quant[key]) is type(value), key


# ---- the study: storage, definition, resume ----


def _settings(**kw) -> SearchSettings:
    """As the sweeper gets them: through the schema (enums, checks)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(SearchSettings), kw))


def test_a_study_run_again_with_another_question_is_refused(tmp_path):
    settings = _settings()
    study.open_study(settings, tmp_path, {"space": {"none": {}}, "budget_bytes": 100})
    assert (tmp_path / study.DB_NAME).is_file()
    again = study.open_study(settings, tmp_path, {"space": {"none": {}}, "budget_bytes": 100})  # same: resumes
    assert again.user_attrs["definition"]["budget_bytes"] == 100
    with pytest.raises(study.StudyMismatch, match=r"budget_bytes: was 100, now 200"):
        study.open_study(settings, tmp_path, {"space": {"none": {}}, "budget_bytes": 200})
    with pytest.raises(study.StudyMismatch, match="optimizes 1 objective"):
        study.open_study(_settings(objectives=["kl_mean", "memory"]), tmp_path, {"space": {"none": {}}})


def test_a_trial_left_running_by_a_dead_process_is_settled_and_its_setting_queued_again(tmp_path):
    s = study.open_study(_settings(), tmp_path, {})
    done = s.ask()
    done.suggest_categorical("quant", ["none", "bnb/nf4"])
    s.tell(done, 0.5)
    dead = s.ask()
    dead.suggest_categorical("quant", ["none", "bnb/nf4"])
    gone = study.owner() | {"pid": 2**22 + 1}  # above Linux's pid_max: no such process
    dead.set_user_attr(study.OWNER, gone)
    alive = s.ask()
    alive.set_user_attr(study.OWNER, study.owner())  # this process: still running, left alone

    settled = study.settle_abandoned(s)
    assert [t.number for t in settled] == [dead.number]
    trials = s.get_trials(deepcopy=False)
    assert trials[dead.number].state == TrialState.FAIL and trials[dead.number].user_attrs[study.INTERRUPTED]
    assert trials[alive.number].state == TrialState.RUNNING
    assert trials[done.number].state == TrialState.COMPLETE
    queued = [t for t in trials if t.state == TrialState.WAITING]
    assert len(queued) == 1 and queued[0].user_attrs[study.RERUN_OF] == dead.number
    assert queued[0].number > alive.number  # numbers only grow
    assert study.counted(s) == 3  # done, alive and the queued rerun; not the interrupted one
    rerun = s.ask()  # the queued setting comes first
    assert rerun.number == queued[0].number
    assert rerun.suggest_categorical("quant", ["none", "bnb/nf4"]) == trials[dead.number].params["quant"]


def test_a_repeated_setting_is_answered_by_the_first_trial_that_had_it(tmp_path):
    s = study.open_study(_settings(), tmp_path, {})
    options = ["none", "bnb/nf4", "hqq/b4_g64"]

    def trial(option: str):
        s.enqueue_trial({"quant": option})
        t = s.ask()
        t.suggest_categorical("quant", options)
        return t

    first = trial("none")
    s.tell(first, state=TrialState.PRUNED)
    assert study.settled_like(s, first.params).number == first.number
    assert study.settled_like(s, {"quant": "bnb/nf4"}) is None
    failed = trial("bnb/nf4")
    s.tell(failed, state=TrialState.FAIL)  # a setting that failed is not tried again either
    assert study.settled_like(s, failed.params).number == failed.number
    cut = trial("hqq/b4_g64")
    cut.set_user_attr(study.INTERRUPTED, True)
    s.tell(cut, state=TrialState.FAIL)  # an interrupted one is: it never answered
    assert study.settled_like(s, cut.params) is None
    assert study.tried_settings(s) == 2


# ---- the answer and the report, on records made here ----


def _trials(seed: int, n: int = 30) -> list[dict]:
    rng = random.Random(seed)
    trials = []
    for i in range(n):
        state = rng.choice(["complete", "complete", "pruned", "failed"])
        trials.append(
            {
                "number": i,
                "state": state,
                "memory_bytes": rng.randrange(50, 300) * 2**20,
                "values": {"kl_mean": rng.random()} if state == "complete" else {},
                "same_as": None,
            }
        )
    return trials


@pytest.mark.parametrize("seed", range(5))
def test_the_best_and_the_pareto_front_follow_from_the_loaded_trials(seed):
    trials = _trials(seed)
    loaded = [t for t in trials if t["state"] == "complete"]
    chosen = answer.best(trials, "kl_mean")
    assert chosen["values"]["kl_mean"] == min(t["values"]["kl_mean"] for t in loaded)
    front = answer.pareto(trials, "kl_mean")

    def dominates(a, b):
        better = a["memory_bytes"] <= b["memory_bytes"] and a["values"]["kl_mean"] <= b["values"]["kl_mean"]
        return better and (a["memory_bytes"], a["values"]["kl_mean"]) != (b["memory_bytes"], b["values"]["kl_mean"])

    for t in loaded:
        on_front = any(t is f for f in front)
        assert on_front == (not any(dominates(o, t) for o in loaded)), t
    assert chosen in front
    pruned = [t for t in trials if t["state"] == "pruned"]
    assert answer.smallest_pruned(trials)["memory_bytes"] == min(t["memory_bytes"] for t in pruned)


def _write_trial(sweep_dir: Path, number: int, state: str, setting: list[str], memory: int, kl: float | None):
    folder = sweep_dir / str(number)
    folder.mkdir(parents=True)
    cmd = command(["model=tiny_llama"], setting)
    trial = {
        "number": number, "study": "made-here", "state": state, "setting": setting, "params": {}, "command": cmd,
        "budget": {"bytes": 6 * 10**6, "text": "6MB", "on": "footprint"}, "memory_bytes": memory,
        "values": {} if kl is None else {"kl_mean": kl}, "reason": None, "same_as": None,
    }  # fmt: skip
    (folder / "trial.json").write_text(json.dumps(trial))
    return folder


def test_the_report_draws_the_study_and_checks_the_command_it_prints(tmp_path, capsys):
    from omegaconf import OmegaConf

    sweep_dir = tmp_path / "study"
    _write_trial(sweep_dir, 0, "pruned", ["quant=none"], 8 * 2**20, None)
    _write_trial(sweep_dir, 1, "complete", ["quant=bnb/int8"], 4 * 2**20, 0.02)
    best = _write_trial(sweep_dir, 2, "complete", ["quant=bnb/nf4", "quant.bnb_4bit_use_double_quant=true"],
                        3 * 2**20, 0.01)  # fmt: skip
    loaded_config = OmegaConf.to_container(compose(["model=tiny_llama", "quant=bnb/nf4",
                                                    "quant.bnb_4bit_use_double_quant=true"]), resolve=True)  # fmt: skip
    (best / "run.json").write_text(json.dumps({"config": loaded_config}))

    written = study_report.report(sweep_dir)
    out = capsys.readouterr().out
    assert written["study_plot"].stat().st_size > 10_000  # a PNG with something drawn
    assert "best that fits: trial 2, quant=bnb/nf4 quant.bnb_4bit_use_double_quant=true: kl_mean 0.01" in out
    assert "load it: python -m pipeline model=tiny_llama quant=bnb/nf4 quant.bnb_4bit_use_double_quant=true" in out
    assert "warning" not in out
    rows = (sweep_dir / "study.csv").read_text().splitlines()
    assert len(rows) == 4 and rows[1].startswith("0,pruned,quant=none")

    loaded_config["quant"]["bnb_4bit_use_double_quant"] = False  # a command that would load something else
    (best / "run.json").write_text(json.dumps({"config": loaded_config}))
    study_report.report(sweep_dir)
    assert "differs from trial 2's in ['quant.bnb_4bit_use_double_quant']" in capsys.readouterr().out


def test_the_command_loads_what_the_trial_loaded():
    """The study's group choices and plain keys go into the command; its own keys (experiment, budget,
    verify, hydra) do not; the command composes to the trial job's quant, model, dtype and device map."""
    study_args = ["experiment=fit_budget", "model=tiny_llama", "budget=6MB", "dtype=fp32", "device_map.policy=cpu",
                  "stages.verify.max_tokens=64"]  # fmt: skip
    setting = ["quant=bnb/fp4", "quant.bnb_4bit_use_double_quant=true"]
    primary = compose(study_args, hydra_config=True)
    defaults = compose([], hydra_config=True)
    args = load_arguments(dict(primary.hydra.runtime.choices), dict(defaults.hydra.runtime.choices), study_args)
    assert args == ["model=tiny_llama", "dtype=fp32", "device_map.policy=cpu"]
    text = command(args, setting)
    job, alone = compose([*study_args, *setting]), compose(arguments_of(text))
    for section in ("quant", "model", "dtype", "device_map"):
        assert alone[section] == job[section], section
    assert alone.stages.verify._target_ != job.stages.verify._target_  # the load alone, no verify stage


# ---- real studies ----


def _study_args(sweep_dir: Path, cache_dir: Path, *more: str) -> list[str]:
    return ["-m", *TINY_STUDY, f"hydra.sweep.dir={sweep_dir}", f"cache_dir={cache_dir}",
            "stages.stream.progress=false", *more]  # fmt: skip


def _record(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def test_a_budget_nothing_fits_ends_naming_the_smallest_planned_held_memory(tmp_path, cache_dir):
    sweep_dir = tmp_path / "study"
    space_arg = "++hydra.sweeper.space={none: {}, bnb/nf4: {}, torchao/int4_weight_only: {}}"  # int4: CUDA only
    proc = run_cli(*_study_args(sweep_dir, cache_dir, space_arg, "budget=1MB", "hydra.sweeper.n_trials=20"))
    assert proc.returncode == 1, proc.stderr
    plans = {int(p.parent.parent.name): _record(p) for p in sweep_dir.glob("*/plan/run.json")}
    assert len(plans) == 3  # each setting planned once; repeats answered without running anything
    assert not list(sweep_dir.glob("*/run.json"))  # nothing loaded
    refused = [n for n, rec in plans.items() if rec["status"] == "failed"]
    assert len(refused) == 1 and plans[refused[0]]["failed_stage"] == "env_check"  # torchao int4 on a CPU
    assert f"also: 1 trial(s) failed ({refused[0]}); trial {refused[0]} (quant=torchao/int4_weight_only)" in (
        proc.stderr
    )
    plans = {n: rec for n, rec in plans.items() if n not in refused}
    for rec in plans.values():
        assert rec["status"] == "planned" and "stream" not in [s["stage"] for s in rec["stages"]]
    smallest = min(plans.items(), key=lambda kv: kv[1]["plan"]["held_bytes"])
    assert f"nothing fits budget=1MB ({parse_size('1MB', 'budget')} bytes) on the planned held memory" in proc.stderr
    assert f"the smallest planned held memory is {gib(smallest[1]['plan']['held_bytes'])} (trial {smallest[0]}" in (
        proc.stderr
    )
    assert "quant=bnb/nf4" in proc.stderr.split("smallest")[1]
    assert "Traceback" not in proc.stderr


def test_a_torchao_int8_setting_that_truly_fits_is_loaded_not_pruned(tmp_path, cache_dir):
    """A budget between what torchao int8 really holds and the unquantized footprint (which torchao's footprint
    equals: its tensors report fp16): judged on the held memory by default, the setting is loaded."""
    # built first: transformers' torchao quantizer reads the checkpoint's files in preprocess, so a plan of a
    # model whose checkpoint is not yet in the cache fails there (IndexError in set_metadata)
    checkpoint.locate(compose([f"cache_dir={cache_dir}"]).model, str(cache_dir))
    sweep_dir = tmp_path / "study"
    budget = "6MB"  # tiny_llama: fp16 8.0 MB; torchao int8 holds 5.1 MB of int8 data, scales and fp16 rest
    proc = run_cli(*_study_args(sweep_dir, cache_dir, "++hydra.sweeper.space={torchao/int8_weight_only: {}}",
                                f"budget={budget}", "hydra.sweeper.n_trials=1"), timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    plan = _record(sweep_dir / "0" / "plan" / "run.json")["plan"]
    limit = parse_size(budget, "budget")
    assert plan["held_bytes"] <= limit < plan["footprint_bytes"]  # the footprint would have pruned it
    trial = json.loads((sweep_dir / "0" / "trial.json").read_text())
    assert trial["state"] == "complete" and trial["memory_bytes"] == plan["held_bytes"]
    assert _record(sweep_dir / "0" / "run.json")["status"] == "ok"
    assert "on the planned held memory" in proc.stdout + proc.stderr


def _wait_for(path: Path, proc, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the study ended before {path.name}: {proc.communicate()}"
        assert time.monotonic() < deadline, f"no {path} after {timeout} s"
        time.sleep(0.05)


def _identity(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


@pytest.mark.slow
def test_a_study_interrupted_in_a_load_resumes_and_its_answer_is_the_records(tmp_path, cache_dir, capsys):
    """tiny_llama, budget 6 MB: quant=none (7.6 MiB) pruned by plan; nf4 and int8 loaded. The first load is
    held at the stream stage and interrupted as a terminal's Ctrl-C does; the same command resumes. Two
    objectives (KL, planned memory): the multi-objective study, whose best that fits is still the lowest KL."""
    sweep_dir, held = tmp_path / "study", tmp_path / "held"
    args = _study_args(sweep_dir, cache_dir, "++hydra.sweeper.space={none: {}, bnb/nf4: {}, bnb/int8: {}}",
                       "budget=6MB", "hydra.sweeper.n_trials=10", "hydra.sweeper.seed=6",
                       "hydra.sweeper.objectives=[kl_mean,memory]")  # fmt: skip
    first = start_cli(*args, env={"QLOAD_HOLD": f"stream:{held}"})
    try:
        _wait_for(held, first)
        os.killpg(first.pid, signal.SIGINT)
        _, err = first.communicate(timeout=120)
    finally:
        first.kill()
    assert first.returncode == 130, err
    interrupted = int(re.search(r"interrupted in trial (\d+); the same command resumes the study", err)[1])
    kept = [p for p in sweep_dir.glob("*/**/*.json") if not p.is_relative_to(sweep_dir / str(interrupted))]
    before = {p: _identity(p) for p in kept}
    # seed 6 asks for quant=none first (pruned by plan), then a setting that loads and is held
    assert [json.loads(p.read_text())["state"] for p in kept if p.name == "trial.json"] == ["pruned"], kept
    held_trial = json.loads((sweep_dir / str(interrupted) / "trial.json").read_text())
    assert held_trial["state"] == "interrupted"
    assert _record(sweep_dir / str(interrupted) / "run.json")["status"] == "interrupted"

    again = run_cli(*args, timeout=900)
    assert again.returncode == 0, again.stderr
    assert all(_identity(p) == ident for p, ident in before.items())  # finished trials were not run again
    trials = {t["number"]: t for t in (json.loads(p.read_text()) for p in sweep_dir.glob("*/trial.json"))}
    reruns = [t for t in trials.values() if t.get("rerun_of") == interrupted]
    assert len(reruns) == 1 and reruns[0]["number"] > interrupted  # numbers continue
    assert reruns[0]["setting"] == held_trial["setting"] and reruns[0]["state"] == "complete"
    s = optuna.load_study(study_name="study", storage=f"sqlite:///{sweep_dir / 'study.db'}")
    assert s.trials[interrupted].state == TrialState.FAIL and s.trials[interrupted].user_attrs["interrupted"]
    for t in s.get_trials(states=(TrialState.COMPLETE,)):  # two objectives: KL and the planned held memory in MiB
        plan = _record(sweep_dir / str(t.user_attrs.get("same_as", t.number)) / "plan" / "run.json")
        assert t.values[1] == pytest.approx(plan["plan"]["held_bytes"] / 2**20, abs=1e-3)

    # the answer, checked against the records alone
    budget = parse_size("6MB", "budget")
    kl = {}
    for n, t in trials.items():
        plan, loaded = _record(sweep_dir / str(n) / "plan" / "run.json"), _record(sweep_dir / str(n) / "run.json")
        if t["state"] == "pruned" and t.get("same_as") is None:
            assert plan["plan"]["held_bytes"] > budget and loaded is None
            assert "stream" not in [s["stage"] for s in plan["stages"]]
        if t["state"] == "complete" and t.get("same_as") is None:
            assert plan["plan"]["held_bytes"] <= budget and loaded["status"] == "ok"
            kl[n] = next(s["facts"]["kl_mean"] for s in loaded["stages"] if s["stage"] == "verify")
    assert {trials[n]["setting"][0] for n in kl} == {"quant=bnb/nf4", "quant=bnb/int8"}
    assert any(t["state"] == "pruned" and t["setting"] == ["quant=none"] for t in trials.values())
    chosen = int(re.search(r"best that fits: trial (\d+)", again.stdout)[1])
    assert kl[chosen] == min(kl.values())

    # the printed command loads that setting
    text = re.search(r"load it: (.+)", again.stdout)[1]
    _, rec = load(arguments_of(text), run_dir=tmp_path / "alone")
    trial_rec = _record(sweep_dir / str(chosen) / "run.json")
    assert rec["status"] == "ok"
    assert "stages.verify.LogitsVerify" not in [s["target"] for s in rec["stages"]]  # the load alone
    assert rec["config"]["quant"] == trial_rec["config"]["quant"]
    assert rec["config"]["model"] == trial_rec["config"]["model"]
    assert rec["footprint_bytes"] == trial_rec["footprint_bytes"]

    # the report: the same answer and command, and the plot
    from pipeline.report.table import main as report_main

    capsys.readouterr()
    assert report_main([str(sweep_dir)]) == 0
    out = capsys.readouterr().out
    assert f"best that fits: trial {chosen}," in out and f"load it: {text}" in out and "warning" not in out
    assert (sweep_dir / "study.png").stat().st_size > 10_000


@pytest.mark.slow
def test_fit_budget_on_smollm2_finds_the_lowest_kl_that_fits_200mb(tmp_path):
    """The acceptance study: SmolLM2-135M, 200 MB of held memory, 12 trials (the real cache: the packaged
    checkpoint and its reference are built once)."""
    sweep_dir = tmp_path / "study"
    started = time.monotonic()
    proc = run_cli("-m", "experiment=fit_budget", "model=smollm2_135m", "budget=200MB",
                   f"hydra.sweep.dir={sweep_dir}", "stages.stream.progress=false", timeout=3600)  # fmt: skip
    wall = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr
    trials = [json.loads(p.read_text()) for p in sweep_dir.glob("*/trial.json")]
    assert len(trials) >= 12
    budget = parse_size("200MB", "budget")
    kl = {}
    for t in trials:
        folder = sweep_dir / str(t["number"])
        if t.get("same_as") is not None:
            continue
        plan = _record(folder / "plan" / "run.json")
        if t["state"] == "pruned":
            assert plan["plan"]["held_bytes"] > budget and not (folder / "run.json").exists()
            assert "stream" not in [s["stage"] for s in plan["stages"]]
        else:
            assert t["state"] == "complete" and plan["plan"]["held_bytes"] <= budget
            loaded = _record(folder / "run.json")
            kl[t["number"]] = next(s["facts"]["kl_mean"] for s in loaded["stages"] if s["stage"] == "verify")
    # judged on the held memory only quant=none (256.6 MiB) is over 200 MB; the experiment's seed asks for it
    assert kl and any(t["state"] == "pruned" for t in trials)
    chosen = int(re.search(r"best that fits: trial (\d+)", proc.stdout)[1])
    assert kl[chosen] == min(kl.values())
    print(f"fit_budget on SmolLM2: {len(trials)} trials in {wall:.0f} s, chosen trial {chosen}")
