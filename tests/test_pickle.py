"""Pickle weights (`pytorch_model*.bin`): refused unless model.allow_pickle=true, then loaded by both streamers
into the same weights as the safetensors they were converted from, with only tensors ever unpickled."""

from __future__ import annotations

import fnmatch
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.checkpoints import checkpoint
from pipeline.checkpoints.checkpoint import CheckpointError, scan
from pipeline.core.schema import ModelConfig
from pipeline.runner import StageError
from tests.helpers import ARCH, SYN, assert_same_weights, entry, file_digests, to_pickle


@pytest.fixture(scope="module")
def safetensors_dir(tmp_path_factory):
    from pipeline.checkpoints import synthetic

    return synthetic.materialize("t", ARCH, SYN, tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def pickle_dir(safetensors_dir, tmp_path_factory):
    return to_pickle(safetensors_dir, tmp_path_factory.mktemp("pickle") / "ckpt")


def test_refused_without_opt_in_with_the_reason_and_the_fix(load, pickle_dir):
    before = file_digests(pickle_dir)
    with pytest.raises(CheckpointError) as err:
        scan(pickle_dir)
    msg = str(err.value)
    assert msg.startswith(
        f"{pickle_dir}: only pickle weights here (pytorch_model.bin.index.json, pytorch_model-00001-of-"
    )
    assert "pytorch_model.bin.index.json" in msg and "no model.safetensors or model.safetensors.index.json" in msg
    assert (
        "arbitrary code" in msg
        and "Fix: model.allow_pickle=true" in msg
        and "convert the weights to safetensors" in msg
    )
    with pytest.raises(StageError) as err:
        load(f"model.path={pickle_dir}")
    assert err.value.stage == "config_merge" and "model.allow_pickle=true" in str(err.value)
    assert file_digests(pickle_dir) == before


def test_scan_lists_pickle_shards_like_their_safetensors(safetensors_dir, pickle_dir):
    st, pk = scan(safetensors_dir), scan(pickle_dir, allow_pickle=True)
    assert pk.format == "pickle" and st.format == "safetensors"
    assert [f.name for f in pk.files] == [
        f.name.replace("model-", "pytorch_model-").replace(".safetensors", ".bin") for f in st.files
    ]
    assert pk.tensor_names == st.tensor_names == set(pk.weight_map)
    assert pk.to_record()["format"] == "pickle" and st.to_record()["format"] == "safetensors"
    assert len(pk.fingerprint) == 16 and pk.fingerprint == scan(pickle_dir, allow_pickle=True).fingerprint
    assert pk.fingerprint != st.fingerprint


def test_single_file_and_fingerprint_follows_the_layout(safetensors_dir, tmp_path):
    single = to_pickle(safetensors_dir, tmp_path / "single", sharded=False)
    ck = scan(single, allow_pickle=True)
    assert [f.name for f in ck.files] == ["pytorch_model.bin"] and ck.weight_map == {}
    assert ck.tensor_names == scan(safetensors_dir).tensor_names
    tensors = torch.load(single / "pytorch_model.bin", weights_only=True)
    tensors["lm_head.weight"] = tensors["lm_head.weight"][:, :-1].clone()  # a shape change, nearly the same size
    torch.save(tensors, single / "pytorch_model.bin")
    assert scan(single, allow_pickle=True).fingerprint != ck.fingerprint


def test_safetensors_are_preferred_when_both_are_there(safetensors_dir, tmp_path):
    both = to_pickle(safetensors_dir, tmp_path / "both")
    for f in safetensors_dir.iterdir():
        if f.name != "config.json":
            shutil.copy(f, both / f.name)
    for allow in (False, True):
        ck = scan(both, allow_pickle=allow)
        assert ck.format == "safetensors" and all(f.suffix == ".safetensors" for f in ck.files)


@pytest.mark.parametrize("quant", ["none", "nf4", "int8"])
def test_opted_in_both_streamers_load_the_same_weights_as_safetensors(load, safetensors_dir, pickle_dir, quant):
    before = file_digests(pickle_dir)
    original, *_ = load(f"model.path={safetensors_dir}", f"quant={quant}")
    for stream in ("bounded", "transformers"):  # the bounded one's read-ahead: test_reader_... with prefetch=2
        model, record, _ = load(
            f"model.path={pickle_dir}", "model.allow_pickle=true", f"quant={quant}", f"stages/stream={stream}"
        )
        assert record["checkpoint"]["format"] == "pickle"
        if stream == "bounded":  # every tensor read: 2 layers of 9, embeddings, norm, head
            assert entry(record, "stream")["facts"]["tensors"] == 21
        assert_same_weights(original, model)
    assert file_digests(pickle_dir) == before


def test_tied_weights_stored_twice_load_tied(load, tmp_path):
    """Old `.bin` checkpoints store a tied head under both names, one storage: it still loads tied."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(**{**ARCH, "model_type": "qwen2", "tie_word_embeddings": True, "dtype": "bfloat16"})
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(tmp_path / "st")
    ckpt = tmp_path / "pk"
    ckpt.mkdir()
    shutil.copy(tmp_path / "st" / "config.json", ckpt)
    tensors = load_file(tmp_path / "st" / "model.safetensors")
    torch.save(tensors | {"lm_head.weight": tensors["model.embed_tokens.weight"]}, ckpt / "pytorch_model.bin")
    original, *_ = load(f"model.path={tmp_path / 'st'}", "quant=none")
    for stream in ("bounded", "transformers"):
        model, *_ = load(f"model.path={ckpt}", "model.allow_pickle=true", "quant=none", f"stages/stream={stream}")
        assert model.lm_head.weight is model.model.embed_tokens.weight
        assert_same_weights(original, model)


@pytest.mark.parametrize("prefetch", [0, 2])
def test_reader_yields_owned_copies_in_the_safetensors_order(safetensors_dir, pickle_dir, prefetch):
    from stages.stream.reader import read_tensors

    st = [(k, t) for _, k, t in read_tensors(scan(safetensors_dir).files, prefetch)]
    pk = [(s.name, k, t) for s, k, t in read_tensors(scan(pickle_dir, allow_pickle=True).files, prefetch)]
    assert [k for _, k, _ in pk] == [k for k, _ in st]
    for (_, t), (shard, key, p) in zip(st, pk, strict=True):
        assert torch.equal(t, p) and p.dtype == t.dtype and p.is_contiguous(), (shard, key)
    # copies, not views of the shards' memory maps, which would then stay mapped as long as the model lives
    maps = Path("/proc/self/maps")
    if maps.exists():
        assert str(pickle_dir) not in maps.read_text()


def test_only_tensors_are_ever_unpickled(safetensors_dir, tmp_path):
    marker = tmp_path / "code-ran"

    class Payload:  # unpickling it would call os.mkdir(marker): code chosen by whoever wrote the file
        def __reduce__(self):
            return os.mkdir, (str(marker),)

    ckpt = to_pickle(safetensors_dir, tmp_path / "evil", sharded=False)
    tensors = torch.load(ckpt / "pytorch_model.bin", weights_only=True)
    torch.save(tensors | {"extra": Payload()}, ckpt / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="holds objects other than tensors.*weights-only"):
        scan(ckpt, allow_pickle=True)
    assert not marker.exists()


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: p.write_bytes(p.read_bytes()[:-200]), "corrupt or truncated torch.save file"),
        (lambda p: p.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\n"), "git lfs pull"),
        (
            lambda p: torch.save(torch.load(p, weights_only=True), p, _use_new_zipfile_serialization=False),
            "legacy \\(pre-1.6\\) format, which cannot be memory-mapped",
        ),
        (lambda p: torch.save([torch.ones(2)], p), "holds a list, not a state dict"),
        (lambda p: torch.save({"model": {}, "step": 3}, p), "entry 'model' holds a dict"),
    ],
    ids=["truncated", "lfs", "legacy", "list", "nested"],
)
def test_broken_pickle_shards_are_named(safetensors_dir, tmp_path, damage, message):
    ckpt = to_pickle(safetensors_dir, tmp_path / "broken")
    shard = sorted(ckpt.glob("*.bin"))[1]
    damage(shard)
    with pytest.raises(CheckpointError, match=f"{shard.name}: .*{message}"):
        scan(ckpt, allow_pickle=True)


def test_hub_fetches_pickle_shards_only_for_an_opt_in_and_no_safetensors(pickle_dir, tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    def snapshot_download(repo_id, revision=None, allow_patterns=()):
        calls.append(list(allow_patterns))
        dst = tmp_path / f"snapshot{len(calls)}"
        dst.mkdir()
        for f in pickle_dir.iterdir():
            if any(fnmatch.fnmatch(f.name, p) for p in allow_patterns):
                shutil.copy(f, dst / f.name)
        return str(dst)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    refused = checkpoint.locate(ModelConfig(name="t", hub_id="org/t"), str(tmp_path))
    assert not list(refused.glob("*.bin")) and len(calls) == 1
    with pytest.raises(CheckpointError, match="(?s)only pickle weights here.*model.allow_pickle=true"):
        scan(refused)  # the index came with *.json: the message still says what the repo holds
    path = checkpoint.locate(ModelConfig(name="t", hub_id="org/t", allow_pickle=True), str(tmp_path))
    assert scan(path, allow_pickle=True).format == "pickle" and "pytorch_model*.bin" in calls[-1]


def test_a_plan_reads_pickle_shards_sizes_without_loading_them(load, pickle_dir):
    _, record, _ = load(f"model.path={pickle_dir}", "model.allow_pickle=true", "plan=true")
    assert record["status"] == "planned" and record["checkpoint"]["format"] == "pickle"
    with pytest.raises(StageError, match="model.allow_pickle=true"):
        load(f"model.path={pickle_dir}", "plan=true")  # refused by a plan as by a load
