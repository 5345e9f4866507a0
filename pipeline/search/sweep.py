"""The budget search's loop: Optuna asks, each trial is planned, pruned or loaded, Optuna is told.

Optuna does the sampling and the storage (ask-and-tell); the trials' jobs go through Hydra's launcher like
any sweep's, so they run where the launcher runs them (here, a local pool, Slurm), each load in a fresh
process with its own records. Per trial:

1. Optuna suggests a setting from the space (`pipeline.search.space`). One an earlier trial already
   answered is answered the same way, without running anything (`same_as` in its trial.json).
2. The plan job (`plan=true`, `<n>/plan/`) predicts its footprint, the memory the model will hold
   and its peak without reading a weight.
3. Over the budget: pruned, with the planned figures. Else the load job (`<n>/`) loads it and runs the
   verify stage, whose figure Optuna is told.

The study ends when it holds `n_trials` trials or every setting of the space was tried; it then names the
best setting that fits and the command that loads it. A budget nothing fits ends with the smallest planned
figure; a trial that failed ends the study with status 1 after the answer, as a failed job ends a sweep.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from hydra.errors import CompactHydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from pipeline import CONF_DIR
from pipeline.core.sizes import parse_size
from pipeline.search import answer
from pipeline.search import command as commands
from pipeline.search import study as studies
from pipeline.search.settings import SearchSettings
from pipeline.search.space import Space, SpaceError, parse
from pipeline.search.trial import (
    COMPLETE,
    FAILED,
    FITS,
    INTERRUPTED,
    PLAN_DIR,
    PRUNED,
    RUN_JSON,
    Budget,
    TrialRecord,
    Verdict,
    judge_load,
    judge_plan,
    read_trials,
    size,
)

EXIT_INTERRUPTED = 130
STATES = (COMPLETE, PRUNED, FAILED)
# keys of the command line that a study sets itself, per trial
TRIAL_KEYS = ("quant", "plan")


class SearchError(CompactHydraException):
    """The search cannot start, or ended without an answer or with failed trials; Hydra prints the message
    alone and exits with status 1."""


class BudgetSearch:
    """One run of the sweeper over a study: set up from the composed config, then `run`."""

    def __init__(
        self, settings: SearchSettings, config: DictConfig, launcher: Any, config_loader: Any, arguments: list[str]
    ) -> None:
        self.settings, self.config, self.launcher, self.loader = settings, config, launcher, config_loader
        self.sweep_dir = Path(str(config.hydra.sweep.dir))
        self.arguments = job_arguments(arguments)
        self.space = self._space()
        self.budget = self._budget()
        defaults = self.loader.load_configuration(
            config_name=config.hydra.job.config_name, overrides=[], run_mode=RunMode.RUN
        )
        self.load_args = commands.load_arguments(
            OmegaConf.to_container(config.hydra.runtime.choices), dict(defaults.hydra.runtime.choices), self.arguments
        )

    def _space(self) -> Space:
        choice = OmegaConf.select(self.config, "hydra.runtime.choices.experiment", default=None)
        where = "hydra.sweeper.space" + (f" (conf/experiment/{choice}.yaml or an override)" if choice else "")
        try:
            return parse(self.config.hydra.sweeper.space, self._quant_of, CONF_DIR, where)
        except SpaceError as err:
            raise SearchError(f"error: {err}") from None

    def _quant_of(self, option: str) -> DictConfig:
        return self.loader.load_sweep_config(self.config, [*self.arguments, f"quant={option}"]).quant

    def _budget(self) -> Budget:
        text = self.config.get("budget")
        try:
            limit = None if text is None else parse_size(text, "budget")
        except ValueError as err:
            raise SearchError(f"error: {err}") from None
        return Budget(limit, None if text is None else str(text), self.settings.budget_on)

    def definition(self) -> dict[str, Any]:
        """What makes this study this question: a study run again with another definition is refused."""
        s = self.settings
        return {
            "space": self.space.options,
            "objectives": [o.value for o in s.objectives],
            "budget_bytes": self.budget.bytes,
            "budget_on": s.budget_on.value,
            "sampler": s.sampler.value,
            "seed": s.seed,
            "n_startup_trials": s.n_startup_trials,
            "load_arguments": self.load_args,
        }

    # ---- the loop ----

    def run(self) -> None:
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, self.sweep_dir / "multirun.yaml")
        try:
            study = studies.open_study(self.settings, self.sweep_dir, self.definition())
        except studies.StudyMismatch as err:
            raise SearchError(f"error: {err}") from None
        self.study = study
        for t in studies.settle_abandoned(study):  # left running by a process that is gone (killed outright)
            self.record_interrupted(t.number, t.params, "its sweeper's process ended while it ran")
        done = studies.counted(study)
        print(
            f"study {study.study_name} ({studies.storage_url(self.settings, self.sweep_dir)}): "
            f"{done} of {self.settings.n_trials} trial(s) there, {self.space.size()} setting(s) in the space, "
            f"{self.budget.describe()}, objective(s) {', '.join(o.value for o in self.settings.objectives)}",
            flush=True,
        )
        while True:
            left = self.settings.n_trials - studies.counted(study)
            if left <= 0:
                break
            if studies.tried_settings(study) >= self.space.size():
                print(f"every one of the {self.space.size()} setting(s) of the space was tried", flush=True)
                break
            self.run_batch(min(left, self.settings.batch_size))
        self.conclude()

    def run_batch(self, size: int) -> None:
        """Ask for `size` trials, plan the new settings together, load together those that fit."""
        study = self.study
        trials = [study.ask() for _ in range(size)]
        pending = {t.number: t for t in trials}
        started = time.perf_counter()
        try:
            for t in trials:
                t.set_user_attr(studies.OWNER, studies.owner())
                self.space.suggest(t)
                earlier = studies.settled_like(study, t.params)
                if earlier is not None:
                    self.answer_same(t, earlier)
                    del pending[t.number]
            planned = self.launch(list(pending.values()), plan=True)
            verdicts = {n: judge_plan(self.folder(n), self.budget) for n in planned}
            for n, verdict in verdicts.items():
                if verdict.state != FITS:
                    self.finish(pending.pop(n), verdict, started)
            loaded = self.launch([pending[n] for n in verdicts if n in pending], plan=False)
            for n in loaded:
                self.finish(pending.pop(n), judge_load(self.folder(n), verdicts[n], self.settings.objectives), started)
        except BaseException as err:  # Ctrl-C (in a job: its SystemExit 130) or a failure of the sweeper itself
            for number, t in pending.items():
                studies.abandon(study, number, t.params)
                self.record_interrupted(number, t.params, f"interrupted ({type(err).__name__})")
            if pending:
                numbers = ", ".join(map(str, pending))
                print(
                    f"\nerror: interrupted in trial {numbers}; the same command resumes the study "
                    f"(finished trials are kept, trial {numbers} runs again under a new number)",
                    file=sys.stderr,
                    flush=True,
                )
            if isinstance(err, KeyboardInterrupt):
                raise SystemExit(EXIT_INTERRUPTED) from None
            raise

    def folder(self, number: int) -> Path:
        return self.sweep_dir / str(number)

    def launch(self, trials: list[Any], plan: bool) -> list[int]:
        """Run the trials' plan (or load) jobs through Hydra's launcher, each into its trial's folder; the
        outcome is read from the records they write, not from the jobs' return values."""
        if not trials:
            return []
        jobs = []
        for t in trials:
            where = f"{t.number}/{PLAN_DIR}" if plan else str(t.number)
            jobs.append(
                [
                    *self.arguments,
                    *self.space.overrides(t.params),
                    f"plan={str(plan).lower()}",
                    f"hydra.sweep.subdir={where}",
                ]
            )
        self.launcher.launch(jobs, initial_job_idx=trials[0].number)
        return [t.number for t in trials]

    # ---- telling Optuna, and the trial's record ----

    def record(self, t: Any, verdict: Verdict, started: float, **extra: Any) -> None:
        folder = self.folder(t.number)
        setting = self.space.overrides(t.params)
        TrialRecord(
            number=t.number,
            study=self.study.study_name,
            state=verdict.state,
            setting=setting,
            params=dict(t.params),
            command=commands.command(self.load_args, setting),
            budget={"bytes": self.budget.bytes, "text": self.budget.text, "on": self.budget.on.value},
            memory_bytes=verdict.memory_bytes,
            values=verdict.values,
            reason=verdict.reason,
            plan=verdict.plan,
            plan_record=f"{PLAN_DIR}/{RUN_JSON}" if (folder / PLAN_DIR / RUN_JSON).exists() else None,
            load_record=RUN_JSON if (folder / RUN_JSON).exists() else None,
            rerun_of=t.user_attrs.get(studies.RERUN_OF),
            wall_s=round(time.perf_counter() - started, 3),
            **extra,
        ).write(folder)
        t.set_user_attr("memory_bytes", verdict.memory_bytes)
        t.set_user_attr("reason", verdict.reason)
        t.set_user_attr("folder", str(folder))

    def record_interrupted(self, number: int, params: dict[str, Any], why: str) -> None:
        """trial.json for a trial that did not finish: it does not count, and its setting runs again."""
        setting = self.space.overrides(params) if params else []
        TrialRecord(
            number=number,
            study=self.study.study_name,
            state=INTERRUPTED,
            setting=setting,
            params=dict(params),
            command=commands.command(self.load_args, setting),
            budget={"bytes": self.budget.bytes, "text": self.budget.text, "on": self.budget.on.value},
            reason=f"{why}; its setting is queued to run again under a new trial number",
        ).write(self.folder(number))

    def finish(self, t: Any, verdict: Verdict, started: float) -> None:
        self.record(t, verdict, started)
        objectives = [o.value for o in self.settings.objectives]
        if verdict.state == COMPLETE:
            self.study.tell(t, [verdict.values[o] for o in objectives])
        else:
            self.study.tell(t, state=self._state(verdict.state))
        print(trial_line(t.number, self.space.overrides(t.params), verdict, self.budget), flush=True)

    def answer_same(self, t: Any, earlier: Any) -> None:
        """A setting an earlier trial answered (complete, pruned or failed): the same answer, nothing run."""
        from optuna.trial import TrialState

        state = {TrialState.COMPLETE: COMPLETE, TrialState.PRUNED: PRUNED}.get(earlier.state, FAILED)
        verdict = Verdict(
            state,
            reason=f"same setting as trial {earlier.number}, nothing run"
            + (f": {earlier.user_attrs['reason']}" if earlier.user_attrs.get("reason") else ""),
            memory_bytes=earlier.user_attrs.get("memory_bytes"),
            values=dict(zip((o.value for o in self.settings.objectives), earlier.values or [], strict=False)),
        )
        t.set_user_attr(studies.SAME_AS, earlier.number)
        self.record(t, verdict, time.perf_counter(), same_as=earlier.number)
        if state == COMPLETE:
            self.study.tell(t, list(earlier.values))
        else:
            self.study.tell(t, state=self._state(state))
        print(trial_line(t.number, self.space.overrides(t.params), verdict, self.budget), flush=True)

    @staticmethod
    def _state(state: str) -> Any:
        from optuna.trial import TrialState

        return {PRUNED: TrialState.PRUNED, FAILED: TrialState.FAIL}[state]

    # ---- the answer ----

    def conclude(self) -> None:
        """Name the best setting that fits and its command (from the trials' records, as the report does);
        fail when nothing fit or a trial failed."""
        trials = read_trials(self.sweep_dir)
        counts = {s: sum(1 for t in trials if t["state"] == s and t.get("same_as") is None) for s in STATES}
        repeats = sum(1 for t in trials if t.get("same_as") is not None)
        report = f"python -m pipeline.report {self.sweep_dir}"
        key = answer.quality_key(trials)
        chosen = answer.best(trials, key) if key else None
        if chosen is not None:
            print(
                f"\nbest that fits: trial {chosen['number']}, {' '.join(chosen['setting'])}: {key} "
                f"{chosen['values'][key]:.4g}, planned {self.budget.on.label} {size(chosen['memory_bytes'])} "
                f"({counts[COMPLETE]} loaded, {counts[PRUNED]} pruned by plan, {counts[FAILED]} failed, "
                f"{repeats} repeat(s) answered by an earlier trial)\n"
                f"load it: {chosen['command']}\n"
                f"report:  {report}",
                flush=True,
            )
        failed = [t for t in trials if t["state"] == FAILED and t.get("same_as") is None]
        failures = (
            f"{len(failed)} trial(s) failed ({', '.join(str(t['number']) for t in failed)}); trial "
            f"{failed[0]['number']} ({' '.join(failed[0]['setting'])}): {failed[0]['reason']}"
            if failed
            else ""
        )
        small = answer.smallest_pruned(trials)
        if chosen is None and small is not None:
            raise SearchError(
                f"error: nothing fits {self.budget.describe()}: every one of {counts[PRUNED]} planned setting(s) "
                f"is over; the smallest planned {self.budget.on.label} is {size(small['memory_bytes'])} (trial "
                f"{small['number']}: {' '.join(small['setting'])}). Fix: budget= at least that, or add smaller "
                f"settings to hydra.sweeper.space" + (f"\nalso: {failures}" if failures else "") + f"\nreport: {report}"
            )
        if failures:
            raise SearchError(f"error: {failures}\nreport: {report}")


