"""The seven stages end to end on the default synthetic model: every quant option, both streamers."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.core.schema import SETUP, STAGE_KINDS
from pipeline.runner import StageError
from tests.conftest import assert_same_weights
from tests.helpers import entry

QUANTS = ["none", "nf4", "nf4_double", "fp4", "fp4_double", "int8"]
MODULE_TYPE = {"none": None, "int8": "Linear8bitLt"} | {q: "Linear4bit" for q in QUANTS[1:5]}


def logits(model, n: int = 12) -> torch.Tensor:
    ids = torch.arange(3, 3 + n).unsqueeze(0) % model.config.vocab_size
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("quant", QUANTS)
def test_every_quant_option_loads_and_gives_finite_logits(load, quant):
    model, record, _ = load(f"quant={quant}")
    assert record["status"] == "ok"
    types = {type(m).__name__ for m in model.modules()}
    assert (MODULE_TYPE[quant] in types) if MODULE_TYPE[quant] else not any("bit" in t for t in types)
    out = logits(model)
    assert out.shape == (1, 12, model.config.vocab_size)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("quant", QUANTS)
def test_swapping_the_streamer_gives_the_same_weights(load, quant):
    ours, *_ = load(f"quant={quant}", "stages/stream=bounded")
    reference, *_ = load(f"quant={quant}", "stages/stream=transformers")
    assert_same_weights(ours, reference)
    assert torch.equal(logits(ours), logits(reference))


def test_run_record_has_every_stage_with_metrics(load):
    _, record, run_dir = load()
    on_disk = json.loads((run_dir / "run.json").read_text())
    assert on_disk["status"] == "ok"
    assert [s["stage"] for s in on_disk["stages"]] == [SETUP, *STAGE_KINDS]
    for s in on_disk["stages"]:
        m = s["metrics"]
        assert m["wall_s"] >= 0 and m["cpu_s"] >= 0
        assert m["rss_peak_mb"] >= m["rss_end_mb"] > 0
        assert m["rss_peak_mb"] >= m["rss_start_mb"] > 0
    lines = [json.loads(line) for line in (run_dir / "stages.jsonl").read_text().splitlines()]
    assert [entry["stage"] for entry in lines] == [SETUP, *STAGE_KINDS]
    stream = entry(on_disk, "stream")["facts"]
    assert stream["shards"] == 5 and stream["tensors"] == 39
    assert stream["bytes_read"] == sum(s["bytes"] for s in stream["per_shard"])
    assert on_disk["footprint_bytes"] > 0
    assert on_disk["checkpoint"]["fingerprint"]
    assert set(on_disk["git"]) == {"commit", "dirty"}
    assert on_disk["versions"]["bitsandbytes"]
    assert on_disk["config"]["quant"]["name"] == "nf4"
    preprocess = entry(on_disk, "preprocess")["facts"]
    assert preprocess["weight_bytes_allocated"] == 0


def test_quantized_load_is_smaller_than_unquantized(load):
    none, *_ = load("quant=none")
    nf4, *_ = load("quant=nf4")
    int8, *_ = load("quant=int8")
    sizes = [m.get_memory_footprint() for m in (nf4, int8, none)]
    assert sizes == sorted(sizes) and sizes[0] < 0.6 * sizes[2]


@pytest.mark.parametrize("policy", ["auto", "balanced", "balanced_low_0", "sequential", "cpu", "explicit"])
def test_device_map_policies_load_on_this_machine(load, policy):
    model, record, _ = load(f"device_map={policy}")
    dm = entry(record, "device_map")["facts"]["device_map"]
    expected = "cpu" if not torch.cuda.is_available() else None
    if expected:
        assert set(dm.values()) == {expected}
    assert torch.isfinite(logits(model)).all()


@pytest.mark.parametrize(
    "dtype,torch_dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16), ("fp32", torch.float32)]
)
def test_dtype_sets_unquantized_layers(load, dtype, torch_dtype):
    model, *_ = load(f"dtype={dtype}", "quant=nf4")
    assert model.model.embed_tokens.weight.dtype == torch_dtype
    assert model.lm_head.weight.dtype == torch_dtype


def test_hub_model_offline_fails_in_first_stage_naming_both_fixes(load, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(StageError) as err:
        load("model=llama2_7b", "quant=nf4_double")
    assert err.value.stage == "config_merge"
    assert "model.path=" in str(err.value) and "model.source=synthetic" in str(err.value)


def test_failed_run_writes_a_complete_record(load, tmp_path):
    with pytest.raises(StageError):
        load("model=llama2_7b")
    record = json.loads((tmp_path / "run0" / "run.json").read_text())
    assert record["status"] == "failed" and record["failed_stage"] == "config_merge"
    assert "model.source=synthetic" in record["error"]
    assert [(s["stage"], s["status"]) for s in record["stages"]] == [(SETUP, "ok"), ("config_merge", "failed")]
