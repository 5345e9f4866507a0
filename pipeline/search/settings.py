"""The budget search's settings (`hydra/sweeper=qload_optuna`): one dataclass, the one home of their defaults.

`conf/hydra/sweeper/qload_optuna.yaml` names this schema in its `defaults:` and sets `_target_`, so that a
misspelled setting or a value outside an enum fails when Hydra composes the config. The search space is
checked against the backends' schemas by `pipeline.search.space` (its keys depend on the backend, which a
dataclass cannot say).

This module imports neither Optuna nor torch: Hydra imports the sweeper plugin, and with it this module, on
every start, sweep or not.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

SWEEPER_TARGET = "hydra_plugins.qload_optuna.QloadOptunaSweeper"
# SQLAlchemy's own dialects: a storage URL names a database, never a plug-in found by name
STORAGE_DIALECTS = ("sqlite", "postgresql", "mysql", "mariadb", "oracle", "mssql")
_STORAGE = re.compile(r"^(?P<dialect>[a-z]+)(\+[a-z0-9_]+)?://")


class Objective(str, Enum):
    """What a trial is scored on: a figure of the verify stage, or the planned memory the budget is on."""

    kl_mean = "kl_mean"
    kl_max = "kl_max"
    perplexity = "perplexity"
    top1_agreement = "top1_agreement"
    memory = "memory"


# top-1 agreement is better higher; every other objective lower
MAXIMIZED = {Objective.top1_agreement}


class BudgetOn(str, Enum):
    """Which planned figure `budget=` limits (the plan's, pipeline/plan/step.py)."""

    # the bytes the loaded model holds (the plan's held_bytes): every tensor's real storage, quantized data and its
    # state, all devices together
    held = "held"
    peak = "peak"  # the predicted peak of the load, on the device where it is highest (RSS on a CPU)
    # the model's bytes as get_memory_footprint() counts them: torchao's and quanto's weights at their logical
    # dtype (an int8 weight at 2 bytes in fp16), bitsandbytes' and HQQ's state left out
    footprint = "footprint"

    @property
    def label(self) -> str:
        """How the figure is named in messages: 'planned held memory 155.3 MiB'."""
        return "held memory" if self == BudgetOn.held else self.value


class Sampler(str, Enum):
    tpe = "tpe"  # Optuna's TPESampler (multi-objective too), seeded
    random = "random"  # RandomSampler, seeded


@dataclass
class SearchSettings:
    """A budget search: Optuna asks for a setting, each trial plans it (no weight read), settings over the
    budget are pruned, the others are loaded and verified, and Optuna is told the verify stage's figure."""

    _target_: str = SWEEPER_TARGET
    # trials the study holds when it is done (interrupted ones do not count); a resumed study runs the rest
    n_trials: int = 12
    # what each trial is scored on, in order; two (a quality figure and memory) give a Pareto front
    objectives: list[Objective] = field(default_factory=lambda: [Objective.kl_mean])
    budget_on: BudgetOn = BudgetOn.held
    sampler: Sampler = Sampler.tpe
    seed: int = 0
    # TPE: trials sampled at random before it models the results (Optuna's default is 10)
    n_startup_trials: int = 6
    # trials asked for and launched together (a parallel launcher such as local or slurm runs them at once)
    batch_size: int = 1
    # an SQLAlchemy URL (sqlite:///..., postgresql://...); null: sqlite:///<sweep dir>/study.db
    storage: str | None = None
    # null: the sweep folder's name
    study_name: str | None = None
    # quant option (a file conf/quant/<option>.yaml) -> {hyperparameter of its backend: [choices]}
    space: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_storage(self.storage)
        for key in ("n_trials", "batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"hydra.sweeper.{key}={getattr(self, key)}: must be >= 1")
        if self.n_startup_trials < 0:
            raise ValueError(f"hydra.sweeper.n_startup_trials={self.n_startup_trials}: must be >= 0")
        if not self.objectives or len(set(self.objectives)) != len(self.objectives):
            raise ValueError(
                f"hydra.sweeper.objectives={[o.value for o in self.objectives]}: one or more of "
                f"{', '.join(o.value for o in Objective)}, each once"
            )
        if all(o == Objective.memory for o in self.objectives):
            raise ValueError(
                "hydra.sweeper.objectives=[memory]: memory alone needs no load; add a quality figure "
                "(kl_mean, kl_max, perplexity, top1_agreement)"
            )


def check_storage(url: str | None) -> None:
    """hydra.sweeper.storage: an SQLAlchemy URL of one of SQLAlchemy's built-in dialects (with any driver)."""
    if url is None:
        return
    match = _STORAGE.match(str(url))
    if not match or match["dialect"] not in STORAGE_DIALECTS:
        raise ValueError(
            f"hydra.sweeper.storage={url!r}: expected an SQLAlchemy URL of one of {', '.join(STORAGE_DIALECTS)}, "
            "e.g. sqlite:////shared/studies/study.db or postgresql://user@host/db (null: study.db in the sweep folder)"
        )
