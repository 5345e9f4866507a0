"""One trial's verdict, read off the records its jobs wrote, and the trial's own record, `trial.json`.

A trial is planned first (`<sweep dir>/<n>/plan/run.json`, status `planned`, no weight read). A setting whose
plan does not fit (over `budget=` on the planned figure the study limits, or over `device_map.max_memory`) is
pruned there and never loaded. A setting that fits is loaded and verified (`<sweep dir>/<n>/run.json`), and
its verify stage's figures are its objective values.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.core import record
from pipeline.core.sizes import gib
from pipeline.search.settings import BudgetOn, Objective

PLAN_DIR, TRIAL_JSON, RUN_JSON = "plan", "trial.json", "run.json"
COMPLETE, PRUNED, FAILED, FITS, INTERRUPTED = "complete", "pruned", "failed", "fits", "interrupted"
QUALITY_STAGE = "verify"


@dataclass
class Budget:
    """What a setting must fit into: `budget=` in bytes (None: no budget) on the planned figure `on`."""

    bytes: int | None
    text: str | None
    on: BudgetOn

    def describe(self) -> str:
        if self.bytes is None:
            return "no budget"
        return f"budget={self.text} ({size(self.bytes)}) on the planned {self.on.label}"


@dataclass
class Verdict:
    """How a trial ended: `fits` (planned, to be loaded), `pruned`, `complete` or `failed` (a trial can also
    be `interrupted`, see pipeline.search.study)."""

    state: str
    reason: str | None = None
    memory_bytes: int | None = None  # the planned figure the budget is on
    plan: dict[str, Any] | None = None  # the plan's summary (run.json's `plan`)
    values: dict[str, float] = field(default_factory=dict)  # objective -> value, for a complete trial


def size(n: int) -> str:
    """Bytes as the plan prints them (GiB, MiB), or in bytes below a MiB, where one decimal of MiB shows 0.0."""
    return gib(n) if abs(n) >= 2**20 else f"{n} bytes"


def planned_memory(plan: dict[str, Any], on: BudgetOn) -> int:
    """The planned figure a budget limits: the memory the loaded model holds (all devices together, as the
    footprint; each device's own room is `device_map.max_memory`'s), the footprint, or the highest predicted
    peak over the devices."""
    if on == BudgetOn.footprint:
        return int(plan["footprint_bytes"])
    if on == BudgetOn.held:
        if plan.get("held_bytes") is None:
            raise ValueError(
                "this plan record has no held_bytes (it was planned before the plan counted them): plan it again, "
                "or judge it with hydra.sweeper.budget_on=footprint"
            )
        return int(plan["held_bytes"])
    peaks = plan.get("predicted_peak_bytes_per_device") or {"cpu": plan["predicted_peak_bytes"]}
    return int(max(peaks.values()))


def read_record(path: Path) -> dict[str, Any] | None:
    """A run.json, or None when the job wrote none (it is renamed into place whole, never half-written)."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def _failure(rec: dict[str, Any] | None, what: str, path: Path) -> str:
    if rec is None:
        return f"the {what} job wrote no record ({path})"
    return f"the {what} failed in stage {rec.get('failed_stage')}: {rec.get('error') or rec.get('status')} ({path})"


def judge_plan(folder: Path, budget: Budget) -> Verdict:
    """From the trial's plan record: `fits`, `pruned` (with why, and the planned figures) or `failed`."""
    path = folder / PLAN_DIR / RUN_JSON
    rec = read_record(path)
    if rec is None or rec.get("status") != "planned" or not rec.get("plan"):
        return Verdict(FAILED, _failure(rec, "plan", path))
    plan = rec["plan"]
    memory = planned_memory(plan, budget.on)
    verdict = Verdict(FITS, memory_bytes=memory, plan=plan)
    if not plan.get("fits", True):
        verdict.state = PRUNED
        verdict.reason = f"does not fit device_map.max_memory: {gib(plan.get('over_bytes') or 0)} over (planned)"
    elif budget.bytes is not None and memory > budget.bytes:
        verdict.state = PRUNED
        verdict.reason = f"planned {budget.on.label} {size(memory)} > budget={budget.text} ({size(budget.bytes)})"
    return verdict


def judge_load(folder: Path, planned: Verdict, objectives: list[Objective]) -> Verdict:
    """From the trial's load record: `complete` with a value per objective, or `failed`."""
    path = folder / RUN_JSON
    rec = read_record(path)
    verdict = Verdict(FAILED, memory_bytes=planned.memory_bytes, plan=planned.plan)
    if rec is None or rec.get("status") != "ok":
        verdict.reason = _failure(rec, "load", path)
        return verdict
    facts = next((s.get("facts") or {} for s in rec.get("stages") or [] if s.get("stage") == QUALITY_STAGE), None)
    if facts is None:
        verdict.reason = f"the load has no {QUALITY_STAGE} stage ({path}); the study needs stages/verify=logits"
        return verdict
    for objective in objectives:
        if objective == Objective.memory:
            verdict.values[objective.value] = round(planned.memory_bytes / 2**20, 3)
            continue
        value = facts.get(objective.value)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            note = facts.get(f"{objective.value}_note") or "not recorded"
            verdict.reason = f"the {QUALITY_STAGE} stage has no {objective.value}: {note} ({path})"
            return verdict
        verdict.values[objective.value] = float(value)
    verdict.state = COMPLETE
    return verdict


@dataclass
class TrialRecord:
    """`<sweep dir>/<n>/trial.json`: what the report reads for each trial."""

    number: int
    study: str
    state: str
    setting: list[str]  # the overrides that select it: quant=<option> quant.<key>=<value> ...
    params: dict[str, Any]  # Optuna's
    command: str  # the command that loads this setting alone
    budget: dict[str, Any]
    memory_bytes: int | None = None
    values: dict[str, float] = field(default_factory=dict)
    reason: str | None = None
    plan: dict[str, Any] | None = None
    plan_record: str | None = None  # relative to the trial folder
    load_record: str | None = None
    same_as: int | None = None  # answered by an earlier trial with the same setting, nothing run
    rerun_of: int | None = None  # the interrupted trial whose setting this one runs again
    wall_s: float | None = None

    def write(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        record.write_json_atomic(folder / TRIAL_JSON, asdict(self))


def read_trials(sweep_dir: Path) -> list[dict[str, Any]]:
    """Every trial.json under a sweep folder, by trial number."""
    trials = [json.loads(p.read_text()) for p in Path(sweep_dir).glob(f"*/{TRIAL_JSON}")]
    return sorted(trials, key=lambda t: t["number"])
