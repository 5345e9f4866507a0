"""A faster start for a process that exists for one load alone (`pipeline.isolate`'s load process).

Each step changes the whole interpreter, so each is taken only in a process of the load's own: the first three by
`pipeline.runner.setup` when told so (`fresh_process=True`), the last by `pipeline.isolate`'s load process;
never in a caller's process (`pipeline.load()` without `isolate`).

- The quantization libraries this load does not use are hidden from transformers. transformers imports
  torchao (`quantizers/quantizer_torchao.py`) and hqq (`cache_utils.py`) at its own import whenever they are
  installed: on the 2-core machine ~0.6 s of CPU for torchao and ~1 s for hqq. A `None` in `sys.modules` is
  Python's own "not importable": `importlib.util.find_spec` answers None, so transformers' `is_*_available()`
  says False, and anything that still imported one would fail loudly (ImportError), never silently differ.
  With quant=none the checkpoint's own config.json decides (`load_backend`): an unquantized one needs neither.
  Package versions in the record come from the installed metadata, which this does not touch.
- transformers' table of what its ~560 model packages export is read from the model files (~1700 of them), by
  `create_import_structure_from_path` (transformers/utils/import_utils.py), a pure function of the files' names
  and contents: ~0.25 s on the 2-core machine for the first pass (`transformers/__init__.py`), and as much again
  for the second (`transformers.models`), whose folders no longer fit the function's `lru_cache` of 128.
  `import_structure_cache` answers it from a stored copy instead (`$XDG_CACHE_HOME/qload/import-structure`, one
  file per transformers install, written by the first process that reads the files): valid while every file of
  the tree has the same name, size and modification time as when it was stored, and transformers' own
  `import_utils.py` too (the rule Python's own bytecode cache uses; ~12 ms of `stat`s). It is `marshal` data
  (dicts, sets and strings: nothing in it can run). Later calls for the tree or a folder in it (each model
  package's `__init__.py` asks for its own) come from the same copy. Anything unreadable, or a function that
  transformers names or wraps otherwise, and transformers' own walk runs as before.
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
import gc
import hashlib
import importlib.abc
import json
import marshal
import os
import resource
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

# a caller whose peak RSS is below this spawns the load directly (pipeline/isolate.py says why): well under the
# ~220 MB that importing torch alone takes a process to, and well over the CLI's own ~35 MB
DIRECT_BELOW_MB = 150.0
EARLY_IMPORTS = ("torch",)  # what every load's setup imports first, whatever its config: see start_early

# the backend of the load (`load_backend`) -> the libraries transformers would import at its own import that
# this load does not use. hqq hides nothing, since its own modules use torchao where it is installed; a backend
# not listed here hides nothing either, nor does quant=none of a checkpoint whose saved method is unknown here.
UNUSED = {
    "bnb": ("torchao", "hqq"),
    "quanto": ("torchao", "hqq"),
    "torchao": ("hqq",),
    "unquantized": ("torchao", "hqq"),  # quant=none of a checkpoint saved without quantization_config
}
# a saved quantization_config's quant_method (its start) -> our backend that reads it (the backends' own
# `saved_methods`; tests/test_startup.py checks that they agree): a quant=none load of it uses that backend
SAVED = {"bitsandbytes": "bnb", "torchao": "torchao", "quanto": "quanto", "hqq": "hqq"}


def hide_unused(backend: str) -> list[str]:
    """Make the libraries a `backend` load does not use unimportable in this process; returns their names
    (those already imported stay as they are)."""
    hidden = []
    for name in UNUSED.get(backend, ()):
        if name not in sys.modules:
            sys.modules[name] = None  # type: ignore[assignment]
            hidden.append(name)
    return hidden


def load_backend(cfg: Any) -> str:
    """UNUSED's key for this load: `quant.backend`, or with quant=none the backend of what the checkpoint saved:
    "unquantized" where its config.json has no quantization_config, "none" (hide nothing) where it is another
    method's, or the checkpoint is not on this machine yet, or it cannot be read (config_merge then says why).
    Reads one config.json at most, and imports nothing that imports transformers."""
    backend = str(getattr(cfg.quant.backend, "value", cfg.quant.backend))
    if backend != "none":
        return backend
    model = cfg.model
    if not model.path and str(getattr(model.source, "value", model.source)) in ("synthetic", "package"):
        # written by pipeline/checkpoints from the architecture (a dense GGUF conversion for package): no
        # quantization_config unless the architecture itself names one
        return "none" if "quantization_config" in (model.get("architecture") or {}) else "unquantized"
    try:
        if model.path:
            config = Path(model.path).expanduser() / "config.json"
        else:
            from huggingface_hub import try_to_load_from_cache  # the local hub cache only, never the network

            found = try_to_load_from_cache(model.hub_id, "config.json", revision=model.get("revision"))
            if not isinstance(found, str):
                return "none"
            config = Path(found)
        saved = json.loads(config.read_text()).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        return "none"
    if saved is None:
        return "unquantized"
    method = str(saved.get("quant_method", "")) if isinstance(saved, dict) else ""
    return next((ours for prefix, ours in SAVED.items() if method.startswith(prefix)), "none")


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


class _ImportStructure:
    """transformers' `create_import_structure_from_path` (`fn`), each tree stored whole (see the module docstring)."""

    def __init__(self, fn: Any, code: str) -> None:
        self.fn, self.code = fn, code
        self.trees: dict[str, dict] = {}  # folder -> the function's answer for it, this process
        self.walking = False  # inside `fn`'s own walk, which calls the function again for each sub-folder

    def __call__(self, module_path: str | os.PathLike) -> dict:
        if self.walking:
            return self.fn(module_path)
        folder = os.path.abspath(module_path)  # transformers passes a str or a Path, a folder or a file in it
        folder = os.path.dirname(folder) if os.path.isfile(folder) else folder
        tree = self.within(folder)
        if tree is None:
            tree = self.trees[folder] = self.stored(folder)
        return dict(tree)  # a fresh outer dict, as each call of the function returns

    def within(self, folder: str) -> dict | None:
        """The answer for `folder` out of a tree already read, if it lies in one (a folder's answer holds each of
        its sub-folders' under the sub-folder's name)."""
        for root, tree in self.trees.items():
            rel = os.path.relpath(folder, root)
            if rel == "." or not rel.startswith(".."):
                for part in [] if rel == "." else rel.split(os.sep):
                    tree = tree.get(part) if isinstance(tree, dict) else None
                return tree if isinstance(tree, dict) else None
        return None

    def stored(self, folder: str) -> dict:
        try:
            key = _files_key([self.code], folder)
        except OSError:  # a file gone or unreadable: transformers' walk says what
            return self.walk(folder)
        path = _cache_dir() / (hashlib.sha256(folder.encode()).hexdigest()[:16] + ".marshal")
        try:
            saved_key, tree = marshal.loads(path.read_bytes())
            if saved_key == key and isinstance(tree, dict):
                return tree
        except (OSError, EOFError, ValueError, TypeError):
            pass
        tree = self.walk(folder)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f".{path.name}.{os.getpid()}")
            partial.write_bytes(marshal.dumps((key, tree)))
            os.replace(partial, path)  # readers see the old file or the whole new one
        except (OSError, ValueError):  # a read-only home, or something marshal cannot hold: just not stored
            pass
        return tree

    def walk(self, folder: str) -> dict:
        self.walking = True
        try:
            return self.fn(folder)
        finally:
            self.walking = False


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qload" / "import-structure"


