"""What a run leaves when things go wrong: Ctrl-C or a kill in the middle of streaming, a full disk or no
memory left while the records are written, two runs started at once. Each time: the exit status, the
message, whole records, and the checkpoint untouched."""

from __future__ import annotations

import errno
import json
import os
import pickle
import signal
import subprocess
import threading
import time
import types
from pathlib import Path

import psutil
import pytest
from omegaconf import OmegaConf

from pipeline import compose, isolate
from pipeline.checkpoints import checkpoint
from pipeline.core import record
from pipeline.core.record import RecordError
from pipeline.core.schema import SETUP, STAGE_KINDS
from pipeline.isolate import run_isolated
from pipeline.runner import run
from tests.helpers import file_digests, start_cli

BEFORE_STREAM = [SETUP, *STAGE_KINDS[: STAGE_KINDS.index("stream")]]
DISK_FULL = "[Errno 28] No space left on device; free space or choose another hydra.run.dir"


def locate(cache_dir: Path, *overrides: str) -> Path:
    """The synthetic checkpoint these overrides describe, built in `cache_dir` if it is not there yet."""
    model = OmegaConf.to_object(compose([f"cache_dir={cache_dir}", *overrides])).model
    return checkpoint.locate(model, str(cache_dir))


@pytest.fixture(scope="module")
def tiny_checkpoint(cache_dir) -> tuple[Path, dict[str, str]]:
    path = locate(cache_dir)
    return path, file_digests(path)


