"""Broken checkpoints fail before streaming with a message naming the file, and are never modified."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct

import pytest

from pipeline.checkpoint import CheckpointError, scan
from pipeline.runner import StageError
from tests.test_checkpoints import ARCH, SYN


@pytest.fixture
def ckpt(tmp_path):
    from pipeline import synthetic

    src = synthetic.materialize("t", ARCH, SYN, tmp_path / "cache")
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def shards(path):
    return sorted(path.glob("*.safetensors"))


def digest(path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


def test_lfs_pointer(ckpt):
    shards(ckpt)[1].write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")
    with pytest.raises(CheckpointError, match="Git LFS pointer.*git lfs pull"):
        scan(ckpt)


def test_truncated_shard(ckpt):
    shard = shards(ckpt)[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=f"{shard.name}: truncated: the header needs"):
        scan(ckpt)


def test_trailing_bytes(ckpt):
    shard = shards(ckpt)[0]
    shard.write_bytes(shard.read_bytes() + b"\0" * 16)
    with pytest.raises(CheckpointError, match="16 trailing bytes"):
        scan(ckpt)


@pytest.mark.parametrize("header", [b"{not json", b'{"a": {"dtype": "F16"}}'])
def test_corrupt_header(ckpt, header):
    shard = shards(ckpt)[0]
    shard.write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        scan(ckpt)


def test_header_length_beyond_the_file(ckpt):
    shard = shards(ckpt)[0]
    shard.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(CheckpointError, match="header length 1000000000000 does not fit"):
        scan(ckpt)


def test_index_names_a_missing_shard(ckpt):
    shards(ckpt)[-1].unlink()
    with pytest.raises(CheckpointError, match="names shard\\(s\\) that are not in the folder"):
        scan(ckpt)


def test_shard_holds_tensors_the_index_does_not_list(ckpt):
    index_path = ckpt / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    dropped = next(iter(index["weight_map"]))
    del index["weight_map"][dropped]
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"does not list here, e.g. {dropped}"):
        scan(ckpt)


def test_pickle_weights_are_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(CheckpointError, match="only safetensors weights are loaded"):
        scan(tmp_path)


@pytest.mark.parametrize("stream", ["bounded", "transformers"])
def test_weights_of_another_size_fail_and_nothing_is_written(load, ckpt, stream):
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps(config | {"intermediate_size": 192}))
    before = digest(ckpt)
    with pytest.raises(StageError) as err:
        load(f"model.path={ckpt}", f"stages/stream={stream}", "quant=none")
    assert err.value.stage in ("stream", "postprocess")
    if stream == "bounded":
        msg = str(err.value)
        assert "mlp" in msg and ("expects (64, 192)" in msg or "expects (192, 64)" in msg)
    assert digest(ckpt) == before


def test_missing_weights_are_refused_not_initialized(load, ckpt):
    index_path = ckpt / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    # move one tensor's entry out of the index and its shard: the model lacks that weight
    last = shards(ckpt)[-1]
    gone = [k for k, v in index["weight_map"].items() if v == last.name]
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != last.name}
    index_path.write_text(json.dumps(index))
    last.unlink()
    before = digest(ckpt)
    with pytest.raises(StageError) as err:
        load(f"model.path={ckpt}")
    assert err.value.stage == "postprocess" and "not in the checkpoint" in str(err.value)
    assert any(name in str(err.value) for name in gone)
    assert digest(ckpt) == before


def test_no_config_json(load, tmp_path):
    with pytest.raises(StageError, match="no config.json there"):
        load(f"model.path={tmp_path}")
