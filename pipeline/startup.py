"""A faster start for a process that exists for one load alone (`pipeline.isolate`'s load process).

Each step changes the whole interpreter, so each is taken only in a process of the load's own: the first three by
`pipeline.runner.setup` when told so (`fresh_process=True`), the last by `pipeline.isolate`'s load process;
never in a caller's process (`pipeline.load()` without `isolate`).

- The quantization libraries this load does not use are hidden from transformers. transformers imports
  torchao (`quantizers/quantizer_torchao.py`) and hqq (`cache_utils.py`) at its own import whenever they are
  installed: on the 2-core machine ~0.6 s of CPU for torchao and ~1 s for hqq. A `None` in `sys.modules` is
  Python's own "not importable": `importlib.util.find_spec` answers None, so transformers' `is_*_available()`
  says False, and anything that still imported one would fail loudly (ImportError), never silently differ.
  Package versions in the record come from the installed metadata, which this does not touch.
- transformers' table of what its ~560 model packages export is read from the model files, by
  `create_import_structure_from_path` (transformers/utils/import_utils.py), twice per process: once for the
  package (`transformers/__init__.py`) and once for `transformers.models`. The function caches its answers, but
  in an `lru_cache` of 128 entries, fewer than the folders, so the second pass reads every file again (~0.3 s
  on the 2-core machine). `whole_import_structure_cache` gives it a cache with room for every folder as the
  module is imported: the same function, the same answers, the second pass from the cache. Where transformers
  names or wraps the function otherwise, nothing is changed.
- The cyclic garbage collector is paused while setup imports torch, transformers and the rest (~400k objects
  and no garbage worth a pass: its passes cost ~20% of the import time), and what was imported is then frozen
  (`gc.freeze`), so that later passes skip it. Reference counting still frees every tensor as before: only
  cycles wait for a pass, and the pause ends with setup, before any weight is read.
- The process ends without the interpreter's teardown (`exit_without_teardown`): freeing torch, transformers
  and the model object by object took 2-3 s unfrozen and still 0.2-0.6 s frozen, for memory the OS takes
  back at once. The exit handlers still run first, as at a normal exit (logging's flush, inductor's compile
  workers, temporary folders, multiprocessing's own), and the streams are flushed.

And the CLI starts its load process first (`start_early`), before it imports Hydra and composes the config
(~0.6 s: the command line checked, then Hydra's own composes and the job's folder): meanwhile the load process
imports torch (~0.9 s), the part of setup that is the same for every load. It then waits for the config and
the load runs as before. What it did before the config came is measured as setup measures its imports, and added
to setup's and the total's wall and CPU time (`pipeline.runner.run`'s `before`); the wait is not, and the record
says both (`process.imported_before_config`). The early process is used only by the CLI's own first load, and
only if nothing it inherited has changed since (the environment, which `hydra.job.env_set` changes, and the
working folder): else it is ended, as it is when the CLI ends without a load (an error, --help, Ctrl-C), and
the load is spawned as before. A sweep (`-m`) and any other command line with an option spawn as before.
"""

from __future__ import annotations

import atexit
import functools
import gc
import importlib.abc
import os
import resource
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple, NoReturn

# a caller whose peak RSS is below this spawns the load directly (pipeline/isolate.py says why): well under the
# ~220 MB that importing torch alone takes a process to, and well over the CLI's own ~35 MB
DIRECT_BELOW_MB = 150.0
EARLY_IMPORTS = ("torch",)  # what every load's setup imports first, whatever its config: see start_early

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


IMPORT_UTILS = "transformers.utils.import_utils"


class _AfterImport(importlib.abc.MetaPathFinder):
    """Calls `then(module)` once module `name` has run, before anything else uses it."""

    def __init__(self, name: str, then: Any) -> None:
        self.name, self.then = name, then

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != self.name:
            return None
        for finder in sys.meta_path:
            spec = (
                finder.find_spec(fullname, path, target)
                if finder is not self and hasattr(finder, "find_spec")
                else None
            )
            if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
                run = spec.loader.exec_module

                def exec_module(module: Any, run: Any = run) -> None:
                    run(module)
                    self.then(module)

                spec.loader.exec_module = exec_module  # this module's own loader object
                return spec
        return None


