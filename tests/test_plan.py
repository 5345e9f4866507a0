"""plan=true: footprint and peak against real loads, device maps for machines not here, offload, no weight read."""

from __future__ import annotations

import json
import re
import shlex

import pytest
import torch

from pipeline import compose
from pipeline.checkpoints import checkpoint
from pipeline.core.placement import compact_names
from pipeline.core.schema import SETUP
from pipeline.isolate import run_isolated
from pipeline.plan.describe import gib
from pipeline.plan.step import PLAN_KINDS
from pipeline.runner import StageError
from tests.helpers import TORCHAO_QUANTO_SCHEMES, run_cli

QUANTS = ["none", "nf4", "nf4_double", "fp4", "fp4_double", "int8"]
# TinyLlama-1.1B's shapes at 2 of its 22 layers: its 32000 x 2048 embeddings (unquantized) next to 4-bit
# layers, a 440 MB checkpoint that loads in seconds
MID = ["model=tinyllama_1_1b", "model.source=synthetic", "model.architecture.num_hidden_layers=2"]
TIED = ["model.architecture.tie_word_embeddings=true"]
MODELS = {"tiny_llama": [], "tinyllama_1_1b_2l": MID, "tiny_llama_tied": TIED}
# the mid-size model's twelve plan-and-load pairs take minutes: they run with the slow tests (CI runs both)
MODEL_PARAMS = [pytest.param("tiny_llama"), pytest.param("tinyllama_1_1b_2l", marks=pytest.mark.slow)]
TWO_GPUS = "device_map.max_memory={0: 24GiB, 1: 24GiB, cpu: 64GiB}"


def plan_of(record: dict) -> dict:
    assert record["status"] == "planned", record.get("error")
    return next(s["facts"] for s in record["stages"] if s["stage"] == "plan")


@pytest.fixture(scope="module")
def plan_and_load(cache_dir, tmp_path_factory):
    """(model, quant) -> (plan record, load record), each run in a fresh process as the CLI runs them."""
    done: dict[tuple[str, str], tuple[dict, dict]] = {}

    def run(model: str, quant: str) -> tuple[dict, dict]:
        if (model, quant) not in done:
            overrides = [f"cache_dir={cache_dir}", "stages.stream.progress=false", f"quant={quant}", *MODELS[model]]
            # built here, not inside the measured load: writing a checkpoint raises the writer's RSS
            checkpoint.locate(compose(overrides).model, str(cache_dir))
            out = tmp_path_factory.mktemp(f"{model}-{quant}".replace("/", "-"))
            plan = run_isolated(compose([*overrides, "plan=true"]), out / "plan").record
            load = run_isolated(compose(overrides), out / "load").record
            done[model, quant] = (plan, load)
        return done[model, quant]

    return run


@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("model", MODEL_PARAMS)
def test_planned_footprint_is_within_3_percent_of_the_loaded_model(plan_and_load, model, quant):
    plan, load = plan_and_load(model, quant)
    assert load["status"] == "ok", load.get("error")
    planned, real = plan["plan"]["footprint_bytes"], load["footprint_bytes"]
    assert abs(planned - real) <= 0.03 * real, (planned, real)


@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("model", MODEL_PARAMS)
def test_planned_peak_is_within_10_percent_of_the_measured_peak(plan_and_load, model, quant):
    plan, load = plan_and_load(model, quant)
    measured = max(s["metrics"]["rss_peak_mb"] for s in load["stages"]) * 2**20
    predicted = plan["plan"]["predicted_peak_bytes"]
    assert abs(predicted - measured) <= 0.10 * measured, (predicted / 2**20, measured / 2**20)
    # the prediction holds the model on top of the process (but for the weights left as views of the file, which
    # are not read): not a figure the stages before the load set
    facts = plan_of(plan)
    assert predicted >= facts["base_rss_bytes"] + plan["plan"]["footprint_bytes"] - facts["mapped_bytes"]
    assert (facts["mapped_bytes"] > 0.9 * plan["plan"]["footprint_bytes"]) == (quant == "none")


# every scheme of the other backends (stages/backends/): the plan asks the backend for sizes and kernels
BACKEND_QUANTS = [
    *TORCHAO_QUANTO_SCHEMES,
    "hqq/b4_g64",
    "hqq/b8_g64",
    "hqq/b3_g64",
    "hqq/b2_g16",
]


