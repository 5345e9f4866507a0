"""Synthetic checkpoints, other architectures through model.path, and pre-quantized round trips."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

from pipeline.checkpoints import synthetic
from tests.helpers import ARCH, SYN, assert_same_weights, entry


def test_synthetic_checkpoint_has_the_standard_sharded_layout(tmp_path):
    path = synthetic.materialize("t", ARCH, SYN, tmp_path)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    expected = {k for k in AutoModelForCausalLM.from_config(AutoConfig.for_model(**ARCH)).state_dict()}
    assert set(index["weight_map"]) == expected
    total = 0
    for shard in shards:
        with safe_open(path / shard, framework="pt") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                assert index["weight_map"][key] == shard and t.dtype == torch.float16
                total += t.numel() * 2
                if key.endswith("norm.weight"):
                    assert torch.equal(t, torch.ones_like(t))
                else:
                    assert 0.01 < t.float().std() < 0.03
    assert index["metadata"]["total_size"] == total
    assert AutoConfig.from_pretrained(path).hidden_size == 64


def test_synthetic_checkpoint_is_seeded_and_reused(tmp_path):
    a = synthetic.materialize("t", ARCH, SYN, tmp_path / "a")
    b = synthetic.materialize("t", ARCH, SYN, tmp_path / "b")
    c = synthetic.materialize("t", ARCH, SYN | {"seed": 1}, tmp_path / "a")
    mtime = os.stat(a / "config.json").st_mtime_ns
    assert synthetic.materialize("t", ARCH, SYN, tmp_path / "a") == a
    assert os.stat(a / "config.json").st_mtime_ns == mtime
    shard = sorted(p.name for p in a.glob("*.safetensors"))[0]
    assert (a / shard).read_bytes() == (b / shard).read_bytes() != (c / shard).read_bytes()


def test_tied_embeddings_are_not_stored(tmp_path):
    path = synthetic.materialize("q", {**ARCH, "model_type": "qwen2", "tie_word_embeddings": True}, SYN, tmp_path)
    weight_map = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    assert "lm_head.weight" not in weight_map and "model.embed_tokens.weight" in weight_map


def test_a_partial_checkpoint_is_never_taken_for_a_complete_one(tmp_path, monkeypatch):
    def die(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "_write_shard", die)
    with pytest.raises(KeyboardInterrupt):
        synthetic.materialize("t", ARCH, SYN, tmp_path)
    assert list((tmp_path / "synthetic").iterdir()) == []
    monkeypatch.undo()
    path = synthetic.materialize("t", ARCH, SYN, tmp_path)
    assert (path / "config.json").exists()


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
    """A Qwen2 checkpoint written by transformers' own save_pretrained (biases, tied embeddings, GQA)."""
    torch.manual_seed(0)
    config = AutoConfig.for_model(**{**ARCH, "model_type": "qwen2", "tie_word_embeddings": True, "dtype": "bfloat16"})
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    path = tmp_path_factory.mktemp("qwen2")
    model.save_pretrained(path, max_shard_size="100KB")
    return path


@pytest.mark.parametrize("stream", ["bounded", "transformers"])
def test_model_path_loads_another_architecture_its_config_wins(load, qwen2_dir, stream):
    model, record, _ = load("model=tiny_llama", f"model.path={qwen2_dir}", "quant=nf4", f"stages/stream={stream}")
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert model.lm_head.weight is model.model.embed_tokens.weight
    merge = entry(record, "config_merge")["facts"]
    assert merge["architecture_from_checkpoint"]["hidden_size"] == {"yaml": 256, "config.json": 64}
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


@pytest.mark.parametrize("model_name", ["mistral_7b", "qwen2_0_5b"])
def test_other_families_load_synthetic_at_small_size(load, model_name):
    shrink = [f"model.architecture.{k}={v}" for k, v in ARCH.items() if k != "model_type"]
    model, record, _ = load(
        f"model={model_name}", "model.source=synthetic", "model.synthetic.shard_size=100KB", *shrink
    )
    assert model.config.model_type == {"mistral_7b": "mistral", "qwen2_0_5b": "qwen2"}[model_name]
    assert record["status"] == "ok"


@pytest.mark.parametrize("quant", ["nf4", "nf4_double", "fp4", "int8"])
@pytest.mark.parametrize("stream", ["bounded", "transformers"])
def test_prequantized_round_trip(load, tmp_path, quant, stream):
    original, *_ = load(f"quant={quant}")
    saved = tmp_path / "saved"
    original.save_pretrained(saved)
    assert "quantization_config" in json.loads((saved / "config.json").read_text())
    for request in ("none", quant, "nf4_double" if quant != "nf4_double" else "fp4"):
        reloaded, record, _ = load(f"model.path={saved}", f"quant={request}", f"stages/stream={stream}")
        merge = entry(record, "config_merge")["facts"]
        assert merge["quantization_from"] == "checkpoint"
        assert entry(record, "quantizer")["facts"]["pre_quantized"] is True
        assert_same_weights(original, reloaded)
        if request not in ("none", quant):
            assert merge["ignored_request"], "a conflicting request must be recorded as ignored"
