"""Run one load in a fresh process, so that the memory it records is its own.

Peak RSS only grows inside a process: a second load in the same process would report the first one's peak
(and the allocator's leftovers) as its own. So every load runs in a child process, and the caller (the
Hydra job) only waits for it and reads the record it wrote; if the load is killed outright (the OOM
killer), the caller writes its record from the stages it finished.

A `spawn` child's counter does not start at zero. Linux carries the high-water mark of the memory a process
ran in across exec, and Python spawns with vfork, where that memory is the parent's own: a spawned child's
`ru_maxrss` starts at its parent's peak (measured: 1.5 GB parent, 1.5 GB child at its first line). That
start is harmless while it is below anything the load reaches: the load's setup imports torch, which alone
takes a process past 200 MB, and from there the counter is the load's own. So a small caller (the CLI's
Hydra process, ~35 MB) spawns the load directly, and a caller whose peak is at or above
`startup.DIRECT_BELOW_MB` (a notebook that loaded a model, a test process) spawns a go-between first: it
inherits the caller's mark, but what it runs in is a bare interpreter, and the load it spawns inherits only the
go-between's small mark.
Either way the load records what its counter said when it began, as `process.ru_maxrss_at_start_mb` in
`run.json`, and how it was started (`process.start`). The CLI's own load process is started directly too, only
sooner: before the CLI composes its config (`pipeline.startup.start_early`; `process.imported_before_config`).
"""

from __future__ import annotations

import copy
import json
import multiprocessing
import os
import pickle
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, read_write

from pipeline import startup
from pipeline.core import record, schema

EXIT_OK = 0
EXIT_LOAD_FAILED = 1  # a stage failed; run.json says which and why
EXIT_GENERATION_FAILED = 3  # loaded, then the prompt's generation failed; run.json has `generation.error`
EXIT_RECORD_FAILED = 4  # a run record could not be written (disk full, out of memory); the error names the file
EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports it

_SPAWN = multiprocessing.get_context("spawn")


class LoadFailed(RuntimeError):
    """An isolated load from the Python API (`pipeline.load(..., isolate=True)`) did not end ok: the message
    the CLI prints, with its `exit_status` and the `record` (see Outcome)."""

    def __init__(self, outcome: Outcome, path: Path) -> None:
        where = f"record: {path}" if outcome.written else f"record: not written ({path})"
        super().__init__(f"{outcome.message} (exit status {outcome.exit_status}); {where}")
        self.exit_status, self.record = outcome.exit_status, outcome.record


@dataclass
class Outcome:
    """How an isolated load ended: the load process's exit status, a one-line reason, and run.json (`written`:
    whether it is on disk; a record neither process could write exists only here)."""

    exit_status: int
    message: str
    record: dict[str, Any]
    written: bool = True

    @property
    def ok(self) -> bool:
        return self.exit_status == EXIT_OK


def run_isolated(
    cfg: DictConfig,
    out_dir: Path,
    job_logging: dict | None = None,
    extra: dict[str, Any] | None = None,
    verbose: bool = True,
) -> Outcome:
    """Load the model `cfg` describes in a fresh process (and generate when `cfg.prompt` is set); the
    process writes `run.json` and `stages.jsonl` into `out_dir` and, with `verbose`, prints the stage table
    (and the plan, the generation) as the CLI does. `job_logging` is a `logging.config` dict for the load's
    own logging; `extra` is merged into its run.json (e.g. what a replay replays)."""
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = copy.deepcopy(cfg)
    with read_write(cfg):
        OmegaConf.resolve(cfg)  # env and Hydra interpolations, as this process sees them
    schema.name_model(cfg)  # a crash record too names the checkpoint loaded by path
    path = out_dir / "run.json"
    stale = _identity(path)  # a folder used before: its old record must not pass for this run's
    direct = startup.maxrss_mb() < startup.DIRECT_BELOW_MB
    start = "spawn" if direct else "spawn, via a spawned go-between"
    payload = pickle.dumps((cfg, out_dir, job_logging, os.getpid(), extra or {}, verbose, start))
    hop = startup.take_early(payload) if direct else None  # the CLI's, started before it composed `cfg`
    if hop is None:
        target, name = (_load, "qload-load") if direct else (_go_between, "qload-go-between")
        hop = _SPAWN.Process(target=target, args=(payload,), name=name)
        hop.start()
    interrupted = False
    try:
        hop.join()
    except KeyboardInterrupt:
        interrupted = True
        hop.join()  # the load saw the same Ctrl-C (a terminal's goes to the whole group): let it record that
    status = _exit_status(hop.exitcode)
    if interrupted and status != EXIT_INTERRUPTED:
        raise KeyboardInterrupt  # the load had ended before it saw the Ctrl-C (or never got one): ours to raise
    rec = json.loads(path.read_text()) if path.exists() and _identity(path) != stale else None
    if rec is not None:
        return Outcome(status, _message(status, rec), rec)
    status = status or EXIT_LOAD_FAILED
    rec = _crash_record(cfg, out_dir, f"the load process ended without a record: {_describe(status)}") | (extra or {})
    try:
        record.write_json_atomic(path, rec)
    except record.RecordError as err:
        return Outcome(status, f"{_message(status, rec)}; {err}", rec, written=False)
    return Outcome(status, _message(status, rec), rec)