@pytest.mark.parametrize("quant", BACKEND_QUANTS)
def test_backend_plan_footprint_equals_and_peak_within_10_percent(plan_and_load, quant):
    plan, load = plan_and_load("tiny_llama", quant)
    assert load["status"] == "ok", load.get("error")
    assert plan["plan"]["footprint_bytes"] == load["footprint_bytes"]
    measured = max(s["metrics"]["rss_peak_mb"] for s in load["stages"]) * 2**20
    predicted = plan["plan"]["predicted_peak_bytes"]
    assert abs(predicted - measured) <= 0.10 * measured, (predicted / 2**20, measured / 2**20)


HELD_CASES = [("tiny_llama", q) for q in [*QUANTS[1:], *BACKEND_QUANTS]] + [
    ("tiny_llama_tied", q) for q in ["nf4", "torchao/int8_weight_only", "quanto/int4", "hqq/b4_g64"]
]


@pytest.mark.parametrize(("model", "quant"), HELD_CASES)
def test_planned_held_bytes_equal_the_storage_the_loaded_model_holds(plan_and_load, model, quant):
    """The plan's held_bytes (each backend's size model of its data and state) against the load's measure of
    every storage its model reaches (pipeline/core/held.py), per device, to the byte; with tied embeddings the
    lm_head holds nothing of its own."""
    plan, load = plan_and_load(model, quant)
    assert load["status"] == "ok", load.get("error")
    measured = next(s["facts"] for s in load["stages"] if s["stage"] == "postprocess")
    assert plan["plan"]["held_bytes_per_device"] == measured["held_bytes_per_device"]
    assert plan["plan"]["held_bytes"] == measured["held_bytes"]
    # the footprint stays get_memory_footprint()'s count, which differs: logical dtypes, state left out
    assert plan["plan"]["footprint_bytes"] == load["footprint_bytes"] != measured["held_bytes"]


def test_held_bytes_reach_the_inner_tensors_and_the_state_beside_each_weight(load):
    """The measure itself, against the tensors counted by hand: torchao's qdata, scale and zero point inside its
    tensor subclass; bitsandbytes' packed data and its double-quantized QuantState; tied weights once."""
    from pipeline.core.held import held_bytes

    model, _, _ = load("quant=torchao/int8_weight_only")
    layer = model.model.layers[0].self_attn.q_proj
    w = layer.weight
    by_hand = w.qdata.nbytes + w.scale.nbytes + w.zero_point.nbytes
    assert held_bytes(torch.nn.Sequential(layer)) == {"cpu": by_hand} and by_hand < w.numel() * w.element_size()

    model, _, _ = load("quant=nf4_double")
    layer = model.model.layers[0].self_attn.q_proj
    state = layer.weight.quant_state
    parts = [layer.weight, state.absmax, state.code, state.offset, state.state2.absmax, state.state2.code]
    assert held_bytes(torch.nn.Sequential(layer)) == {"cpu": sum(t.nbytes for t in parts)}

    tied = torch.nn.Sequential(torch.nn.Embedding(8, 4), torch.nn.Linear(4, 8, bias=False))
    tied[1].weight = tied[0].weight
    assert held_bytes(tied) == {"cpu": 8 * 4 * 4}


def test_plan_runs_the_stages_up_to_device_map_and_reads_no_weight(load, monkeypatch):
    def no_reading(*args, **kwargs):
        raise AssertionError("a plan read a weight")

    monkeypatch.setattr("stages.stream.bounded.read_tensors", no_reading)
    monkeypatch.setattr("stages.stream.reader.MappedShard.tensor", no_reading)
    monkeypatch.setattr("stages.stream.reader._pickle_tensors", no_reading)
    model, record, run_dir = load("plan=true", "quant=nf4_double")
    assert model is None
    on_disk = json.loads((run_dir / "run.json").read_text())
    assert on_disk["status"] == "planned"
    assert [s["stage"] for s in on_disk["stages"]] == [SETUP, *PLAN_KINDS, "plan"]
    assert on_disk["plan"] == {k: plan_of(on_disk)[k] for k in on_disk["plan"]}
    summary = on_disk["plan"]
    assert summary["fits"] and summary["over_bytes"] == 0
    assert sum(summary["per_device_bytes"].values()) == summary["footprint_bytes"] + summary["quant_state_bytes"]
    facts = plan_of(on_disk)
    assert set(facts["unquantized"]["modules"]) == {"model.embed_tokens", "lm_head"}
    assert facts["unquantized"]["skipped"] == ["lm_head"]
    assert facts["largest_layer"]["bytes"] == max(facts["unquantized"]["modules"].values())


