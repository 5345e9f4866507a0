"""pipeline/startup.py: the CLI's load process, started before the CLI composes its config."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from pipeline import startup
from tests.helpers import REPO, cli_env, cli_with_maxrss, run_python, start_cli


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


# `python -m pipeline` with one library function patched to take a Ctrl-C while it runs and not let its
# KeyboardInterrupt through: dropped, or turned into an error of its own (Hydra's config reading does both, by
# chance of where the interrupt falls: pipeline/ctrl_c.py)
SWALLOWING_CLI = """
    import importlib, runpy, signal, sys
    module, owner, name, what = sys.argv[1:5]
    holder = importlib.import_module(module)
    holder = getattr(holder, owner) if owner else holder
    real = getattr(holder, name)

    def taking_ctrl_c(*args, **kwargs):
        try:
            signal.raise_signal(signal.SIGINT)  # as a terminal's Ctrl-C, while the library runs
        except KeyboardInterrupt:
            if what == "error":
                raise RuntimeError("an error of the library's own")
        return real(*args, **kwargs)

    setattr(holder, name, taking_ctrl_c)
    sys.argv = ["pipeline", *sys.argv[5:]]
    runpy.run_module("pipeline", run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize("what", ["dropped", "error"])
@pytest.mark.parametrize(
    "where",
    [
        ("pipeline.guard", "", "check_argv"),  # the CLI's own check, before Hydra
        ("hydra._internal.config_loader_impl", "ConfigLoaderImpl", "load_configuration"),  # Hydra's compositions
    ],
)
def test_a_ctrl_c_a_library_swallows_still_ends_the_cli_before_any_load(tmp_path, where, what):
    """The Ctrl-C of the CI failure: it came while Hydra composed, was lost there, and the CLI loaded anyway
    (exit 0). A Ctrl-C is remembered by the CLI's own handler, so it now exits 130 and no load starts."""
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SWALLOWING_CLI), *where, what, f"hydra.run.dir={run_dir}"],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as in a terminal (see start_cli)
    )
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.rstrip().endswith("error: interrupted (Ctrl-C)"), proc.stderr
    assert not (run_dir / "run.json").exists()
    assert "qload-load" not in proc.stderr


IMPORT_TABLE = """
    import json, os, sys
    {enter}
    import transformers
    import transformers.models
    import transformers.utils.import_utils as iu
    folder = os.path.join(os.path.dirname(transformers.__file__), "models")
    table = iu.define_import_structure(os.path.join(folder, "__init__.py"))
    llama = iu.define_import_structure(os.path.join(folder, "llama", "__init__.py"))
    print(json.dumps({{
        "table": sorted((sorted(k), sorted((m, sorted(n)) for m, n in v.items())) for k, v in table.items()),
        "llama": sorted((sorted(k), sorted((m, sorted(n)) for m, n in v.items())) for k, v in llama.items()),
        "cls": transformers.models.llama.LlamaForCausalLM.__name__,
        "cached": type(iu.create_import_structure_from_path).__name__,
    }}))
    {leave}
"""
CACHED = "from pipeline import startup; cm = startup.import_structure_cache(); cm.__enter__()"


def test_transformers_import_table_is_the_same_stored_and_read_back(tmp_path, monkeypatch):
    """import_structure_cache: the first process stores transformers' table, the next reads it back; both give
    the very tables transformers builds without it, for the package and for a model package."""
    import json

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    plain = json.loads(run_python(IMPORT_TABLE.format(enter="", leave="")))
    first = json.loads(run_python(IMPORT_TABLE.format(enter=CACHED, leave="cm.__exit__(None, None, None)")))
    assert len(list((tmp_path / "qload" / "import-structure").glob("*.marshal"))) == 1
    again = json.loads(run_python(IMPORT_TABLE.format(enter=CACHED, leave="cm.__exit__(None, None, None)")))
    for cached in (first, again):
        assert cached["table"] == plain["table"] and len(plain["table"]) > 0
        assert cached["llama"] == plain["llama"] and len(plain["llama"]) > 0
        assert cached["cls"] == plain["cls"] == "LlamaForCausalLM"
        assert cached["cached"] == "_ImportStructure"
    assert plain["cached"] == "_lru_cache_wrapper"


@pytest.fixture
def model_tree(tmp_path, monkeypatch):
    """A small tree of model packages, transformers' own walk over it (counted), and a cache folder of its own."""
    import transformers.utils.import_utils as iu

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = tmp_path / "models"
    for name, text in [
        ("llama", "class LlamaModel: ...\n__all__ = ['LlamaModel']\n"),
        ("gpt2", "__all__ = ['GPT2']\n"),
    ]:
        (root / name).mkdir(parents=True)
        (root / name / "__init__.py").write_text("")
        (root / name / f"modeling_{name}.py").write_text(text)
    (root / "__init__.py").write_text("")
    plain = iu.create_import_structure_from_path.__wrapped__  # transformers' function, uncached
    walked = []

    def walk(path):
        walked.append(os.path.basename(path))
        return plain(path)

    def cached():  # the function as a fresh process gets it
        fn = startup._ImportStructure(walk, iu.__file__)
        monkeypatch.setattr(iu, "create_import_structure_from_path", fn)  # what the walk calls for each sub-folder
        return fn

    return root, walked, cached, plain


