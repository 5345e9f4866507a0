"""What a user sees: records that name the model loaded, no third-party noise, a --help that teaches."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline import helptext
from tests.helpers import REPO

# what a third-party warning looks like once it reaches our output (Hydra's log format, torch's, Python's)
WARNING = re.compile(r"\]\[WARNING\]|^W\d{4} |Warning:|UserWarning|FutureWarning|DeprecationWarning", re.M)
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
    max_position_embeddings=128,
)


def cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = os.environ | {"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def save_checkpoint(path: Path, model_type: str) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **TINY)
    AutoModelForCausalLM.from_config(config).to(torch.float16).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    return {t: save_checkpoint(root / f"{t}-tiny", t) for t in ("qwen2", "mistral")}


def test_a_checkpoint_by_path_names_the_run_folder_and_record(tmp_path, cache_dir, checkpoints):
    for model_type, path in checkpoints.items():
        proc = cli(tmp_path, f"model.path={path}", f"cache_dir={cache_dir}")
        assert proc.returncode == 0, proc.stderr
        assert not WARNING.search(proc.stdout + proc.stderr), proc.stdout + proc.stderr
        (folder,) = tmp_path.glob(f"runs/*/*_{model_type}-tiny_nf4")
        model = json.loads((folder / "run.json").read_text())["config"]["model"]
        assert model["name"] == f"{model_type}-tiny"  # not the default model YAML's tiny_llama
        assert model["architecture"]["model_type"] == model_type  # config.json's, not tiny_llama's llama
        assert model["architecture"]["hidden_size"] == 64 and "_name_or_path" not in model["architecture"]
    report = subprocess.run(
        [sys.executable, "-m", "pipeline.report", str(tmp_path / "runs")],
        env=os.environ | {"PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
    )
    assert report.returncode == 0, report.stderr
    header, _, *rows = report.stdout.splitlines()
    model_col = header.split().index("model")
    assert sorted(row.split()[model_col] for row in rows[:2]) == ["mistral-tiny", "qwen2-tiny"]


def test_int8_bf16_says_the_cast_warning_at_most_once(tmp_path, cache_dir):
    proc = cli(
        tmp_path,
        "quant=int8",
        "dtype=bf16",
        "stages/verify=logits",
        "stages.verify.max_tokens=64",
        f"cache_dir={cache_dir}",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert out.count("MatMul8bitLt: inputs will be cast") <= 1, out
    assert not WARNING.search(out.replace("[WARNING] - MatMul8bitLt", "")), out


def test_an_unknown_quant_method_ends_with_our_error_alone(tmp_path, cache_dir, checkpoints):
    import shutil

    path = shutil.copytree(checkpoints["qwen2"], tmp_path / "foo-quantized")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | {"quantization_config": {"quant_method": "foo"}}))
    proc = cli(tmp_path, f"model.path={path}", f"cache_dir={cache_dir}", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 1
    assert "quant_method='foo' is not a quantization method" in proc.stderr
    assert "Unknown quantization type" not in proc.stdout + proc.stderr


def test_help_names_the_app_and_only_real_options(tmp_path):
    proc = cli(REPO, "--help")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith("qload: ") and "powered by Hydra" not in out
    assert "schema" not in out
    for group in helptext.GROUPS:
        listed = out.split(f"\n{group}:\n", 1)[1].split("\n\n", 1)[0]
        names = [line.split()[0] for line in listed.splitlines()]
        files = sorted(p for p in (REPO / "conf" / group).rglob("*.yaml") if p.stem != "schema")
        assert names == [p.relative_to(REPO / "conf" / group).with_suffix("").as_posix() for p in files], group
        assert all(len(line.split()) > 2 for line in listed.splitlines()), listed  # each with what it is
    for pointer in ("--cfg job", "--info", "--shell-completion"):
        assert pointer in out


def test_help_template_is_up_to_date():
    assert helptext.TARGET.read_text() == helptext.render(), "rerun: python -m pipeline.helptext"


@pytest.mark.parametrize("choice", ["quant=schema", "model=schema", "stages/stream=bounded_schema"])
def test_a_schema_is_refused_as_an_option(tmp_path, choice):
    proc = cli(tmp_path, choice)
    group = choice.split("=")[0]
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"error: {choice}: a schema, not an option of {group}; valid options: ")
    assert "Traceback" not in proc.stderr and not (tmp_path / "runs").exists()
    valid = proc.stderr.strip().rpartition("valid options: ")[2].split(", ")
    assert valid == sorted(p.stem for p in (REPO / "conf" / group).glob("*.yaml"))
