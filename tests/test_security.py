"""Configs, experiment YAML, sweep overrides and run records are untrusted: nothing in them may call code.

Every refused case is checked two ways: a sentinel file that the named callable would write stays absent, and
`hydra.utils.instantiate` (patched to count) is never called. `test_the_attack_is_real` shows that the same
strings do write the sentinel when handed to Hydra's instantiate, so the sentinel can tell.
"""

from __future__ import annotations

import importlib
import json
import shutil
import types
from pathlib import Path

import hydra.utils
import pytest
from hydra.errors import HydraException
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pipeline
from pipeline import compose, guard, replay
from pipeline.core.schema import STAGE_KINDS, BoundedStreamConfig
from pipeline.isolate import Outcome
from pipeline.runner import StageError, run
from stages import registry
from tests.helpers import run_cli

# the modules every stage module reaches, as the issue lists them, plus what an attacker would try first
REACHABLE = ("torch", "transformers", "safetensors", "bitsandbytes", "accelerate", "pathlib", "builtins", "json", "re",
             "threading", "queue", "ctypes", "os", "subprocess", "importlib", "shutil", "pickle")  # fmt: skip
CALLS = ("save", "system", "write_text", "remove", "load", "CDLL", "Popen", "rmtree", "import_module", "dump",
         "exec", "eval", "Thread", "Path", "utils.cpp_extension.load_inline", "call")  # fmt: skip
STAGE_MODULES = sorted({t.rsplit(".", 1)[0] for t in registry.STAGES} | {"stages", "stages.stream.reader"})
LOOKALIKES = {"s": "\u0455", ".": "\uff0e", "a": "\u0430", "e": "\u0435", "_": "\uff3f"}


def reachable_paths() -> list[str]:
    """Dotted paths that walk out of a stage module through the modules it imported."""
    out = []
    for name in STAGE_MODULES:
        module = importlib.import_module(name)
        for attr, value in vars(module).items():
            if isinstance(value, types.ModuleType) and not attr.startswith("__"):
                out += [f"{name}.{attr}.{call}" for call in ("save", "system", "load", "write_text", "remove")]
            elif callable(value) and not isinstance(value, type):
                out.append(f"{name}.{attr}")  # a function a stage module imported: not a stage class either
    return sorted(set(out))


REACHABLE_PATHS = reachable_paths()


@pytest.fixture
def counted(monkeypatch):
    """A counter of `hydra.utils.instantiate` calls (and of Hydra's internal one it wraps)."""
    calls = []
    real = hydra.utils.instantiate

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(hydra.utils, "instantiate", counting)
    monkeypatch.setattr("hydra._internal.instantiate._instantiate2.instantiate", counting)
    return calls


def refused_by_runner(overrides: list[str], tmp: Path) -> StageError:
    """Compose, then run through the runner (as the load process does); the run must fail in `setup`."""
    cfg = compose(overrides)
    with pytest.raises(StageError) as err:
        run(cfg, tmp / "run")
    assert err.value.stage == "setup"
    record = json.loads((tmp / "run" / "run.json").read_text())
    assert record["status"] == "failed" and record["failed_stage"] == "setup"
    assert [(s["stage"], s["status"]) for s in record["stages"]] == [("setup", "failed")]
    return err.value


def test_the_attack_is_real(tmp_path):
    """What Hydra's instantiate does with the issue's target: writes the file. So the sentinel can fail."""
    sentinel = tmp_path / "victim.txt"
    hydra.utils.instantiate({"_target_": "stages.stream.reader.torch.save", "obj": 1, "f": str(sentinel)})
    assert sentinel.exists()


