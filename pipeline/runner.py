"""The runner: build the stages from the config, run them in order (a plan: up to device_map, then the
planning step), measure each, record the run."""

from __future__ import annotations

import copy
import time
import traceback
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pipeline import guard
from pipeline.core import progress, record, schema
from pipeline.core.context import LoadContext
from pipeline.core.measure import ru_maxrss_bytes, track
from pipeline.plan.describe import describe
from pipeline.plan.step import PLAN_KINDS, Plan, summary
from stages import registry
from stages.base import Stage


class StageError(RuntimeError):
    """A stage failed; the run record says which and why."""

    def __init__(self, stage: str, error: BaseException) -> None:
        super().__init__(f"stage {stage} failed: {type(error).__name__}: {error}")
        self.stage, self.error = stage, error


def build_stage(kind: str, node: DictConfig) -> Stage:
    """The stage `node` selects, from the closed set in `stages.registry` (never resolved from the string),
    built with arguments checked against that stage's schema."""
    target, config = guard.stage_config(kind, node)
    return registry.load(kind, target)(config)


def run(cfg: DictConfig, out_dir: Path) -> tuple[Any, dict]:
    """Load the model `cfg` describes (with plan=true: plan it, returning no model); write `stages.jsonl` and
    `run.json` into `out_dir`. Raises StageError when a stage fails, KeyboardInterrupt when interrupted, and
    record.RecordError when a record cannot be written (the run stops at the first stage it cannot record)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = copy.deepcopy(cfg)
    schema.name_model(cfg)  # with model.path, the record names the checkpoint, not the model YAML
    progress.configure(bool(cfg.get("progress", True)))
    journal = out_dir / "stages.jsonl"
    rec: dict[str, Any] = {"status": "running", "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "stages": []}
    ctx: LoadContext | None = None
    failure: BaseException | None = None
    kind, plan = "config", bool(cfg.get("plan", False))  # a config recorded before plan= existed: a load
    with track() as total:
        try:
            record.start_jsonl(journal)
            guard.check(cfg)  # configs are untrusted: only this project's components, nothing to call
            ctx = LoadContext(cfg=OmegaConf.to_object(cfg))  # runs the schemas' cross-field checks
            # every stage is built, a plan's too: the plan's process then imports what the load's would
            stages = {kind: build_stage(kind, cfg.stages[kind]) for kind in schema.STAGE_KINDS}
            steps = [(k, cfg.stages[k]._target_, stages[k]) for k in (PLAN_KINDS if plan else schema.STAGE_KINDS)]
            steps += [("plan", "pipeline.plan.step.Plan", Plan(stages["stream"]))] if plan else []
            for kind, target, stage in steps:
                run_stage(ctx, kind, target, stage, rec, journal)
            rec["status"] = "planned" if plan else "ok"
        except KeyboardInterrupt:
            rec.update(status="interrupted", failed_stage=kind)
        except Exception as err:  # recorded, then raised as a StageError (or the RecordError) below
            failure = err
            rec.update(
                status="failed",
                failed_stage=kind,
                error=f"{type(err).__name__}: {err}",
                traceback=traceback.format_exc(limit=8),
            )
    rec["total"] = total.to_dict() | {"ru_maxrss_mb": round(ru_maxrss_bytes() / 2**20, 1)}
    rec["footprint_bytes"] = ctx.facts.get("postprocess", {}).get("footprint_bytes") if ctx else None
    if plan:
        rec["plan"] = summary(ctx.facts["plan"]) if rec["status"] == "planned" else None
    rec["checkpoint"] = ctx.facts.get("config_merge", {}).get("checkpoint") if ctx else None
    rec.update(git=record.git_state(), host=record.host(), config=OmegaConf.to_container(cfg, resolve=True))
    if cfg.model.get("path") and ctx and ctx.facts.get("config_merge", {}).get("architecture"):
        rec["config"]["model"]["architecture"] = ctx.facts["config_merge"]["architecture"]  # what was built
    rec["versions"] = ctx.facts.get("env_check", {}).get("versions") if ctx else None
    try:
        record.write_json_atomic(out_dir / "run.json", rec)
    except record.RecordError as err:
        failure = record.RecordError(err.path, err.error, note=_ending(rec))
    print(record.format_table(rec["stages"], rec["total"]))
    if rec["status"] == "planned":
        print(describe(ctx.facts["plan"]))
    if isinstance(failure, record.RecordError):
        raise failure
    if rec["status"] == "interrupted":
        raise KeyboardInterrupt
    if rec["status"] not in ("ok", "planned"):
        raise StageError(rec["failed_stage"], failure)
    return (None if plan else ctx.model), rec


def run_stage(ctx: LoadContext, kind: str, target: str, stage: Stage, rec: dict, journal: Path) -> None:
    """Run one stage, measured; when it ends, ok or failed, its entry goes to `rec` and a line to the journal.
    An interrupted stage did not end: it gets neither. If its line cannot be written the run stops there with
    the RecordError, unless the stage itself failed: that failure stays the run's error."""
    entry: dict[str, Any] = {"stage": kind, "target": target, "status": "failed"}
    failure = None
    with track() as m:
        try:
            ctx.facts[kind] = stage(ctx) or {}
            entry["status"] = "ok"
        except Exception as err:
            failure = err
    entry.update(metrics=m.to_dict(), facts=ctx.facts.get(kind, {}))
    rec["stages"].append(entry)
    try:
        record.append_jsonl(journal, entry)
    except record.RecordError as err:
        if failure is None:
            raise
        rec["record_error"] = str(err)
    if failure is not None:
        raise failure


def _ending(rec: dict) -> str:
    """How the run had ended, for a RecordError about its run.json."""
    if rec["status"] in ("ok", "planned"):
        return f"the run itself ended {rec['status']}"
    if rec["status"] == "interrupted":
        return f"the run had been interrupted in stage {rec['failed_stage']}"
    if rec["error"].startswith("RecordError: "):
        return f"the run had stopped at stage {rec['failed_stage']}: {rec['error'].removeprefix('RecordError: ')}"
    return f"the run had failed: stage {rec['failed_stage']} failed: {rec['error']}"
