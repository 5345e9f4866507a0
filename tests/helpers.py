"""Helpers the test modules share: the CLI run as a user runs it, a tiny checkpoint's shape, converters and
comparisons. Fixtures live in conftest.py; no test module imports from another one.

torch and safetensors are imported inside the functions that need them: test_sweeps' spawned child imports
that module, and with it this one, and must start small.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

REPO = Path(__file__).resolve().parent.parent

# A Llama small enough to build in milliseconds, in several shards (SYN's shard_size).
ARCH = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 256,
}
SYN = {"seed": 0, "dtype": "fp16", "shard_size": "60KB", "init_std": 0.02}

# the schemes transformers itself quantizes on a CPU besides bitsandbytes' (HQQ it cannot: tests/test_hqq.py)
TORCHAO_QUANTO_SCHEMES = [
    "torchao/int8_weight_only",
    "torchao/int8_dynamic",
    "torchao/float8_weight_only",
    "quanto/int8",
    "quanto/int4",
    "quanto/int2",
    "quanto/float8",
]


# ---- the CLI in a child process ----


def cli_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment, offline, plus `extra`."""
    return os.environ | {"HF_HUB_OFFLINE": "1"} | (extra or {})


def pipeline_cmd(*args: str, module: str = "pipeline") -> list[str]:
    """`python -m pipeline ARGS` (or another module of the project) with this interpreter."""
    return [sys.executable, "-m", module, *args]


def run_cli(
    *args: str, module: str = "pipeline", timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """`python -m pipeline ARGS` run to its end from the repository root, offline; output captured as text."""
    return subprocess.run(
        pipeline_cmd(*args, module=module), cwd=REPO, env=cli_env(env), capture_output=True, text=True, timeout=timeout
    )


def start_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`python -m pipeline ARGS` started in a session of its own, so that a signal can go to its whole process
    group, with Ctrl-C's default action, as a terminal's foreground job has it (a test run started in the
    background by a non-interactive shell, or under nohup, inherits SIGINT ignored, and so would the CLI and its
    load: the Ctrl-C tests would wait forever); output piped as text."""
    return subprocess.Popen(
        pipeline_cmd(*args),
        cwd=REPO,
        env=cli_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


# Runs the CLI and reports its max RSS as the kernel kept it. The go-between matters: a process started
# straight from pytest inherits pytest's own high-water mark across fork and exec.
MAXRSS = (
    "import os, subprocess, sys; p = subprocess.Popen(sys.argv[2:]); _, status, ru = os.wait4(p.pid, 0); "
    "open(sys.argv[1], 'w').write(str(ru.ru_maxrss)); sys.exit(os.waitstatus_to_exitcode(status))"
)


def cli_with_maxrss(tmp_path: Path, cache_dir: Path | str, *overrides: str) -> tuple[int, str, dict, float]:
    """Run the CLI in a child process with its record in tmp_path/run; return exit code, output, run.json
    ({} when there is none) and the child's max RSS in MB."""
    run_dir, maxrss = tmp_path / "run", tmp_path / "maxrss"
    args = pipeline_cmd(f"hydra.run.dir={run_dir}", f"cache_dir={cache_dir}", *overrides)
    proc = subprocess.run(
        [sys.executable, "-c", MAXRSS, str(maxrss), *args], cwd=REPO, env=cli_env(), capture_output=True, text=True
    )
    record = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").exists() else {}
    return proc.returncode, proc.stdout + proc.stderr, record, int(maxrss.read_text()) / 1024


def run_python(code: str) -> str:
    """`python -c CODE` (dedented) from the repository root; its stdout (it must exit 0)."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        check=True,
    ).stdout


# ---- checkpoints ----


def to_pickle(src: Path, dst: Path, sharded: bool = True) -> Path:
    """The safetensors checkpoint `src` re-saved as `save_pretrained(safe_serialization=False)` lays it out."""
    import torch
    from safetensors.torch import load_file

    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    shards = sorted(src.glob("*.safetensors"))
    if not sharded:
        torch.save({k: v for s in shards for k, v in load_file(s).items()}, dst / "pytorch_model.bin")
        return dst
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"pytorch_model-{i:05d}-of-{len(shards):05d}.bin"
        tensors = load_file(shard)
        torch.save(tensors, dst / name)
        weight_map |= dict.fromkeys(tensors, name)
    (dst / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


def file_digests(folder: Path) -> dict[str, str]:
    """Every file under `folder` by its SHA-256: equal before and after a run means nothing was written."""
    out = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(2**24):
                h.update(chunk)
        out[str(path.relative_to(folder))] = h.hexdigest()
    return out


# ---- models ----


def weights(model: Any) -> dict[str, torch.Tensor]:
    """Every tensor that defines the loaded model, quantization state included, as raw bytes on the CPU."""
    import torch

    out = {}
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        out[name] = t.view(torch.uint8) if t.dtype != torch.bool and t.numel() else t
    return out


def assert_same_weights(a: Any, b: Any) -> None:
    """The two models hold byte-identical tensors under the same names."""
    import torch

    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), f"{name} differs"


def stage_facts(record: dict, stage: str) -> dict:
    """The facts of `stage` in a run record."""
    return next(s["facts"] for s in record["stages"] if s["stage"] == stage)


def sweep(sweep_dir: Path, cache_dir: Path, *overrides: str) -> tuple[subprocess.CompletedProcess, dict[int, dict]]:
    """`python -m pipeline -m ...` in a child process; its result and each job's run.json by job number."""
    args = [
        *("-m", f"hydra.sweep.dir={sweep_dir}", f"cache_dir={cache_dir}", "stages.stream.progress=false"),
        *overrides,
    ]
    proc = run_cli(*args)
    records = {int(p.parent.name): json.loads(p.read_text()) for p in sweep_dir.glob("*/run.json")}
    return proc, records


def entry(record: dict, stage: str) -> dict:
    """A run record's entry for `stage` (the runner's `setup` comes first, then the stages in order)."""
    return next(s for s in record["stages"] if s["stage"] == stage)
