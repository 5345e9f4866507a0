"""A faster start for a process that exists for one load alone (`pipeline.isolate`'s load process).

Each step changes the whole interpreter, so each is taken only in a process of the load's own: the first two by
`pipeline.runner.setup` when told so (`fresh_process=True`), the last by `pipeline.isolate`'s load process;
never in a caller's process (`pipeline.load()` without `isolate`).

- The quantization libraries this load does not use are hidden from transformers. transformers imports
  torchao (`quantizers/quantizer_torchao.py`) and hqq (`cache_utils.py`) at its own import whenever they are
  installed: on the 2-core machine ~0.6 s of CPU for torchao and ~1 s for hqq. A `None` in `sys.modules` is
  Python's own "not importable": `importlib.util.find_spec` answers None, so transformers' `is_*_available()`
  says False, and anything that still imported one would fail loudly (ImportError), never silently differ.
  Package versions in the record come from the installed metadata, which this does not touch.
- The cyclic garbage collector is paused while setup imports torch, transformers and the rest (~400k objects
  and no garbage worth a pass: its passes cost ~20% of the import time), and what was imported is then frozen
  (`gc.freeze`), so that later passes skip it. Reference counting still frees every tensor as before: only
  cycles wait for a pass, and the pause ends with setup, before any weight is read.
- The process ends without the interpreter's teardown (`exit_without_teardown`): freeing torch, transformers
  and the model object by object took 2-3 s unfrozen and still 0.2-0.6 s frozen, for memory the OS takes
  back at once. The exit handlers still run first, as at a normal exit (logging's flush, inductor's compile
  workers, temporary folders, multiprocessing's own), and the streams are flushed.
"""

from __future__ import annotations

import atexit
import gc
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

# quant.backend of the load -> the libraries transformers would import at its own import that this load does
# not use. quant=none hides nothing (a checkpoint saved quantized may need any of them), nor does hqq, whose own
# modules use torchao where it is installed; a backend not listed here hides nothing either.
UNUSED = {
    "bnb": ("torchao", "hqq"),
    "quanto": ("torchao", "hqq"),
    "torchao": ("hqq",),
}


def hide_unused(backend: str) -> list[str]:
    """Make the libraries a `backend` load does not use unimportable in this process; returns their names
    (those already imported stay as they are)."""
    hidden = []
    for name in UNUSED.get(backend, ()):
        if name not in sys.modules:
            sys.modules[name] = None  # type: ignore[assignment]
            hidden.append(name)
    return hidden


@contextmanager
def imports_uncollected() -> Iterator[None]:
    """Pause the cyclic collector over a block of imports, then freeze what exists (see the module docstring)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if was_enabled:
            gc.enable()


def exit_without_teardown(status: int) -> NoReturn:
    """End this process with `status` as a normal exit would, less the interpreter's teardown (see above)."""
    atexit._run_exitfuncs()  # what sys.exit would run: the handlers every library registered
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
