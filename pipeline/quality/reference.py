"""Reference logits for the verify stage: the same checkpoint loaded unquantized by plain transformers.

They are computed once per checkpoint, dtype, device type and token sequence, and cached under
`cache_dir/verify/`, so a sweep over quantization settings pays for them once. The key is the checkpoint
fingerprint (config, index, safetensors headers), the dtype, the device type the logits were computed on
(CPU and CUDA kernels round differently, and a reference must compare like with like), a hash of the
token ids, and the torch and transformers versions (an upgrade may change kernels, and a stale reference
would then report a loss that the load did not cause).

On a cache miss the reference runs in a child process (`python -m pipeline.quality.reference`), for two reasons:
the quantized model of the run stays resident in the parent, and a child's memory is returned whole when
it exits, so the parent's RSS, which the runner records stage by stage, never carries a full-precision
copy. The child does `AutoModelForCausalLM.from_pretrained(path, dtype=...)` and one forward pass: its peak
is that of a plain unquantized load plus one set of logits, and the kernel's figure for it
(`child_rss_peak_mb`) goes into the record. The machine holds both processes meanwhile: on a miss its peak
is the quantized model plus that child; on a hit, nothing is loaded.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from pipeline.core import cachelock, progress
from pipeline.core.dtypes import torch_dtype

FORMAT_VERSION = 1
REPO = Path(__file__).resolve().parents[2]  # the folder holding the pipeline package


def ids_hash(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:16]


def software_hash() -> str:
    blob = f"{FORMAT_VERSION}:{version('torch')}:{version('transformers')}".encode()
    return hashlib.sha256(blob).hexdigest()[:8]


def cache_file(cache_dir: str | Path, fingerprint: str, dtype: torch.dtype, device: torch.device, ids: torch.Tensor):
    """Where the reference logits for this checkpoint, dtype, device type, token sequence and software live."""
    name = f"{fingerprint}-{str(dtype).removeprefix('torch.')}-{device.type}-{ids_hash(ids)}-{software_hash()}"
    return Path(cache_dir).expanduser() / "verify" / f"{name}.safetensors"


def reference_logits(
    checkpoint: Path, fingerprint: str, dtype: torch.dtype, device: torch.device, ids: torch.Tensor, cache_dir: str
) -> tuple[torch.Tensor, dict[str, Any]]:
    """(logits [tokens, vocab], facts): from the cache, or computed in a child process and cached."""
    target = cache_file(cache_dir, fingerprint, dtype, device, ids)
    facts: dict[str, Any] = {"file": str(target), "dtype": str(dtype).removeprefix("torch."), "device": device.type}
    if not target.exists():  # jobs sharing cache_dir: one computes, the others wait (pipeline/core/cachelock.py)
        target.parent.mkdir(parents=True, exist_ok=True)
        dt = str(dtype).removeprefix("torch.")
        with progress.step(f"Computing the unquantized reference logits for verify ({dt}, once per checkpoint)"):
            cachelock.build_once(
                target, Path.exists, lambda: facts.update(_compute_in_child(checkpoint, dtype, device, ids, target))
            )
    facts.setdefault("cached", True)
    stored = load_file(target)
    if not torch.equal(stored["ids"], ids.to(torch.int64)):
        raise RuntimeError(f"{target}: cached for other token ids (hash collision?); delete the file")
    return stored["logits"], facts


def _compute_in_child(
    checkpoint: Path, dtype: torch.dtype, device: torch.device, ids: torch.Tensor, target: Path
) -> dict[str, Any]:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".ids-") as tmp:
        ids_file, log = Path(tmp) / "ids.safetensors", Path(tmp) / "child.log"
        save_file({"ids": ids.to(torch.int64).contiguous()}, ids_file)
        cmd = [sys.executable, "-m", "pipeline.quality.reference", str(checkpoint), str(dtype).removeprefix("torch.")]
        cmd += [str(device), str(ids_file), str(target)]
        env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        t0 = time.perf_counter()
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
            # wait4, not wait: the kernel's peak RSS of the child, the honest figure for the reference's cost
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0 or not target.exists():
            tail = " | ".join(log.read_text().strip().splitlines()[-5:])
            raise RuntimeError(
                f"reference logits for {checkpoint} ({dtype}) failed in the child process (exit {proc.returncode}): "
                f"{tail}\n  Fix: stages.verify.reference=false skips the reference comparison"
            )
    return {
        "cached": False,
        "wall_s": round(time.perf_counter() - t0, 3),
        "child_rss_peak_mb": round(usage.ru_maxrss / 1024, 1),
    }


def compute(checkpoint: Path, dtype: torch.dtype, device: torch.device, ids: torch.Tensor) -> torch.Tensor:
    """Logits of the unquantized checkpoint on `ids`, as plain transformers computes them."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": dtype}
    if device.type != "cpu":
        kwargs["device_map"] = {"": device}
    model = AutoModelForCausalLM.from_pretrained(checkpoint, **kwargs).eval()
    with torch.inference_mode():
        return model(ids.unsqueeze(0).to(device)).logits[0].cpu()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.quality.reference", description=compute.__doc__)
    for name in ("checkpoint", "dtype", "device", "ids_file", "out"):
        parser.add_argument(name)
    args = parser.parse_args(argv)
    ids = load_file(args.ids_file)["ids"]
    logits = compute(Path(args.checkpoint), torch_dtype(args.dtype, "dtype"), torch.device(args.device), ids)
    out = Path(args.out)
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    save_file({"logits": logits.contiguous(), "ids": ids}, partial)
    os.replace(partial, out)  # readers see a complete file or none


if __name__ == "__main__":
    main()