def test_the_issue_command_fails_before_any_call_and_names_the_choices(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("original")
    proc = run_cli(
        "stages.quantizer._target_=stages.stream.reader.torch.save",
        "+stages.quantizer.obj=1",
        f"+stages.quantizer.f={victim}",
        f"hydra.run.dir={tmp_path / 'run'}",
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    assert victim.read_text() == "original"
    assert "stages.quantizer._target_='stages.stream.reader.torch.save'" in proc.stderr
    assert "stages.quantizer.AutoQuantizer (stages/quantizer=auto)" in proc.stderr
    assert not (tmp_path / "run").exists()  # refused before Hydra made the run folder


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    kind=st.sampled_from(STAGE_KINDS),
    target=st.one_of(
        st.sampled_from(REACHABLE_PATHS),
        st.builds(lambda m, c: f"{m}.{c}", st.sampled_from(REACHABLE), st.sampled_from(CALLS)),
        st.builds(
            lambda s, m, c: f"{s}.{m}.{c}",
            st.sampled_from(STAGE_MODULES),
            st.sampled_from(REACHABLE),
            st.sampled_from(CALLS),
        ),  # fmt: skip
    ),
)
def test_fuzz_targets_through_modules_stages_import(kind, target, tmp_path, counted):
    sentinel = tmp_path / "sentinel"
    with pytest.raises(guard.UntrustedConfig) as err:
        guard.check(compose([f"stages.{kind}._target_={target}"]))
    assert f"stages.{kind}._target_={target!r}" in str(err.value)
    for choice in registry.choices(kind):
        assert choice in str(err.value)
    # the same through the runner, with the arguments the callable would need to write the sentinel
    with pytest.raises(StageError):
        run(compose([f"stages.{kind}._target_={target}", f"+stages.{kind}.f={sentinel}"]), tmp_path / "r")
    assert not sentinel.exists() and counted == []


def variants(target: str) -> list[str]:
    """Unicode look-alikes, whitespace, case, and another kind's class for a real stage target."""
    out = [f" {target}", f"{target} ", f"{target}\t", target.upper(), target + ".__call__", target + "."]
    out += [target.replace(a, b, 1) for a, b in LOOKALIKES.items() if a in target]
    return out


@pytest.mark.parametrize("target", [v for t in registry.STAGES for v in variants(t)])
def test_look_alikes_and_whitespace_are_refused(target, tmp_path, counted):
    kind = registry.STAGES.get(target.strip(), ("stream",))[0]
    node = {"_target_": target}
    with pytest.raises(guard.UntrustedConfig, match="may only select"):
        guard.stage_config(kind, node)
    assert counted == []


def test_a_stage_of_another_kind_is_refused():
    with pytest.raises(guard.UntrustedConfig, match="stages.quantizer._target_='stages.stream.BoundedStreamer'"):
        guard.stage_config("quantizer", {"_target_": "stages.stream.BoundedStreamer"})


SPECIAL_OVERRIDES = [
    ["+stages.verify._partial_=true"],
    ["+stages.stream._args_=[1,2]"],
    ["+stages.postprocess._recursive_=false"],
    ["+stages.postprocess._convert_=all"],
    ["+stages.postprocess.allow_unexpected_keys={_target_: torch.save, obj: 1, f: SENTINEL}"],
    ["stages/verify=logits", "stages.verify.text={_target_: pathlib.Path.write_text, data: x}"],
    ["+stages.stream.progress_bar={_target_: torch.save, obj: 1, f: SENTINEL}"],
    ["+model.architecture.x={_target_: torch.save, obj: 1, f: SENTINEL}"],
    ["+model.extra={_target_: torch.save, obj: 1, f: SENTINEL}"],
    ["+stages.stream.\uff3ftarget\uff3f=torch.save"],
    ["+quant.\uff3fpartial_=true"],
    ["+stages.evil={_target_: torch.save, obj: 1, f: SENTINEL}"],
]


@pytest.mark.parametrize("overrides", SPECIAL_OVERRIDES, ids=lambda o: o[-1][:48])
def test_instantiation_keys_anywhere_are_refused(overrides, tmp_path, counted):
    sentinel = tmp_path / "sentinel"
    overrides = [o.replace("SENTINEL", str(sentinel)) for o in overrides]
    try:
        compose(overrides)
    except HydraException:  # refused by a schema when Hydra composes (a typed key): also before any call
        pass
    else:
        refused_by_runner(overrides, tmp_path)
        with pytest.raises(guard.UntrustedConfig):
            guard.check_argv(overrides)
    assert not sentinel.exists() and counted == []


def test_stage_arguments_are_checked_against_the_stage_schema():
    with pytest.raises(guard.UntrustedConfig, match="stages.stream.prefetch .*many"):
        guard.stage_config("stream", {"_target_": "stages.stream.BoundedStreamer", "prefetch": "many"})
    with pytest.raises(guard.UntrustedConfig, match="stages.quantizer.obj"):
        guard.stage_config("quantizer", {"_target_": "stages.quantizer.AutoQuantizer", "obj": 1})
    target, config = guard.stage_config("stream", {"_target_": "stages.stream.BoundedStreamer"})
    assert target == "stages.stream.BoundedStreamer" and isinstance(config, BoundedStreamConfig)
    assert (config.progress, config.kernel.value, config.prefetch) == (True, "auto", 0)  # the schema's defaults


HYDRA_OVERRIDES = [
    ["+hydra.callbacks.x._target_=torch.save"],
    ["hydra.launcher._target_=torch.save"],
    ["hydra.sweeper._target_=stages.stream.reader.torch.save"],
    ["+hydra.launcher.x={_target_: torch.save, obj: 1, f: SENTINEL}"],
    ["hydra/launcher=local", "+hydra.launcher.setup=[touch SENTINEL]"],
    ["+hydra.job.env_set.LD_PRELOAD=/tmp/evil.so"],
    ["+hydra.job.env_set.PYTHONPATH=/tmp/evil"],
    ["hydra.job_logging.handlers.console.class=torch.save"],
    ["hydra.hydra_logging.handlers.console.stream=ext://os.system"],
    ["hydra.searchpath=[pkg://torch]"],
    ["--config-dir", "/tmp"],
    ["--experimental-rerun", "/tmp/config.pickle"],
]


@pytest.mark.parametrize("argv", HYDRA_OVERRIDES, ids=lambda o: o[-1][:48])
def test_hydra_nodes_are_a_closed_set_too(argv, tmp_path, counted):
    sentinel = tmp_path / "sentinel"
    with pytest.raises(guard.UntrustedConfig):
        guard.check_argv([a.replace("SENTINEL", str(sentinel)) for a in argv])
    assert not sentinel.exists() and counted == []


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["-m", "quant=nf4,fp4,int8", "dtype=fp16,bf16"],
        ["-m", "experiment=quant_sweep"],
        ["hydra/launcher=local", "stages/stream=transformers", "stages/verify=logits"],
        ["-m", "hydra/launcher=slurm", "quant=nf4,fp4"],
        ["-m", "hydra/launcher=slurm_gpu", "hydra.launcher.partition=a100"],
        ["+hydra.job.env_set.OMP_NUM_THREADS=2"],
    ],
)
def test_ordinary_commands_pass(argv):
    guard.check_argv(argv)