def _identity(path: Path) -> tuple[int, int] | None:
    """Which file is at `path`: a record written since has another inode (it is renamed into place)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def _exit_status(code: int | None) -> int:
    """A shell-style status: 128+N for a process killed by signal N (also when the go-between passes it on)."""
    if code is None:
        return EXIT_LOAD_FAILED
    return 128 - code if code < 0 else code


def _describe(status: int) -> str:
    if status == EXIT_RECORD_FAILED:
        return f"exit status {status}: it could not write its run record (its error is on stderr)"
    if status > 128 and status != EXIT_INTERRUPTED:
        name = signal.Signals(status - 128).name if status - 128 in signal.valid_signals() else "?"
        hint = " (out of memory?)" if name == "SIGKILL" else ""
        return f"killed by signal {status - 128} ({name}){hint}"
    return f"exit status {status}"


def _message(status: int, rec: dict) -> str:
    if status == EXIT_OK:
        return "ok"
    if status == EXIT_INTERRUPTED:
        return f"interrupted in stage {rec['failed_stage']}" if rec.get("failed_stage") else "interrupted"
    if status == EXIT_RECORD_FAILED:
        error = str(rec.get("error"))  # run.json names the file the load could not write; else its stderr does
        if error.startswith("RecordError: "):
            return error.removeprefix("RecordError: ")
        return f"the load process could not write its run record (exit status {status}; its error is on stderr)"
    if status == EXIT_GENERATION_FAILED:
        return f"loaded, but generating from the prompt failed: {rec.get('generation', {}).get('error')}"
    if rec.get("status") == "failed" and rec.get("failed_stage"):
        return f"stage {rec['failed_stage']} failed: {rec.get('error')}"
    return f"the load process failed: {_describe(status)}"


def _go_between(payload: bytes) -> None:
    """A bare interpreter between the caller and the load; exits with the load's status."""
    load = _SPAWN.Process(target=_load, args=(payload,), name="qload-load")
    load.start()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the load too; it records and exits
    load.join()
    sys.exit(_exit_status(load.exitcode))


def _load(payload: bytes) -> None:
    """The load process (spawned for this load): see load_process."""
    load_process(payload, startup.maxrss_mb())


def load_process(payload: bytes, at_start: float, early: dict[str, Any] | None = None) -> None:
    """The load itself: the runner loads, generates if asked, and writes run.json with this process's facts
    (`at_start`: its peak RSS when it began). `early`: what a load process started before its config did
    meanwhile (`pipeline.startup.start_early`): the `modules` it imported, measured (`metrics`), and how long it
    then `waited_s` for the config."""
    cfg, out_dir, job_logging, launcher_pid, extra, verbose, start = pickle.loads(payload)
    if job_logging:
        import logging.config

        logging.config.dictConfig(job_logging)
    from pipeline.core import noise

    noise.quiet()  # before torch, transformers and bitsandbytes are imported: they warn as they load
    from pipeline.runner import GenerationError, StageError, run  # torch and the rest load in its setup

    process = {"pid": os.getpid(), "launcher_pid": launcher_pid, "start": start, "ru_maxrss_at_start_mb": at_start}
    if os.getppid() != launcher_pid:
        process["go_between_pid"] = os.getppid()
    before = None
    if early is not None:  # in setup's metrics and the total's, as setup would have measured them
        before = early["metrics"]
        process["imported_before_config"] = {
            "modules": early["modules"],
            "wall_s": before.wall_s,
            "cpu_s": before.cpu_s,
            "waited_s": early["waited_s"],
        }
    status = EXIT_OK
    fresh = multiprocessing.parent_process() is not None  # a process of its own, unless a test runs this in its own
    try:
        run(cfg, out_dir, verbose=verbose, extra={"process": process, **extra}, fresh_process=fresh, before=before)
    except StageError:
        status = EXIT_LOAD_FAILED
    except GenerationError:
        status = EXIT_GENERATION_FAILED
    except KeyboardInterrupt:
        status = EXIT_INTERRUPTED
    except record.RecordError as err:
        if err.path == out_dir / "run.json":  # else run.json says it, and the caller prints it from there
            print(f"error: {err}", file=sys.stderr)
        status = EXIT_RECORD_FAILED
    sys.stdout.flush()
    if fresh:
        startup.exit_without_teardown(status)
    sys.exit(status)


def _crash_record(cfg: DictConfig, out_dir: Path, reason: str) -> dict[str, Any]:
    """The run.json the load could not write: every stage it finished (from stages.jsonl) and why it ended."""
    from pipeline.core.schema import SETUP, STAGE_KINDS

    stages = _finished_stages(out_dir / "stages.jsonl")
    done = [s["stage"] for s in stages if s.get("status") == "ok"]
    failed_stage = next((k for k in (SETUP, *STAGE_KINDS) if k not in done), None) or "after the load"
    rec = {
        "status": "failed",
        "failed_stage": failed_stage,
        "error": reason,
        "stages": stages,
        "total": None,
        "footprint_bytes": None,
        "checkpoint": None,
        "git": record.git_state(),
        "host": record.host(),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    return rec


def _finished_stages(path: Path) -> list[dict[str, Any]]:
    """The whole lines of a stages.jsonl (a regular file only: a link to a device such as /dev/full reads
    forever)."""
    try:
        if not path.is_file():
            return []
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    stages = []
    for line in lines:
        try:
            stages.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # an append cut short: the stage's line never finished
    return [s for s in stages if isinstance(s, dict) and "stage" in s]