def llama_bytes(arch: dict, linear_bytes: float, other_bytes: int) -> float:
    """A Llama checkpoint's weights by hand from its config: linear layers at `linear_bytes` per weight,
    embeddings, lm_head and norms at `other_bytes`."""
    h, i, layers, v = arch["hidden_size"], arch["intermediate_size"], arch["num_hidden_layers"], arch["vocab_size"]
    kv = h // arch["num_attention_heads"] * arch["num_key_value_heads"]
    linear = layers * (2 * h * h + 2 * h * kv + 3 * h * i)
    other = 2 * v * h + (2 * layers + 1) * h
    return linear * linear_bytes + other * other_bytes


@pytest.mark.parametrize("quant,linear_bytes", [("none", 2), ("int8", 1), ("nf4", 0.5)])
def test_70b_plan_from_the_model_yaml_alone_matches_the_architecture(load, cache_dir, quant, linear_bytes):
    _, record, _ = load("plan=true", "model=llama2_70b", f"quant={quant}")
    facts = plan_of(record)
    arch = compose(["model=llama2_70b"]).model.architecture
    rotary = arch["hidden_size"] // arch["num_attention_heads"] // 2 * 4 * 2  # inv_freq and its original, fp32
    assert facts["architecture_from"] == "model YAML" and record["checkpoint"] is None
    assert facts["footprint_bytes"] == llama_bytes(arch, linear_bytes, 2) + rotary
    assert facts["tensors"] == 3 + 9 * arch["num_hidden_layers"]
    # the 10 GB shards of the real checkpoint are read one after another: at most a few tensors ahead
    assert facts["largest_transient"]["bytes"] < facts["footprint_bytes"] / 10


def test_hub_model_without_a_local_copy_is_planned_offline(load, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _, record, _ = load("plan=true", "model=llama2_7b", "quant=nf4_double")
    assert plan_of(record)["architecture_from"] == "model YAML"
    with pytest.raises(StageError, match="model.source=synthetic"):
        load("model=llama2_7b", "quant=nf4_double")  # a load still needs the weights


@pytest.mark.parametrize("quant", ["torchao/int8_weight_only", "quanto/int4", "hqq/b4_g64", "bnb/nf4_double"])
def test_every_backend_plans_a_model_whose_weights_are_not_here(load, quant):
    """No checkpoint: the quantizer gets no files (torchao's once read the first of an empty list)."""
    _, record, _ = load("plan=true", "model=llama2_70b", f"quant={quant}")
    facts = plan_of(record)
    assert record["checkpoint"] is None and facts["architecture_from"] == "model YAML"
    assert 0 < facts["held_bytes"] < 70e9 * 2  # every linear layer quantized: less than the fp16 model


THREE_GPUS = "device_map.max_memory={0: 24GiB, 1: 24GiB, 2: 24GiB, cpu: 64GiB}"


@pytest.mark.parametrize(
    "policy,budget,gpus", [("balanced", TWO_GPUS, 2), ("sequential", TWO_GPUS, 2), ("balanced_low_0", THREE_GPUS, 3)]
)
def test_a_multi_gpu_layout_is_planned_on_a_machine_without_gpus(load, policy, budget, gpus):
    _, record, _ = load("plan=true", "model=llama2_70b", "quant=nf4", f"device_map={policy}", budget)
    facts = plan_of(record)
    assert set(facts["device_map"].values()) <= set(range(gpus))
    per_device = facts["per_device_bytes"]
    assert sum(per_device.values()) == facts["footprint_bytes"] + facts["quant_state_bytes"]
    assert all(facts["predicted_peak_bytes_per_device"][d] >= per_device[d] for d in per_device)
    env = next(s["facts"] for s in record["stages"] if s["stage"] == "env_check")
    assert env.get("planned_gpus_not_here", []) == list(range(torch.cuda.device_count(), gpus))
    if policy == "balanced":  # both GPUs, GPU 0 not filled first
        _, sequential, _ = load("plan=true", "model=llama2_70b", "quant=nf4", "device_map=sequential", budget)
        assert set(per_device) == {"0", "1"}
        assert per_device["0"] < plan_of(sequential)["per_device_bytes"]["0"]
    if policy == "sequential":  # GPU 0 filled first
        assert per_device["0"] > per_device["1"]
    if policy == "balanced_low_0":  # GPU 0 kept as empty as the others allow
        assert per_device.get("0", 0) < min(per_device["1"], per_device["2"])


def test_a_load_naming_absent_gpus_fails_before_work_and_points_to_plan(load):
    absent = torch.cuda.device_count()  # one past the last GPU here, whatever the machine
    with pytest.raises(StageError, match="plan=true") as err:
        load("device_map=balanced", f"device_map.max_memory={{{absent}: 24GiB, cpu: 64GiB}}")
    assert err.value.stage == "env_check" and f"GPU {absent}" in str(err.value)


def test_a_model_over_its_budget_fails_in_device_map_saying_by_how_much(load):
    budget = "device_map.max_memory={cpu: 3MB}"
    _, planned, _ = load("plan=true", "quant=none", budget)
    over = plan_of(planned)["does_not_fit"]
    assert not planned["plan"]["fits"] and planned["plan"]["over_bytes"] == over["over_bytes"] > 0
    with pytest.raises(StageError) as err:
        load("quant=none", budget)
    assert err.value.stage == "device_map"
    message = str(err.value)
    assert "does not fit" in message and "device_map.offload_folder=" in message
    assert gib(over["over_bytes"]) in message and compact_names(over["over_modules"]) in message


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.arange(3, 15).unsqueeze(0)).logits