def test_every_job_of_a_sweep_is_checked(counted):
    with pytest.raises(guard.UntrustedConfig, match="torch.save"):
        guard.check_argv(["-m", "quant=nf4,fp4", "stages.stream._target_=stages.stream.BoundedStreamer,torch.save"])


@pytest.fixture
def conf_copy(tmp_path, monkeypatch):
    """A copy of conf/ that compose() uses, so a test can add an experiment file without touching the repo."""
    conf = tmp_path / "conf"
    shutil.copytree(pipeline.CONF_DIR, conf)
    monkeypatch.setattr(pipeline, "CONF_DIR", conf)
    return conf


EXPERIMENTS = {
    "stage_target": "stages:\n  stream:\n    _target_: stages.stream.reader.torch.save\n    f: SENTINEL\n",
    "nested": "stages:\n  postprocess:\n    allow_unexpected_keys: {_target_: torch.save, obj: 1, f: SENTINEL}\n",
    "callback": "hydra:\n  callbacks:\n    x: {_target_: torch.save, obj: 1, f: SENTINEL}\n",
    "logging": "hydra:\n  job_logging:\n    handlers:\n      console:\n        (): torch.save\n",
    "sweep": "hydra:\n  sweeper:\n    params:\n      stages.stream._target_: stages.stream.BoundedStreamer,os.system\n",
    "partial": "stages:\n  verify:\n    _partial_: true\n",
}


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_fuzz_cases_through_an_experiment_yaml(name, conf_copy, tmp_path, counted):
    sentinel = tmp_path / "sentinel"
    body = "# @package _global_\n" + EXPERIMENTS[name].replace("SENTINEL", str(sentinel))
    (conf_copy / "experiment" / f"evil_{name}.yaml").write_text(body)
    with pytest.raises((guard.UntrustedConfig, HydraException)):  # ours, or a schema's at compose time
        guard.check_argv(["-m", f"experiment=evil_{name}"])
    assert not sentinel.exists() and counted == []


