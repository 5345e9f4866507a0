"""Load a Hugging Face causal LM with quantization applied while the weights stream in.

from pipeline import load
model, record = load(["model=tiny_llama", "quant=nf4"])
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

_PACKAGE = Path(__file__).resolve().parent


def _conf_dir() -> Path:
    """The Hydra configs: `pipeline/conf` in an installed package (the wheel maps the repository's conf/ there,
    see setup.py), else conf/ at the top of the checkout this package runs from (also an editable install)."""
    for candidate in (_PACKAGE / "conf", _PACKAGE.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    return _PACKAGE / "conf"  # neither: check_conf_dir() says so, naming both places


CONF_DIR = _conf_dir()


def check_conf_dir() -> None:
    """Raise FileNotFoundError, naming both places looked in, when neither holds the configs."""
    if not (CONF_DIR / "config.yaml").is_file():
        raise FileNotFoundError(
            f"no config.yaml in {_PACKAGE / 'conf'} (an installed package) nor in {_PACKAGE.parent / 'conf'} "
            "(a checkout): reinstall qload, or run from the repository"
        )


def compose(overrides: list[str] | None = None, hydra_config: bool = False):
    """The composed config for these overrides, as `python -m pipeline` would build it (with `hydra_config`,
    Hydra's own node too)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from pipeline.core import schema
    from pipeline.guard import UntrustedConfig
    from pipeline.quant_options import check_overrides

    check_conf_dir()
    problem = check_overrides(list(overrides or []), CONF_DIR / "quant")
    if problem:  # Hydra's own error would list only the top-level quant options
        raise UntrustedConfig(problem)
    schema.register()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides or []), return_hydra_config=hydra_config)


def load(
    overrides: list[str] | None = None,
    run_dir: str | Path | None = None,
    *,
    verbose: bool = False,
    isolate: bool = False,
) -> tuple[Any, dict]:
    """Run the pipeline from Python as `python -m pipeline` runs it, every key included: returns what was
    loaded and the run record, also written to `run_dir` (default `runs/api/<date>/<time>`, in the current
    folder).

    What comes first: the model; with `plan=true` the plan (the plan step's facts, which the CLI prints
    with `pipeline.plan.describe.describe`), no weight read; with `isolate=True` no model, as the load ran
    in a fresh process (`pipeline.isolate`, as the CLI does: its peak memory is its own). With `prompt=`,
    the record's `generation` holds the prompt, the output and its wall time, as in the CLI's run.json.
    Prints nothing unless `verbose`: then the stage table, the plan, the generation, and the stream's
    progress bar (unless `stages.stream.progress` is given).

    Raises: `pipeline.guard.UntrustedConfig` (a ValueError) for a quant option that does not exist, with the
    valid ones; ValueError for Hydra's own keys (`hydra.run.dir=...`: give `run_dir`; sweeps: the CLI's `-m`);
    in this process, `pipeline.runner.StageError` (a stage failed), `pipeline.runner.GenerationError` (the
    prompt's generation failed, after the load), `pipeline.core.record.RecordError` (a record could not be
    written); with `isolate=True`, `pipeline.isolate.LoadFailed` for any of them (with the CLI's message and
    exit status); KeyboardInterrupt in both."""
    from pipeline.core import record

    overrides = list(overrides or [])
    for override in overrides:
        if override.lstrip("+~").startswith(("hydra.", "hydra/")):
            raise ValueError(
                f"{override}: Hydra's own settings apply to `python -m pipeline`, not to load(); "
                "give load(..., run_dir=...) for the run folder, and run sweeps with the CLI's -m"
            )
    if not verbose and not any(o.lstrip("+~").startswith(("progress=", "stages.stream.progress=")) for o in overrides):
        overrides.append("progress=false")  # bars and progress lines would go to the caller's terminal
    cfg = compose(overrides)
    run_dir = Path(run_dir) if run_dir is not None else record.run_folder(Path("runs") / "api")
    if isolate:
        from pipeline.isolate import EXIT_INTERRUPTED, LoadFailed, run_isolated

        outcome = run_isolated(cfg, run_dir, verbose=verbose)
        if outcome.exit_status == EXIT_INTERRUPTED:
            raise KeyboardInterrupt
        if not outcome.ok:
            raise LoadFailed(outcome, run_dir / "run.json")
        loaded, rec = None, outcome.record
    else:
        from pipeline.core import noise

        noise.quiet()  # before torch, transformers and bitsandbytes load: the warnings README lists, filtered
        from pipeline.runner import run

        loaded, rec = run(cfg, run_dir, verbose=verbose)
    if rec["status"] == "planned":
        loaded = next(s["facts"] for s in rec["stages"] if s["stage"] == "plan")
    return loaded, rec