def test_a_stored_import_structure_is_read_back_until_a_file_changes(model_tree):
    root, walked, cached, plain = model_tree
    expected = plain(str(root))
    assert cached()(root) == expected and sorted(walked) == ["gpt2", "llama", "models"]
    walked.clear()
    fn = cached()  # a new process: the tree is read back, not walked
    assert fn(str(root / "__init__.py")) == expected and fn(root / "llama") == plain(str(root / "llama"))
    assert walked == []
    (root / "gpt2" / "modeling_gpt2.py").write_text("__all__ = ['GPT2', 'GPT2Model']\n")  # a file changed
    assert cached()(root) == plain(str(root)) != expected
    assert "models" in walked


def test_an_unreadable_store_is_walked_again_and_an_unwritable_one_is_not_needed(model_tree, tmp_path, monkeypatch):
    root, walked, cached, plain = model_tree
    cached()(root)
    (stored,) = (tmp_path / "cache" / "qload" / "import-structure").glob("*.marshal")
    stored.write_bytes(b"not marshal data")
    walked.clear()
    assert cached()(root) == plain(str(root)) and "models" in walked
    assert stored.read_bytes() != b"not marshal data"  # written again, whole
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "a_file"))  # no folder can be made there
    walked.clear()
    assert cached()(root) == plain(str(root)) and "models" in walked


# ---- which libraries a load hides (startup.load_backend) ----


def _folder(tmp_path, name: str, config: str | None) -> str:
    folder = tmp_path / name
    folder.mkdir()
    if config is not None:
        (folder / "config.json").write_text(config)
    return str(folder)


def test_a_quant_none_load_hides_what_its_checkpoints_saved_config_does_not_use(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from pipeline import compose

    def backend(*overrides: str) -> str:
        return startup.load_backend(compose(list(overrides)))

    assert backend("quant=nf4") == "bnb" and backend("quant=torchao/int8_weight_only") == "torchao"
    assert backend("quant=none") == "unquantized"  # tiny_llama: a synthetic checkpoint, written unquantized
    saved = {
        '{"model_type": "llama"}': "unquantized",
        '{"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": true}}': "bnb",
        '{"quantization_config": {"quant_method": "torchao"}}': "torchao",
        '{"quantization_config": {"quant_method": "hqq"}}': "hqq",
        '{"quantization_config": {"quant_method": "quanto", "weights": "qint8"}}': "quanto",
        '{"quantization_config": {"quant_method": "gptq"}}': "none",  # not ours: hide nothing
        '{"quantization_config": ["not", "a", "dict"]}': "none",
        "{not json": "none",
        None: "none",  # no config.json: config_merge says so, with everything importable
    }
    for i, (config, expected) in enumerate(saved.items()):
        path = _folder(tmp_path, f"ck{i}", config)
        assert backend("quant=none", f"model.path={path}") == expected, config
    # a hub model: its config.json in the local hub cache, or nothing hidden while it is not there
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert backend("quant=none", "model=tinyllama_1_1b") == "none"
    repo = tmp_path / "hub" / "models--TinyLlama--TinyLlama-1.1B-intermediate-step-1431k-3T"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "config.json").write_text('{"model_type": "llama"}')
    assert backend("quant=none", "model=tinyllama_1_1b") == "unquantized"
    (repo / "snapshots" / "abc123" / "config.json").write_text('{"quantization_config": {"quant_method": "hqq"}}')
    assert backend("quant=none", "model=tinyllama_1_1b") == "hqq"


def test_the_saved_methods_startup_knows_are_the_backends_own():
    from stages import backends

    ours = {method: name for name, cls in backends.BACKENDS.items() for method in cls.saved_methods}
    assert startup.SAVED == ours


def test_an_isolated_quant_none_load_imports_only_what_its_checkpoint_needs(tmp_path, cache_dir):
    """In the load's own process: an unquantized checkpoint loads with torchao and hqq hidden; one saved by
    torchao loads as saved, with torchao importable and hqq hidden."""
    from pipeline import load
    from tests.families import save

    _, record = load([f"cache_dir={cache_dir}", "quant=none"], tmp_path / "plain", isolate=True)
    assert record["status"] == "ok" and record["stages"][0]["facts"]["hidden_libraries"] == ["torchao", "hqq"]
    model, _ = load(
        [f"model.path={save('llama', tmp_path / 'ck')}", "quant=torchao/int8_weight_only"], tmp_path / "quantize"
    )
    model.save_pretrained(tmp_path / "saved")
    _, record = load([f"model.path={tmp_path / 'saved'}", "quant=none"], tmp_path / "as-saved", isolate=True)
    assert record["status"] == "ok" and record["stages"][0]["facts"]["hidden_libraries"] == ["hqq"]
    merge = next(s for s in record["stages"] if s["stage"] == "config_merge")
    assert merge["facts"]["backend"] == "torchao"