@pytest.fixture
def recorded_run(tmp_path):
    """make(edit) -> a new run folder whose run.json holds a real resolved config, doctored by `edit`."""
    from omegaconf import OmegaConf

    config = OmegaConf.to_container(compose([f"cache_dir={tmp_path}"]), resolve=True)
    folders = iter(range(10**6))

    def make(edit=lambda c: None) -> Path:
        run_dir = tmp_path / f"recorded{next(folders)}"
        run_dir.mkdir()
        doctored = json.loads(json.dumps(config))
        edit(doctored)
        (run_dir / "run.json").write_text(json.dumps({"status": "ok", "config": doctored}))
        return run_dir

    return make


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(STAGE_KINDS), target=st.sampled_from(REACHABLE_PATHS))
def test_fuzz_replay_of_a_doctored_record(kind, target, recorded_run, tmp_path, counted, monkeypatch):
    launched = []
    monkeypatch.setattr(replay, "run_isolated", lambda *a, **k: launched.append(a))
    sentinel = tmp_path / "sentinel"

    def edit(config):
        config["stages"][kind] = {"_target_": target, "obj": 1, "f": str(sentinel)}

    with pytest.raises(replay.ReplayError, match=f"stages.{kind}._target_"):
        replay.replay(recorded_run(edit), tmp_path / "out")
    assert launched == [] and not sentinel.exists() and counted == []


@pytest.mark.parametrize(
    "edit",
    [
        lambda c: c["stages"]["verify"].update(_partial_=True),
        lambda c: c["stages"]["stream"].update(_args_=[1]),
        lambda c: c["stages"]["postprocess"].update(allow_unexpected_keys={"_target_": "torch.save"}),
        lambda c: c["model"]["architecture"].update(x={"_target_": "os.system", "_args_": ["true"]}),
        lambda c: c["stages"].update(extra={"_target_": "stages.stream.BoundedStreamer"}),
    ],
)
def test_replay_refuses_instantiation_keys_anywhere(edit, recorded_run, tmp_path, counted, monkeypatch):
    launched = []
    monkeypatch.setattr(replay, "run_isolated", lambda *a, **k: launched.append(a))
    with pytest.raises(replay.ReplayError):
        replay.replay(recorded_run(edit), tmp_path / "out")
    assert launched == [] and counted == []


def test_replay_of_an_untouched_record_is_launched(recorded_run, tmp_path, monkeypatch):
    """The control for the refusals above: the same record, not doctored, gets as far as the launch."""
    launched = []
    monkeypatch.setattr(replay, "run_isolated", lambda *a, **k: launched.append(a) or Outcome(0, "", {}))
    replay.replay(recorded_run(), tmp_path / "out")
    assert len(launched) == 1


def test_replay_after_a_ctrl_c_a_library_swallowed_is_not_launched(recorded_run, tmp_path, monkeypatch):
    """As the CLI (tests/test_startup.py): a Ctrl-C that came while the config was built, and was dropped by the
    library it fell into, still stops the replay before its load (exit 130)."""
    from pipeline import ctrl_c

    launched = []
    monkeypatch.setattr(replay, "run_isolated", lambda *a, **k: launched.append(a) or Outcome(0, "", {}))
    monkeypatch.setattr(ctrl_c, "_seen", True)  # what ctrl_c's handler leaves, whatever became of the interrupt
    with pytest.raises(SystemExit) as exit:
        replay.replay(recorded_run(), tmp_path / "out")
    assert exit.value.code == 130 and launched == []


def test_replay_cli_names_the_key(recorded_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(replay, "run_isolated", lambda *a, **k: pytest.fail("launched"))
    run_dir = recorded_run(lambda c: c["stages"]["stream"].update(_target_="torch.save"))
    assert replay.main([str(run_dir), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "stages.stream._target_='torch.save'" in err and "stages/stream=bounded" in err
