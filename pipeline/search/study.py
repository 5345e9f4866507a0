"""The Optuna study behind a budget search: where it is stored, how it resumes, what counts as done.

The study lives in a database (SQLite in the sweep folder unless `hydra.sweeper.storage` names another), so
an interrupted search resumes where it stopped when the same command runs again, and several sweepers
(local, Slurm) can share one study. A study remembers its definition (space, objectives, budget, sampler,
what every trial loads besides its setting); running it again with another definition is refused rather
than mixing two questions in one study.

A trial that was interrupted (Ctrl-C, or its process killed) ends as FAIL with the user attribute
`interrupted`, does not count towards `n_trials`, and its setting is queued again, so it runs again under a
new trial number: numbers only grow, and finished trials are never re-run.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

import optuna
import psutil
from optuna.trial import TrialState

from pipeline.search.settings import MAXIMIZED, Sampler, SearchSettings

DB_NAME = "study.db"
INTERRUPTED, OWNER, SAME_AS, RERUN_OF = "interrupted", "owner", "same_as", "rerun_of"


class StudyMismatch(ValueError):
    """The study in the storage was made for another question than the one asked now."""


def storage_url(settings: SearchSettings, sweep_dir: Path) -> str:
    return settings.storage or f"sqlite:///{(sweep_dir / DB_NAME).resolve()}"


def directions(settings: SearchSettings) -> list[str]:
    return ["maximize" if o in MAXIMIZED else "minimize" for o in settings.objectives]


def sampler(settings: SearchSettings) -> optuna.samplers.BaseSampler:
    """Seeded, so that the same command on a fresh folder asks for the same settings in the same order."""
    if settings.sampler == Sampler.random:
        return optuna.samplers.RandomSampler(seed=settings.seed)
    return optuna.samplers.TPESampler(seed=settings.seed, n_startup_trials=settings.n_startup_trials)


def open_study(settings: SearchSettings, sweep_dir: Path, definition: dict[str, Any]) -> optuna.Study:
    """Create the study, or load the one the storage holds under this name after checking it asks the same
    question (`definition`, JSON-comparable)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the sweeper prints its own line per trial
    name = settings.study_name or sweep_dir.name
    study = optuna.create_study(
        storage=storage_url(settings, sweep_dir),
        study_name=name,
        directions=directions(settings),
        sampler=sampler(settings),
        load_if_exists=True,
    )
    if [d.name.lower() for d in study.directions] != directions(settings):
        raise StudyMismatch(
            f"study {name!r} ({storage_url(settings, sweep_dir)}) optimizes {len(study.directions)} objective(s) "
            f"{[d.name.lower() for d in study.directions]}, not {[o.value for o in settings.objectives]}; "
            "choose another hydra.sweep.dir or hydra.sweeper.study_name for a new study"
        )
    saved = study.user_attrs.get("definition")
    definition = json.loads(json.dumps(definition))  # as the storage gives it back
    if saved is None:
        study.set_user_attr("definition", definition)
    elif saved != definition:
        changed = sorted(k for k in set(saved) | set(definition) if saved.get(k) != definition.get(k))
        details = "; ".join(f"{k}: was {saved.get(k)!r}, now {definition.get(k)!r}" for k in changed)
        raise StudyMismatch(
            f"study {name!r} ({storage_url(settings, sweep_dir)}) was made for another search ({details}); "
            "run it with its own settings to resume it, or choose another hydra.sweep.dir or "
            "hydra.sweeper.study_name for a new study"
        )
    return study


def owner() -> dict[str, Any]:
    """Which process runs a trial: its host, pid and start time (a pid alone may be reused)."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": psutil.Process().create_time()}


def _alive(who: dict[str, Any]) -> bool:
    """Whether the process that took a trial still runs. One on another host is assumed to, as nothing here
    can tell; its sweeper settles the trial when it ends."""
    if who.get("host") != socket.gethostname():
        return True
    try:
        return psutil.Process(int(who["pid"])).create_time() == who.get("started")
    except (psutil.Error, KeyError, TypeError, ValueError):
        return False


def settle_abandoned(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Trials left RUNNING by a process of this host that is gone (killed before it could record the
    interruption): ended as interrupted, their settings queued again. Returns them."""
    settled = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not _alive(t.user_attrs.get(OWNER) or {}):
            abandon(study, t.number, t.params)
            settled.append(t)
    return settled


def abandon(study: optuna.Study, number: int, params: dict[str, Any]) -> None:
    """End trial `number` as interrupted and queue its setting again (when it had one)."""
    storage = study._storage  # Optuna has no public way to set an attribute of a trial by its number
    trial_id = storage.get_trial_id_from_study_id_trial_number(study._study_id, number)
    if storage.get_trial(trial_id).state != TrialState.RUNNING:
        return  # another sweeper sharing the study settled it first
    storage.set_trial_user_attr(trial_id, INTERRUPTED, True)
    study.tell(number, state=TrialState.FAIL, skip_if_finished=True)
    if params:
        study.enqueue_trial(params, user_attrs={RERUN_OF: number})


def counted(study: optuna.Study) -> int:
    """Trials that count towards n_trials: all but the interrupted ones (those queued or running included)."""
    return sum(1 for t in study.get_trials(deepcopy=False) if not t.user_attrs.get(INTERRUPTED))


def _settled(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Trials that answered their setting: complete, pruned, or failed (a failure is not retried within the
    study: a setting that cannot run here fails the same way again), interrupted ones excepted."""
    states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    return [t for t in study.get_trials(deepcopy=False, states=states) if not t.user_attrs.get(INTERRUPTED)]


def settled_like(study: optuna.Study, params: dict[str, Any]) -> optuna.trial.FrozenTrial | None:
    """An earlier trial that answered the same setting: its answer stands for this one. (Optuna's FAQ, "How
    to ignore duplicated samples?": return the earlier value instead of running again.)"""
    for t in _settled(study):
        if t.params == params and not t.user_attrs.get(SAME_AS):
            return t
    return None


def tried_settings(study: optuna.Study) -> int:
    """Distinct settings a trial answered."""
    return len({json.dumps(t.params, sort_keys=True) for t in _settled(study)})
