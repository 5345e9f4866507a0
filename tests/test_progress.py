"""Progress on long steps: a bar in a terminal, periodic lines in a log, nothing with progress=false."""

from __future__ import annotations

import io

import pytest

from pipeline.checkpoints import synthetic
from pipeline.cli import job_line
from pipeline.core import progress
from tests import helpers

ARCH = {**helpers.ARCH, "max_position_embeddings": 128}
SYN = {"seed": 0, "dtype": "fp16", "shard_size": "40KB", "init_std": 0.02}


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _progress_on(monkeypatch):
    monkeypatch.setattr(progress, "_enabled", True)
    monkeypatch.setenv("QLOAD_PROGRESS", "1")


def test_a_terminal_gets_a_tqdm_bar(monkeypatch):
    monkeypatch.setattr(progress, "QUIET_S", 0.0)
    out = Terminal()
    with progress.Bar(1000, "Building", stream=out) as bar:
        assert bar.is_bar
        bar.update(500)
        bar.update(500)
    assert "Building" in out.getvalue() and "100%" in out.getvalue() and "\r" in out.getvalue()


def test_a_log_gets_plain_periodic_lines(monkeypatch):
    monkeypatch.setattr(progress, "INTERVAL_S", 0.0)
    out = io.StringIO()
    with progress.Bar(2_000_000, "Building", stream=out) as bar:
        assert not bar.is_bar
        bar.update(1_000_000)
        bar.update(1_000_000)
    lines = out.getvalue().splitlines()
    assert lines[0] == "Building: 1.0 MB of 2.0 MB (50%)"
    assert lines[-1].startswith("Building: 2.0 MB in ") and "\r" not in out.getvalue()


def test_lines_wait_for_the_interval(monkeypatch):
    out = io.StringIO()
    with progress.Bar(100, "Quick", stream=out) as bar:
        for _ in range(100):
            bar.update(1)
    assert out.getvalue() == ""  # done within QUIET_S: nothing to say
    monkeypatch.setattr(progress, "QUIET_S", 0.0)
    with progress.Bar(100, "Slow", stream=out) as bar:
        for _ in range(100):
            bar.update(1)
    assert out.getvalue().startswith("Slow: 100 B in ") and len(out.getvalue().splitlines()) == 1


def test_a_step_without_a_fraction_says_how_long_it_took():
    out = io.StringIO()
    with progress.step("Compiling the kernel", stream=out):
        pass
    first, last = out.getvalue().splitlines()
    assert first == "Compiling the kernel ..." and last.startswith("Compiling the kernel: done in ")


def test_progress_false_turns_everything_off(monkeypatch):
    progress.configure(False)
    try:
        out, tty = io.StringIO(), Terminal()
        with progress.Bar(10, "A", stream=out) as bar, progress.Bar(10, "B", stream=tty):
            bar.update(10)
        with progress.step("C", stream=out):
            pass
        assert out.getvalue() == tty.getvalue() == ""
        import os

        assert os.environ["QLOAD_PROGRESS"] == "0"  # the verify reference's child process inherits it
    finally:
        progress.configure(True)


def test_synthetic_build_reports_bytes_written(tmp_path, monkeypatch, capsys):
    """The 7B build's hook on a small architecture: a bar in a terminal with every byte counted."""
    bars = []
    real = progress.Bar

    def spy(*args, **kwargs):
        bars.append(real(*args, **kwargs))
        return bars[-1]

    monkeypatch.setattr(progress, "Bar", spy)
    monkeypatch.setattr("sys.stderr", Terminal())
    path = synthetic.materialize("tiny", ARCH, SYN, tmp_path)
    (bar,) = bars
    assert bar.is_bar and bar.desc == "Building synthetic tiny checkpoint"
    assert (
        bar.done
        == bar.total
        == sum(f.stat().st_size for f in path.glob("*.safetensors"))
        - sum(8 + int.from_bytes(f.read_bytes()[:8], "little") for f in path.glob("*.safetensors"))
    )


def test_synthetic_build_prints_lines_in_a_log(tmp_path, monkeypatch):
    monkeypatch.setattr(progress, "INTERVAL_S", 0.0)
    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    synthetic.materialize("tiny", ARCH, SYN, tmp_path)
    lines = err.getvalue().splitlines()
    assert lines[0].startswith("Building synthetic tiny checkpoint: ") and lines[0].endswith("%)")
    assert len(lines) > 3 and " in " in lines[-1]


def test_a_sweep_prints_one_line_per_job():
    rec = {
        "status": "ok",
        "stages": [
            {"stage": "stream", "metrics": {"wall_s": 1.25, "rss_peak_mb": 450.2}},
            {"stage": "verify", "metrics": {"wall_s": 9.0, "rss_peak_mb": 900.0}},
        ],
    }
    assert job_line(2, ["quant=int8"], rec) == "job 2 (quant=int8): ok, load 1.2 s, peak 900 MB"


def test_a_pseudo_terminal_shows_the_build_as_a_bar(tmp_path):
    """The synthetic build in a real pseudo-terminal (sized: tqdm draws nothing in a 0-column one)."""
    import fcntl
    import os
    import pty
    import struct
    import sys
    import termios

    from tests.helpers import REPO

    code = (
        "from pipeline.core import progress; progress.QUIET_S = 0.0\n"
        "from pipeline.checkpoints import synthetic\n"
        f"synthetic.materialize('tiny', {ARCH!r}, {SYN!r}, {str(tmp_path)!r})\n"
    )
    pid, fd = pty.fork()
    if pid == 0:  # the child: a fresh interpreter on the pty
        fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # before the child can draw
        os.environ["PYTHONPATH"] = str(REPO)
        os.execv(sys.executable, [sys.executable, "-c", code])
    out = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # the child closed the pty
            break
        if not chunk:
            break
        out += chunk
    _, status = os.waitpid(pid, 0)
    text = out.decode(errors="replace")
    assert os.waitstatus_to_exitcode(status) == 0, text
    assert "Building synthetic tiny checkpoint: 100%|" in text and "\r" in text, text
