"""pipeline/startup.py: the CLI's load process, started before the CLI composes its config."""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.helpers import cli_with_maxrss, start_cli


def gone(group: int, timeout: float = 10) -> bool:
    """Whether every process of a process group has ended (within `timeout`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def test_a_changed_environment_gets_a_load_process_of_its_own(tmp_path, cache_dir):
    """hydra.job.env_set changes the environment after the early process started: it is not used."""
    code, out, record, _ = cli_with_maxrss(tmp_path, cache_dir, "+hydra.job.env_set.QLOAD_SOMETHING=1")
    assert code == 0, out
    assert record["status"] == "ok" and record["process"]["start"] == "spawn"
    assert "imported_before_config" not in record["process"]


@pytest.mark.parametrize("args", [["model=no_such_model"], ["stages.stream.no_such_key=1"]])
def test_a_command_line_that_does_not_compose_leaves_no_process_behind(args):
    proc = start_cli(*args)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    assert gone(proc.pid), "a process of the CLI's group outlived it"


def test_ctrl_c_while_the_cli_composes_leaves_no_process_behind_and_the_load_process_says_nothing():
    proc = start_cli()
    time.sleep(0.5)  # the CLI composes; its early load process imports torch
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal sends Ctrl-C: to every process of the foreground group
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "qload-load" not in err  # no traceback of the load process
    assert gone(proc.pid), "a process of the CLI's group outlived it"
