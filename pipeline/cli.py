"""What `python -m pipeline` does (pipeline/__main__.py runs it): check the command line, then run each job's
load in a fresh process and report how it ended.

It lives here, not in __main__.py, because multiprocessing's spawn starts the load process by importing the main
module again (as `__mp_main__`): __main__.py does its work only under its `__name__ == "__main__"` guard, so
that import costs the load nothing (no Hydra, no schema registration before torch is even imported).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from pipeline import check_conf_dir, cluster, ctrl_c, guard
from pipeline.core import schema
from pipeline.isolate import EXIT_INTERRUPTED, run_isolated


class JobFailed(CompactHydraException):
    """A sweep job's load failed. Raised rather than `sys.exit`: Hydra's launchers record an exception as
    the job's failure and run the other jobs, then exit non-zero; a SystemExit would end the whole sweep."""


def run_main(main: Callable[[], None]) -> None:
    """The command line checked (check_command_line), then Hydra's `main`; exit 130 if a Ctrl-C came meanwhile,
    whatever a library made of its KeyboardInterrupt (pipeline/ctrl_c.py): an error of its own (Hydra's exit 1),
    nothing at all, or the KeyboardInterrupt itself, which would end the CLI with a traceback."""
    try:
        check_command_line()
        main()
    except SystemExit as exit:
        if exit.code == EXIT_INTERRUPTED or not ctrl_c.seen():
            raise
    except KeyboardInterrupt:
        pass
    else:
        if not ctrl_c.seen():
            return
    ctrl_c.exit_interrupted()


def check_command_line() -> None:
    """Register the schemas and check the configs' folder and the command line before Hydra builds its
    launcher, sweeper, callbacks or logging from the config; exit 1 with the reason if either is wrong (130 if a
    Ctrl-C came meanwhile)."""
    schema.register()
    try:
        check_conf_dir()
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    try:
        guard.check_argv(sys.argv[1:])
    except guard.UntrustedConfig as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except Exception:  # a config Hydra cannot compose: let Hydra say why, as it does without this check
        pass
    ctrl_c.exit_if_seen()


def run_job(cfg: DictConfig) -> None:
    """One job (the run, or one job of a `-m` sweep): its load in a fresh process, then the record's path, the
    sweep's line, or the error with its exit status (a sweep's failed job raises JobFailed, see there). No load
    starts after a Ctrl-C, even one a library swallowed while Hydra composed (exit 130)."""
    ctrl_c.exit_if_seen()
    hydra_cfg = HydraConfig.get()
    out_dir = Path(hydra_cfg.runtime.output_dir)
    job_logging = OmegaConf.to_container(hydra_cfg.job_logging, resolve=True) if hydra_cfg.job_logging else None
    outcome = run_isolated(cfg, out_dir, job_logging=job_logging, extra=cluster.job_facts())
    where = f"record: {out_dir / 'run.json'}" if outcome.written else f"record: not written ({out_dir / 'run.json'})"
    if hydra_cfg.mode == RunMode.MULTIRUN and cfg.get("progress", True):
        print(job_line(hydra_cfg.job.num, hydra_cfg.overrides.task, outcome.record), flush=True)
    if outcome.ok:
        print(where)
        return
    if hydra_cfg.mode != RunMode.MULTIRUN or outcome.exit_status == EXIT_INTERRUPTED:  # Ctrl-C ends a sweep too
        print(f"\nerror: {outcome.message}\n{where}", file=sys.stderr)
        sys.exit(outcome.exit_status)
    job = f"job {hydra_cfg.job.num} ({' '.join(hydra_cfg.overrides.task)})"
    print(f"\nerror: {job}: {outcome.message}\n{where}", file=sys.stderr)
    raise JobFailed(
        f"error: {job}: {outcome.message}\n{where}\n"
        f"every job of the sweep: python -m pipeline.report {hydra_cfg.sweep.dir}"
    )


def job_line(num: int, overrides: list[str], rec: dict) -> str:
    """One line per finished job of a sweep: its status, load time (every stage but verify) and peak RSS."""
    stages = rec.get("stages") or []
    load_s = sum((s.get("metrics") or {}).get("wall_s") or 0.0 for s in stages if s.get("stage") != "verify")
    peaks = [(s.get("metrics") or {}).get("rss_peak_mb") for s in stages]
    peak = max((p for p in peaks if p is not None), default=None)
    peak_text = f"{peak:.0f} MB" if peak is not None else "-"
    return f"job {num} ({' '.join(overrides)}): {rec.get('status')}, load {load_s:.1f} s, peak {peak_text}"