def _whole_cache(module: Any) -> None:
    fn = getattr(module, "create_import_structure_from_path", None)
    if fn is not None and hasattr(fn, "cache_info") and hasattr(fn, "__wrapped__"):
        module.create_import_structure_from_path = functools.lru_cache(maxsize=None)(fn.__wrapped__)


@contextmanager
def whole_import_structure_cache() -> Iterator[None]:
    """transformers' import-structure function with a cache for every model folder while transformers is first
    imported in the block (see the module docstring); nothing when it was imported before."""
    if IMPORT_UTILS in sys.modules:
        yield
        return
    finder = _AfterImport(IMPORT_UTILS, _whole_cache)
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        if finder in sys.meta_path:
            sys.meta_path.remove(finder)


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


def maxrss_mb() -> float:
    """This process's peak RSS so far (MB), as the kernel keeps it."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


class _Early(NamedTuple):
    process: Any  # multiprocessing's Process
    writer: Any  # the pipe's end the load's payload goes through
    pid: int  # what it inherited, to compare when a load would use it
    cwd: str
    env: dict[str, str]


_early: _Early | None = None


def start_early(argv: list[str]) -> None:
    """Start the load process now, for the CLI's load (see the module docstring), when `argv` has no option
    (a sweep, --help, --cfg, ...: those spawn as before) and this process is small enough to spawn the load
    directly (`DIRECT_BELOW_MB`)."""
    global _early
    if _early is not None or any(arg.startswith("-") for arg in argv) or maxrss_mb() >= DIRECT_BELOW_MB:
        return
    import multiprocessing

    spawn = multiprocessing.get_context("spawn")
    reader, writer = spawn.Pipe(duplex=False)
    process = spawn.Process(target=_early_load, args=(reader,), name="qload-load")
    inherited = os.getpid(), os.getcwd(), dict(os.environ)
    # registered before multiprocessing's own exit handler, which would wait for the process, and told of the
    # process as soon as it starts: a SIGINT to the CLI alone in between left the CLI waiting for it at exit
    atexit.register(discard_early)
    process.start()
    _early = _Early(process, writer, *inherited)
    reader.close()


def take_early(payload: bytes) -> Any | None:
    """The early load process, now given `payload` to load, if this process started one that this load may use
    (see the module docstring); else None, and the early process, if any, is ended."""
    global _early
    early, _early = _early, None
    if early is None:
        return None
    if early.pid != os.getpid():  # a copy of the CLI's process (a fork): the early process is not its child
        return None
    if early.cwd != os.getcwd() or early.env != dict(os.environ) or not early.process.is_alive():
        _end(early)
        return None
    try:
        early.writer.send_bytes(payload)
    except OSError:  # it ended meanwhile
        _end(early)
        return None
    early.writer.close()
    return early.process


def discard_early() -> None:
    """End the early load process if no load took it (the CLI ends, or runs its jobs elsewhere)."""
    global _early
    early, _early = _early, None
    if early is not None and early.pid == os.getpid():
        _end(early)


def _end(early: _Early) -> None:
    early.writer.close()
    early.process.kill()  # it is importing torch, or waiting: nothing of it to keep
    early.process.join()


def _early_load(reader: Any) -> None:
    """The early load process: what every load's setup imports first, measured as setup measures it, then the
    load itself once the CLI sends its payload; ends quietly if the CLI ends without one."""
    at_start = maxrss_mb()
    try:
        from pipeline.core import noise
        from pipeline.core.measure import track
        from pipeline.isolate import load_process

        noise.quiet()  # before torch is imported, as in any load process
        with track() as imported, imports_uncollected():
            for name in EARLY_IMPORTS:
                try:
                    __import__(name)
                except Exception:  # setup imports it again, and records why it fails
                    pass
        waiting = time.perf_counter()
        payload = reader.recv_bytes()
    except EOFError:  # the CLI ended without a load for it
        exit_without_teardown(0)
    except KeyboardInterrupt:  # Ctrl-C before any config: the CLI ends, or writes the record (interrupted in setup)
        exit_without_teardown(128 + signal.SIGINT)
    waited_s = round(time.perf_counter() - waiting, 4)
    load_process(payload, at_start, {"modules": list(EARLY_IMPORTS), "metrics": imported, "waited_s": waited_s})
