"""A Ctrl-C in the CLI's own process, remembered even where a library swallows it.

Python turns Ctrl-C (SIGINT) into a KeyboardInterrupt raised wherever the process happens to be, and the libraries
the CLI runs before its load do not all let it through: an interrupt inside Hydra's composition can come out as
another error (Hydra reads each config file in a `try`/`finally` that fails on its own when the interrupt came
before the file was open) that Hydra's first, mode-finding composition answers with "no mode", or an interrupt can
be dropped inside a type check omegaconf makes. The CLI then went on and loaded the model, exit status 0, after
the user had pressed Ctrl-C. So the CLI's handler raises the KeyboardInterrupt as Python's own does and also
remembers it, and the CLI (`pipeline.cli`, `pipeline.replay`) calls `exit_if_seen()` before it starts a load.
"""

from __future__ import annotations

import signal
import sys
from typing import Any, NoReturn

_seen = False


def remember() -> None:
    """From now on, a Ctrl-C raises KeyboardInterrupt as before and is remembered. Nothing changes where SIGINT
    is not Python's default (ignored, as in a job started in the background by a non-interactive shell)."""
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _on_ctrl_c)


def _on_ctrl_c(signum: int, frame: Any) -> None:
    global _seen
    _seen = True
    raise KeyboardInterrupt


def seen() -> bool:
    """Whether this process got a Ctrl-C since `remember()`, whatever became of its KeyboardInterrupt."""
    return _seen


def exit_if_seen() -> None:
    """`exit_interrupted()` if this process got a Ctrl-C."""
    if _seen:
        exit_interrupted()


def exit_interrupted() -> NoReturn:
    """Exit 130 (128 + SIGINT, as a shell reports Ctrl-C), saying so."""
    print("\nerror: interrupted (Ctrl-C)", file=sys.stderr)
    sys.exit(128 + signal.SIGINT)
