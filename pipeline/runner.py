"""The runner: build the stages from the config, run them in order (a plan: up to device_map, then the
planning step), measure each, record the run, and generate from the prompt if one is set. The CLI (in a
fresh process, `pipeline.isolate`) and the Python API (`pipeline.load`) both run a load through `run`."""

from __future__ import annotations

import copy
import time
import traceback
from collections.abc import Callable
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pipeline import guard, startup
from pipeline.core import cachelock, progress, record, schema
from pipeline.core.context import LoadContext
from pipeline.core.measure import Metrics, combined, rss_anon_mb, ru_maxrss_bytes, track
from pipeline.core.schema import SETUP, STAGE_KINDS
from stages import registry
from stages.base import Stage


class StageError(RuntimeError):
    """A stage failed; the run record says which and why."""

    def __init__(self, stage: str, error: BaseException) -> None:
        super().__init__(f"stage {stage} failed: {type(error).__name__}: {error}")
        self.stage, self.error = stage, error


class GenerationError(RuntimeError):
    """The model loaded, then generating from `prompt=` failed; run.json has it as `generation.error`."""


def build_stage(kind: str, node: DictConfig) -> Stage:
    """The stage `node` selects, from the closed set in `stages.registry` (never resolved from the string),
    built with arguments checked against that stage's schema."""
    target, config = guard.stage_config(kind, node)
    return registry.load(kind, target)(config)


def run(
    cfg: DictConfig,
    out_dir: Path,
    verbose: bool = False,
    extra: dict | None = None,
    fresh_process: bool = False,
    before: Metrics | None = None,
) -> tuple[Any, dict]:
    """Load the model `cfg` describes (with plan=true: plan it, returning no model), then generate from
    `cfg.prompt` if set; write `stages.jsonl` and `run.json` (with `extra` merged in) into `out_dir`; with
    `verbose`, print the stage table (and the plan, the generation) as the CLI does. `fresh_process`: this
    process exists for this load alone, so setup may change the interpreter to start faster
    (`pipeline/startup.py`); never in a caller's own process. Raises StageError when a stage fails,
    GenerationError when the generation does, KeyboardInterrupt when interrupted, and record.RecordError when
    a record cannot be written (the run stops at the first stage it cannot record).

    Every second of the measured total is in an entry: `setup` (importing torch and the libraries, checking
    the config, building the stages) and one per stage. The generation comes after the load, outside the
    total, with its own `wall_s`. `before`: setup's first imports, made and measured by a load process before it
    had `cfg` (`pipeline.startup.start_early`): added to setup's metrics and the total's."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = copy.deepcopy(cfg)
    schema.name_model(cfg)  # with model.path, the record names the checkpoint, not the model YAML
    progress.configure(bool(cfg.get("progress", True)))
    journal = out_dir / "stages.jsonl"
    rec: dict[str, Any] = {"status": "running", "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "stages": []}
    built: dict[str, Any] = {}  # setup's work: the context and the steps to run
    failure: BaseException | None = None
    kind, plan = SETUP, bool(cfg.get("plan", False))  # a config recorded before plan= existed: a load
    with track() as total:
        try:
            record.start_jsonl(journal)
            work = partial(setup, cfg, plan, built, fresh_process)
            run_step(SETUP, "pipeline.runner.setup", work, rec, journal, before=before)
            for kind, target, stage in built["steps"]:
                built["ctx"].facts[kind] = run_step(kind, target, partial(stage, built["ctx"]), rec, journal)
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
    ctx: LoadContext | None = built.get("ctx")
    total = combined(before, total) if before is not None else total
    rec["total"] = total.to_dict() | {"ru_maxrss_mb": round(ru_maxrss_bytes() / 2**20, 1)}
    rec["footprint_bytes"] = ctx.facts.get("postprocess", {}).get("footprint_bytes") if ctx else None
    if plan:
        from pipeline.plan.step import summary  # imported by setup already

        rec["plan"] = summary(ctx.facts["plan"]) if rec["status"] == "planned" else None
    rec["checkpoint"] = ctx.facts.get("config_merge", {}).get("checkpoint") if ctx else None
    rec.update(git=record.git_state(), host=record.host(), config=OmegaConf.to_container(cfg, resolve=True))
    if cfg.model.get("path") and ctx and ctx.facts.get("config_merge", {}).get("architecture"):
        rec["config"]["model"]["architecture"] = ctx.facts["config_merge"]["architecture"]  # what was built
    rec["versions"] = ctx.facts.get("env_check", {}).get("versions") if ctx else None
    if cachelock.events():  # what this load built in the shared cache, or waited for another job to build
        rec["cache"] = cachelock.events()
    rec.update(extra or {})
    try:
        record.write_json_atomic(out_dir / "run.json", rec)
    except record.RecordError as err:
        failure = record.RecordError(err.path, err.error, note=_ending(rec))
    if verbose:
        print(record.format_table(rec["stages"], rec["total"]))
        if rec["status"] == "planned":
            from pipeline.plan.describe import describe

            print(describe(ctx.facts["plan"]))
    if isinstance(failure, record.RecordError):
        raise failure
    if rec["status"] == "interrupted":
        raise KeyboardInterrupt
    if rec["status"] not in ("ok", "planned"):
        raise StageError(rec["failed_stage"], failure)
    if rec["status"] == "ok" and cfg.get("prompt"):
        generate_into(rec, ctx.model, cfg, out_dir / "run.json", verbose)
    return (None if plan else ctx.model), rec


def setup(cfg: DictConfig, plan: bool, built: dict[str, Any], fresh_process: bool = False) -> dict[str, Any]:
    """The run's context and its steps, into `built`: the config checked (untrusted: only this project's
    components, nothing to call; then the schemas' cross-field checks), every stage built, a plan's too (the
    plan's process then imports what the load's would). torch and the libraries a load needs (transformers,
    accelerate, bitsandbytes) are imported here, not with this module, so that their time is in the run's
    setup and not before the run. In a `fresh_process`, the libraries this load does not use are hidden first
    and the imports run without the cyclic collector (`pipeline/startup.py`); the facts name what was hidden."""
    guard.check(cfg)
    hidden: list[str] = []
    with startup.imports_uncollected() if fresh_process else nullcontext():
        if fresh_process:
            hidden = startup.hide_unused(startup.load_backend(cfg))
        with startup.import_structure_cache() if fresh_process else nullcontext():
            from pipeline.plan.step import PLAN_KINDS, Plan

        ctx = LoadContext(cfg=OmegaConf.to_object(cfg))
        stages = {kind: build_stage(kind, cfg.stages[kind]) for kind in STAGE_KINDS}
    steps = [(k, cfg.stages[k]._target_, stages[k]) for k in (PLAN_KINDS if plan else STAGE_KINDS)]
    steps += [("plan", "pipeline.plan.step.Plan", Plan(stages["stream"]))] if plan else []
    built.update(ctx=ctx, steps=steps)
    return {"hidden_libraries": hidden} if fresh_process else {}


def run_step(
    kind: str, target: str, work: Callable[[], dict | None], rec: dict, journal: Path, before: Metrics | None = None
) -> dict:
    """Run one step (a stage, or the runner's setup), measured (with `before`, a part of it done and measured
    earlier, see `run`), and return its facts; when it ends, ok or failed, its entry goes to `rec` and a line to
    the journal. An interrupted step did not end: it gets neither. If its line cannot be written the run stops
    there with the RecordError, unless the step itself failed: that failure stays the run's error."""
    entry: dict[str, Any] = {"stage": kind, "target": target, "status": "failed"}
    facts, failure = {}, None
    with track() as m:
        try:
            facts = work() or {}
            entry["status"] = "ok"
        except Exception as err:
            failure = err
    entry.update(metrics=(combined(before, m) if before is not None else m).to_dict(), facts=facts)
    rec["stages"].append(entry)
    try:
        record.append_jsonl(journal, entry)
    except record.RecordError as err:
        if failure is None:
            raise
        rec["record_error"] = str(err)
    if failure is not None:
        raise failure
    return facts