def test_disk_offload_of_an_unquantized_model_loads_and_computes_the_same(load, tmp_path):
    reference, *_ = load("quant=none")
    folder = tmp_path / "offload"
    model, record, _ = load("quant=none", "device_map.max_memory={cpu: 4MB}", f"device_map.offload_folder={folder}")
    device_map = next(s["facts"] for s in record["stages"] if s["stage"] == "device_map")["device_map"]
    assert "disk" in device_map.values() and list(folder.glob("*.safetensors"))
    assert torch.allclose(logits(model), logits(reference))


def test_quantized_offload_names_the_settings_and_the_suggested_map_loads(load, tmp_path):
    folder = f"device_map.offload_folder={tmp_path / 'offload'}"
    budget = "device_map.max_memory={cpu: 3MB}"
    with pytest.raises(StageError, match=r"quant\.llm_int8_enable_fp32_cpu_offload=true") as err:
        load("quant=nf4", budget, folder)
    assert err.value.stage == "device_map"
    with pytest.raises(StageError, match="device_map=explicit device_map.map=") as err:
        load("quant=nf4", "quant.llm_int8_enable_fp32_cpu_offload=true", budget, folder)
    suggested = shlex.split(re.search(r"(device_map=explicit device_map\.map='[^']*')", str(err.value)).group(1))
    model, record, _ = load("quant=nf4", "quant.llm_int8_enable_fp32_cpu_offload=true", *suggested, folder)
    assert record["status"] == "ok" and torch.isfinite(logits(model)).all()


def test_explicit_map_and_gpu_budget_overrides_replace_the_defaults():
    cfg = compose(["device_map=explicit", "device_map.map={model.layers: cpu, lm_head: disk}", TWO_GPUS])
    assert dict(cfg.device_map.map) == {"model.layers": "cpu", "lm_head": "disk"}
    assert dict(cfg.device_map.max_memory) == {0: "24GiB", 1: "24GiB", "cpu": "64GiB"}


def test_cli_prints_the_plan_of_a_70b_model(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    args = ["plan=true", "model=llama2_70b", "quant=nf4_double", f"cache_dir={cache_dir}", f"hydra.run.dir={run_dir}"]
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for line in ("footprint", "per device", "holds in memory", "largest layer", "unquantized", "device map",
                 "predicted peak"):  # fmt: skip
        assert f"  {line}" in proc.stdout
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "planned" and record["plan"]["footprint_bytes"] > 30 * 2**30
    assert [s["stage"] for s in record["stages"]] == [SETUP, *PLAN_KINDS, "plan"]


def test_a_module_an_explicit_map_leaves_out_is_planned_where_the_load_puts_it(load):
    """`model.rotary_emb` holds no weight, only a non-persistent buffer; a map that omits it leaves it to
    transformers, which puts it on the CPU: the planned bytes say so instead of a device 'None'."""
    layers = "device_map.map={model.embed_tokens: cpu, model.layers: cpu, model.norm: cpu, lm_head: cpu}"
    model, record, _ = load("device_map=explicit", layers)
    facts = next(s["facts"] for s in record["stages"] if s["stage"] == "device_map")
    assert set(facts["planned_bytes_per_device"]) == {"cpu"}
    assert model.model.rotary_emb.inv_freq.device.type == "cpu"
