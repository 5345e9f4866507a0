"""Seeded random-weight checkpoints of a real architecture, in the standard Hugging Face sharded layout.

Nothing can be downloaded from a model hub here, so `source: synthetic` builds the checkpoint a model
config describes: config.json, `model-0000k-of-0000n.safetensors` shards split like `save_pretrained`
splits them, and `model.safetensors.index.json`. Shards are written tensor by tensor straight into the
safetensors format, so memory stays at one tensor whatever the model's size. The folder is written under
a temporary name and renamed when complete: a process killed half-way never leaves something that looks
like a finished checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import struct
import zlib
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.core_model_loading import revert_weight_conversion

from pipeline.core import cachelock, progress
from pipeline.core.dtypes import SAFETENSORS_DTYPE, torch_dtype
from pipeline.core.publish import building
from pipeline.core.sizes import parse_size

FORMAT_VERSION = 1


def _fill(name: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int, std: float) -> torch.Tensor:
    if len(shape) == 1 and name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.empty(shape, dtype=torch.float32).normal_(0.0, std, generator=gen).to(dtype)


def tensor_plan(config: Any) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor a checkpoint of this architecture stores, in the order and under the names
    `save_pretrained` writes: state-dict order, except that transformers 5 reverts the conversions it makes
    on load (Mixtral's and Qwen2-MoE's fused experts are stored one tensor per expert, as on the hub)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    tied = set(model.all_tied_weights_keys) if config.tie_word_embeddings else set()
    state = revert_weight_conversion(model, {k: v for k, v in model.state_dict().items() if k not in tied})
    return [(k, tuple(v.shape)) for k, v in state.items()]


def split_shards(plan: list[tuple[str, tuple[int, ...]]], itemsize: int, max_bytes: int) -> list[list]:
    """Greedy split in order, as `save_pretrained` does: a new shard when the next tensor would overflow."""
    shards: list[list] = [[]]
    size = 0
    for name, shape in plan:
        nbytes = itemsize * int(torch.Size(shape).numel())
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def _write_shard(
    path: Path, tensors: list, dtype: torch.dtype, seed: int, std: float, bar: progress.Bar | None = None
) -> None:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    itemsize = torch.empty((), dtype=dtype).element_size()
    for name, shape in tensors:
        n = itemsize * int(torch.Size(shape).numel())
        header[name] = {
            "dtype": SAFETENSORS_DTYPE[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + n],
        }
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape in tensors:
            data = _fill(name, shape, dtype, seed, std).contiguous().view(torch.uint8).numpy().tobytes()
            f.write(data)
            if bar is not None:
                bar.update(len(data))


def checkpoint_key(architecture: dict, synthetic: dict) -> str:
    blob = json.dumps({"v": FORMAT_VERSION, "arch": architecture, "syn": synthetic}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def folder(name: str, architecture: dict, synthetic: dict, cache_dir: Path) -> Path:
    """Where the checkpoint for this architecture and seed lives (or will, once materialized)."""
    return Path(cache_dir).expanduser() / "synthetic" / f"{name}-{checkpoint_key(architecture, synthetic)}"


def materialize(name: str, architecture: dict, synthetic: dict, cache_dir: Path) -> Path:
    """The checkpoint folder for this architecture and seed, built on first use and reused after."""
    target = folder(name, architecture, synthetic, cache_dir)
    if (target / "config.json").exists():
        return target
    dtype = torch_dtype(synthetic["dtype"], key="model.synthetic.dtype")
    max_bytes = parse_size(synthetic["shard_size"], "model.synthetic.shard_size")
    config = AutoConfig.for_model(**architecture)
    config.dtype = dtype
    plan = tensor_plan(config)
    itemsize = torch.empty((), dtype=dtype).element_size()
    shards = split_shards(plan, itemsize, max_bytes)
    size = sum(itemsize * int(torch.Size(shape).numel()) for _, shape in plan)

    target.parent.mkdir(parents=True, exist_ok=True)

    def build() -> None:
        with building(target) as partial, progress.Bar(size, f"Building synthetic {name} checkpoint") as bar:
            weight_map, total = {}, 0
            n = len(shards)
            for i, tensors in enumerate(shards, 1):
                fname = f"model-{i:05d}-of-{n:05d}.safetensors" if n > 1 else "model.safetensors"
                _write_shard(partial / fname, tensors, dtype, synthetic["seed"], synthetic["init_std"], bar)
                for tname, shape in tensors:
                    weight_map[tname] = fname
                    total += torch.empty((), dtype=dtype).element_size() * int(torch.Size(shape).numel())
            if n > 1:
                index = {"metadata": {"total_size": total}, "weight_map": weight_map}
                (partial / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
            config.save_pretrained(partial)

    # jobs sharing cache_dir: one builds, the others wait for it (pipeline/core/cachelock.py)
    cachelock.build_once(target, lambda t: (t / "config.json").exists(), build)
    return target