def generate_into(rec: dict, model: Any, cfg: DictConfig, path: Path, verbose: bool) -> None:
    """Generate from `cfg.prompt` after the load and rewrite `path` (run.json) with `rec["generation"]`:
    the output or the error, and its wall time. Raises GenerationError or KeyboardInterrupt after recording."""
    from pipeline.quality.generate import generate

    gen: dict[str, Any] = {"prompt": cfg.prompt, "max_new_tokens": cfg.max_new_tokens}
    t0 = time.perf_counter()
    interrupted = False
    try:
        gen["output"] = generate(model, cfg.prompt, cfg.max_new_tokens)
    except KeyboardInterrupt:
        gen["error"], interrupted = "interrupted", True
    except Exception as err:  # the load is recorded as it went; the generation's failure is recorded with it
        gen["error"] = f"{type(err).__name__}: {err}"
    gen["wall_s"] = round(time.perf_counter() - t0, 4)
    gen["rss_anon_end_mb"] = rss_anon_mb()  # a mapped weight is read on first use: what the forward pass made private
    rec["generation"] = gen
    if verbose and "output" in gen:
        print(gen["output"])
    record.write_json_atomic(path, rec)
    if interrupted:
        raise KeyboardInterrupt
    if "error" in gen:
        raise GenerationError(f"loaded, but generating from the prompt failed: {gen['error']}")


def _ending(rec: dict) -> str:
    """How the run had ended, for a RecordError about its run.json."""
    if rec["status"] in ("ok", "planned"):
        return f"the run itself ended {rec['status']}"
    if rec["status"] == "interrupted":
        return f"the run had been interrupted in stage {rec['failed_stage']}"
    if rec["error"].startswith("RecordError: "):
        return f"the run had stopped at stage {rec['failed_stage']}: {rec['error'].removeprefix('RecordError: ')}"
    return f"the run had failed: stage {rec['failed_stage']} failed: {rec['error']}"
