"""The stages end to end on the default synthetic model: every quant option, both streamers."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.core.schema import SETUP, STAGE_KINDS
from pipeline.runner import StageError
from tests.helpers import assert_same_weights, entry, stage_facts

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


TWO_GPUS = "device_map.max_memory={0: 1GiB, 1: 1GiB, cpu: 8GiB}"  # room for the whole model on either GPU
EXPLICIT = {"model.embed_tokens": 1, "model.layers": 0, "model.rotary_emb": 0, "model.norm": 1, "lm_head": 1}
# Where each policy puts the model on those two GPUs. A plan, so the GPUs need not be here; the budget is the
# same for all, so only the policy can set the maps apart.
PLANNED_ON = {
    "auto": {0, 1},  # accelerate's auto is balanced when there are several GPUs
    "balanced": {0, 1},  # spread over both
    "balanced_low_0": {1},  # GPU 0 kept free (for generate's activations)
    "sequential": {0},  # GPU 0 filled first, and it holds everything
    "cpu": {"cpu"},
    "explicit": {0, 1},  # the map given, as given
}


@pytest.mark.parametrize("policy", list(PLANNED_ON))
def test_device_map_policies_load_here_and_place_a_two_gpu_plan_apart(load, policy):
    model, record, _ = load(f"device_map={policy}")
    dm = stage_facts(record, "device_map")["device_map"]
    expected = "cpu" if not torch.cuda.is_available() else None
    if expected:
        assert set(dm.values()) == {expected}
    assert torch.isfinite(logits(model)).all()

    given = ", ".join(f"{module}: {device}" for module, device in EXPLICIT.items())
    explicit = [f"device_map.map={{{given}}}"] if policy == "explicit" else []
    _, planned, _ = load("plan=true", f"device_map={policy}", TWO_GPUS, *explicit)
    dm, plan = stage_facts(planned, "device_map")["device_map"], stage_facts(planned, "plan")
    per_device = plan["per_device_bytes"]
    assert set(dm.values()) == PLANNED_ON[policy]
    assert set(per_device) == {str(d) for d in PLANNED_ON[policy]}
    assert sum(per_device.values()) == plan["footprint_bytes"] + plan["quant_state_bytes"]
    if policy in ("auto", "balanced"):  # neither GPU gets most of it
        assert min(per_device.values()) > 0.3 * sum(per_device.values()), per_device
        assert dm["model.embed_tokens"] == 0 and dm["lm_head"] == 1
    if policy == "explicit":
        assert dm == EXPLICIT


def test_auto_is_balanced_on_several_gpus_and_the_other_policies_differ(load):
    maps = {
        policy: stage_facts(load("plan=true", f"device_map={policy}", TWO_GPUS)[1], "device_map")["device_map"]
        for policy in ("auto", "balanced", "balanced_low_0", "sequential")
    }
    assert maps["auto"] == maps["balanced"]
    assert len({json.dumps(m, sort_keys=True) for m in maps.values()}) == 3


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