def _files_key(files: list[str], folder: str) -> str:
    """A hash of the name, size and modification time of `files` and of every file under `folder` (less
    `__pycache__`), and of this Python's version (marshal's format)."""
    lines = [f"{sys.version_info[:2]} {marshal.version}"]
    lines += [f"{f} {os.stat(f).st_size} {os.stat(f).st_mtime_ns}" for f in files]

    def walk(path: str) -> None:
        with os.scandir(path) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                if entry.name == "__pycache__":
                    continue
                if entry.is_dir():
                    lines.append(f"{entry.name}/")
                    walk(entry.path)
                    lines.append("..")
                else:
                    stat = entry.stat()
                    lines.append(f"{entry.name} {stat.st_size} {stat.st_mtime_ns}")

    walk(folder)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _cache_import_structure(module: Any) -> None:
    fn = getattr(module, "create_import_structure_from_path", None)
    if fn is not None and hasattr(fn, "cache_info") and hasattr(fn, "__wrapped__"):
        module.create_import_structure_from_path = _ImportStructure(fn.__wrapped__, module.__file__)


@contextmanager
def import_structure_cache() -> Iterator[None]:
    """transformers' import-structure function answered from its stored copy while transformers is first
    imported in the block (see the module docstring); nothing when it was imported before."""
    if IMPORT_UTILS in sys.modules:
        yield
        return
    finder = _AfterImport(IMPORT_UTILS, _cache_import_structure)
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