def start_run(cache_dir: Path, *overrides: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """The CLI on `cache_dir`, without a progress bar, in a session of its own (tests.helpers.start_cli)."""
    return start_cli(f"cache_dir={cache_dir}", "stages.stream.progress=false", *overrides, env=env)


def wait_for_file(path: Path, running, timeout: float = 120) -> None:
    """Until `path` exists (the run reached its hold point and waits there)."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert running(), f"the run ended before it reached {path.name}"
        assert time.monotonic() < deadline, f"no {path} after {timeout} s"
        time.sleep(0.01)


def wait_for_stage(run_dir: Path, stage: str, running=lambda: True, timeout: float = 120) -> None:
    """Until `stage` has its line in stages.jsonl (the next stage has begun)."""
    lines, deadline = run_dir / "stages.jsonl", time.monotonic() + timeout
    while f'"stage": "{stage}"' not in (lines.read_text() if lines.exists() else ""):
        assert running(), f"the run ended before stage {stage} did"
        assert time.monotonic() < deadline, f"no {stage} line in {lines} after {timeout} s"
        time.sleep(0.01)


def journal(run_dir: Path) -> list[str]:
    """The stages in stages.jsonl, in order; every line must be whole JSON."""
    return [json.loads(line)["stage"] for line in (run_dir / "stages.jsonl").read_text().splitlines()]


def leftovers(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob(".run.json.*"))


def test_ctrl_c_while_streaming_exits_130_with_whole_records_and_the_next_run_works(
    tmp_path, cache_dir, tiny_checkpoint
):
    path, before = tiny_checkpoint
    run_dir, held = tmp_path / "run", tmp_path / "held"
    proc = start_run(cache_dir, f"hydra.run.dir={run_dir}", f"model.path={path}", env={"QLOAD_HOLD": f"stream:{held}"})
    try:
        wait_for_file(held, running=lambda: proc.poll() is None)  # a tensor read, the stream held there
        os.killpg(proc.pid, signal.SIGINT)  # as a terminal sends Ctrl-C: to every process of the foreground group
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "error: interrupted in stage stream" in err
    assert "Traceback" not in err
    assert journal(run_dir) == BEFORE_STREAM  # the stages that finished, and not the one interrupted
    rec = json.loads((run_dir / "run.json").read_text())
    assert rec["status"] == "interrupted" and rec["failed_stage"] == "stream"
    assert [s["stage"] for s in rec["stages"]] == BEFORE_STREAM
    assert rec["process"]["ru_maxrss_at_start_mb"] > 0  # the load process finished its record before exiting
    assert leftovers(run_dir) == []
    assert file_digests(path) == before

    again = start_run(cache_dir, f"hydra.run.dir={tmp_path / 'again'}", f"model.path={path}", "device_map=cpu")
    out, err = again.communicate(timeout=120)
    assert again.returncode == 0, err
    assert json.loads((tmp_path / "again" / "run.json").read_text())["status"] == "ok"
    assert file_digests(path) == before


def _load_process() -> psutil.Process | None:
    """The load: a spawned child of a spawned child of this process."""
    for hop in psutil.Process().children():
        for child in hop.children():
            if any("spawn_main" in part for part in child.cmdline()):
                return child
    return None


def test_a_load_killed_outright_while_streaming_still_gets_a_failed_record(
    tmp_path, cache_dir, tiny_checkpoint, monkeypatch
):
    path, before = tiny_checkpoint
    monkeypatch.setenv("QLOAD_HOLD", f"stream:{tmp_path / 'held'}")  # inherited by the load process
    cfg = compose([f"cache_dir={cache_dir}", "stages.stream.progress=false", f"model.path={path}"])
    result = {}
    waiter = threading.Thread(target=lambda: result.update(outcome=run_isolated(cfg, tmp_path / "run")))
    waiter.start()
    wait_for_file(tmp_path / "held", running=waiter.is_alive)
    load = _load_process()
    assert load is not None
    load.send_signal(signal.SIGKILL)  # as the OOM killer would
    waiter.join(timeout=120)
    outcome = result["outcome"]
    assert outcome.exit_status == 128 + signal.SIGKILL
    rec = json.loads((tmp_path / "run" / "run.json").read_text())
    assert rec == outcome.record
    assert rec["status"] == "failed"
    assert "killed by signal 9 (SIGKILL)" in rec["error"]
    assert [s["stage"] for s in rec["stages"]] == journal(tmp_path / "run") == BEFORE_STREAM
    assert rec["failed_stage"] == "stream"
    assert rec["config"]["cache_dir"] == str(cache_dir)
    assert outcome.message.startswith("stage stream failed: ")
    assert "killed by signal 9" in outcome.message
    assert file_digests(path) == before

    # the next load of the same checkpoint, in this process to save a start (the Ctrl-C test starts the CLI again)
    monkeypatch.delenv("QLOAD_HOLD")
    cfg = compose([f"cache_dir={cache_dir}", "stages.stream.progress=false", f"model.path={path}", "device_map=cpu"])
    model, again = run(cfg, tmp_path / "again")
    assert again["status"] == "ok" and model.is_loaded_in_4bit
    assert file_digests(path) == before


class _DiskFull:
    """Stands in for `os` inside pipeline.core.record: fsync of the files `fails(name, count)` picks raises ENOSPC,
    as a full disk reports it (the data was written, but cannot be kept)."""

    def __init__(self, under: Path, fails) -> None:
        self.under, self.fails, self.count = str(under.resolve()), fails, 0

    def __getattr__(self, name: str):
        return getattr(os, name)

    def fsync(self, fd: int) -> None:
        target = os.readlink(f"/proc/self/fd/{fd}")
        if target.startswith(self.under + os.sep):
            self.count += 1
            if self.fails(Path(target).name, self.count):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        os.fsync(fd)


@pytest.fixture
def earlier(cache_dir, tmp_path) -> tuple[Path, dict[str, bytes]]:
    """A run that finished before the failing one: its records must come out byte for byte the same."""
    run(compose([f"cache_dir={cache_dir}", "stages.stream.progress=false"]), tmp_path / "earlier")
    files = {p.name: p.read_bytes() for p in (tmp_path / "earlier").iterdir()}
    assert set(files) == {"run.json", "stages.jsonl"}
    return tmp_path / "earlier", files


def assert_unchanged(earlier: tuple[Path, dict[str, bytes]]) -> None:
    folder, files = earlier
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == files


def test_a_full_disk_stops_the_run_with_the_file_and_the_os_error(
    monkeypatch, cache_dir, tmp_path, earlier, tiny_checkpoint
):
    path, before = tiny_checkpoint
    full = tmp_path / "full"
    full.mkdir()
    monkeypatch.setattr(record, "os", _DiskFull(full, lambda name, n: True))
    cfg = compose([f"cache_dir={cache_dir}", "stages.stream.progress=false"])
    with pytest.raises(RecordError) as raised:
        run(cfg, full)
    # neither record could be kept: the error names run.json, and why the run had stopped before
    assert str(raised.value) == (
        f"cannot write the run record {full / 'run.json'}: {DISK_FULL} (the run had stopped at stage setup: "
        f"cannot write the run record {full / 'stages.jsonl'}: {DISK_FULL})"
    )
    assert (full / "stages.jsonl").read_bytes() == b""  # the line that could not be kept was cut off again
    assert not (full / "run.json").exists() and leftovers(full) == []
    assert_unchanged(earlier)
    assert file_digests(path) == before


def test_a_journal_line_that_cannot_be_kept_is_recorded_in_run_json(monkeypatch, cache_dir, tmp_path, tiny_checkpoint):
    path, before = tiny_checkpoint
    full = tmp_path / "full"
    full.mkdir()
    fails_at = len(BEFORE_STREAM) + 1  # the stream stage's line
    monkeypatch.setattr(record, "os", _DiskFull(full, lambda name, n: name == "stages.jsonl" and n == fails_at))
    with pytest.raises(RecordError, match=f"^cannot write the run record {full / 'stages.jsonl'}: "):
        run(compose([f"cache_dir={cache_dir}", "stages.stream.progress=false"]), full)
    assert journal(full) == BEFORE_STREAM  # whole lines only: the stream line was cut off again
    rec = json.loads((full / "run.json").read_text())
    assert rec["status"] == "failed" and rec["failed_stage"] == "stream"
    assert rec["error"] == f"RecordError: cannot write the run record {full / 'stages.jsonl'}: {DISK_FULL}"
    assert leftovers(full) == []
    assert file_digests(path) == before


def test_running_out_of_memory_while_writing_run_json_says_so(monkeypatch, cache_dir, tmp_path, earlier):
    def dumps(data, indent=None, **kwargs):
        if indent:  # run.json; stages.jsonl lines are written on one line each
            raise MemoryError
        return json.dumps(data, indent=indent, **kwargs)

    monkeypatch.setattr(record, "json", types.SimpleNamespace(dumps=dumps))
    with pytest.raises(RecordError) as raised:
        run(compose([f"cache_dir={cache_dir}", "stages.stream.progress=false"]), tmp_path / "oom")
    assert str(raised.value) == (
        f"cannot write the run record {tmp_path / 'oom' / 'run.json'}: out of memory (MemoryError); "
        "free memory and run again (the run itself ended ok)"
    )
    assert journal(tmp_path / "oom") == [SETUP, *STAGE_KINDS]
    assert not (tmp_path / "oom" / "run.json").exists() and leftovers(tmp_path / "oom") == []
    assert_unchanged(earlier)


def test_the_load_process_exits_4_and_prints_a_record_it_cannot_write(monkeypatch, cache_dir, tmp_path, capsys):
    full = tmp_path / "full"
    full.mkdir()
    monkeypatch.setattr(record, "os", _DiskFull(full, lambda name, n: True))
    cfg = compose([f"cache_dir={cache_dir}", "stages.stream.progress=false"])
    with pytest.raises(SystemExit) as exited:
        isolate._load(pickle.dumps((cfg, full, None, os.getpid(), {}, True, "spawn")))
    assert exited.value.code == isolate.EXIT_RECORD_FAILED == 4
    assert f"error: cannot write the run record {full / 'run.json'}: {DISK_FULL}" in capsys.readouterr().err
    assert leftovers(full) == []


class _Ended:
    """Stands in for the go-between's process: it ends at once with `exitcode`, having written nothing."""

    exitcode = 0

    def __init__(self, *args, **kwargs) -> None:
        pass

    def start(self) -> None:
        pass

    def join(self) -> None:
        pass


@pytest.mark.parametrize(
    ("exitcode", "why"),
    [
        (
            -signal.SIGKILL,
            "stage setup failed: the load process ended without a record: killed by signal 9 "
            "(SIGKILL) (out of memory?)",
        ),
        (4, "the load process could not write its run record (exit status 4; its error is on stderr)"),
    ],
    ids=["killed", "record-failed"],
)
def test_the_caller_reports_a_crash_record_it_cannot_write_without_raising(
    monkeypatch, cache_dir, tmp_path, earlier, exitcode, why
):
    full = tmp_path / "full"
    full.mkdir()
    monkeypatch.setattr(isolate._SPAWN, "Process", type("Ended", (_Ended,), {"exitcode": exitcode}))
    monkeypatch.setattr(record, "os", _DiskFull(full, lambda name, n: True))
    outcome = run_isolated(compose([f"cache_dir={cache_dir}"]), full)
    assert outcome.exit_status == isolate._exit_status(exitcode) and not outcome.written
    assert outcome.message == f"{why}; cannot write the run record {full / 'run.json'}: {DISK_FULL}"
    assert outcome.record["status"] == "failed"
    assert not (full / "run.json").exists() and leftovers(full) == []
    assert_unchanged(earlier)


def test_a_journal_on_a_full_device_fails_the_cli_with_the_message(tmp_path, cache_dir, earlier, tiny_checkpoint):
    path, before = tiny_checkpoint
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "stages.jsonl").symlink_to("/dev/full")  # every write there fails with ENOSPC, for real
    proc = start_run(cache_dir, f"hydra.run.dir={run_dir}")
    _, err = proc.communicate(timeout=120)
    message = f"cannot write the run record {run_dir / 'stages.jsonl'}: {DISK_FULL}"
    assert proc.returncode == isolate.EXIT_RECORD_FAILED, err
    assert f"error: {message}\nrecord: {run_dir / 'run.json'}" in err
    assert err.count(message) == 1 and "Traceback" not in err
    rec = json.loads((run_dir / "run.json").read_text())
    assert rec["status"] == "failed" and rec["failed_stage"] == "setup"
    assert rec["error"] == f"RecordError: {message}"
    assert leftovers(run_dir) == []
    assert_unchanged(earlier)
    assert file_digests(path) == before


def test_two_runs_started_at_once_get_folders_of_their_own(tmp_path, cache_dir, tiny_checkpoint):
    path, before = tiny_checkpoint
    runs = tmp_path / "runs"
    procs = [start_run(cache_dir, f"hydra.run.dir={runs}/${{now:%H-%M-%S-%f}}") for _ in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    folders = sorted(runs.iterdir())
    assert len(folders) == 2
    records = [json.loads((f / "run.json").read_text()) for f in folders]
    assert all(r["status"] == "ok" for r in records)
    assert len({r["process"]["launcher_pid"] for r in records}) == 2
    assert [journal(f) for f in folders] == [[SETUP, *STAGE_KINDS]] * 2
    assert file_digests(path) == before