def job_arguments(arguments: list[str]) -> list[str]:
    """The command line's overrides, which every trial's jobs get too. A search picks `quant` and `plan`
    itself and sweeps nothing given on the command line: both are refused, saying where the space lives."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for override in OverridesParser.create().parse_overrides(arguments):
        key = override.key_or_group.lstrip("+~")
        if override.is_sweep_override():
            raise SearchError(
                f"error: {override.input_line}: a budget search sweeps only its space (hydra.sweeper.space); "
                "give one value, or add the choices to the space"
            )
        if key in TRIAL_KEYS or key.startswith("quant."):
            raise SearchError(
                f"error: {override.input_line}: a budget search sets {key} per trial; put quant options and "
                "their hyperparameters into hydra.sweeper.space"
            )
    return list(arguments)


def trial_line(number: int, setting: list[str], verdict: Verdict, budget: Budget) -> str:
    """One line per finished trial."""
    memory = f"planned {budget.on.label} {size(verdict.memory_bytes)}" if verdict.memory_bytes is not None else ""
    if verdict.state == COMPLETE:
        values = ", ".join(f"{k} {v:.4g}" for k, v in verdict.values.items())
        what = f"{values}; {memory}" + (f" ({verdict.reason})" if verdict.reason else "")
    else:
        what = f"{verdict.state}: {verdict.reason}"
    return f"trial {number} ({' '.join(setting)}): {what}"
