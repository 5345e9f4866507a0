"""Every backend through the same stages: the loaded model equals transformers' own load with the same config.

torchao and optimum-quanto quantize at load time in transformers too, so our bounded streamer's model must give
the logits of `from_pretrained` with the same quantization config, exactly (max difference 0), on tiny Llama and
on a second family (Qwen2). Checkpoints are written by transformers' own `save_pretrained` (as in
test_architectures.py).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from pipeline import compose
from stages import backends
from tests.families import TORCHAO_QUANTO_SCHEMES, logits, save
from tests.helpers import entry

# quant option -> what transformers gets for it (built by the backend, so the test checks the streamer, not
# the config translation, which test_backend_configs checks)
SCHEMES = TORCHAO_QUANTO_SCHEMES
FAMILIES = ["llama", "qwen2"]


@pytest.fixture(scope="module", params=FAMILIES)
def checkpoint(request, tmp_path_factory):
    return request.param, save(request.param, tmp_path_factory.mktemp(request.param))


def reference(path, quant: str):
    cfg = compose([f"quant={quant}"])
    from omegaconf import OmegaConf

    q = OmegaConf.to_object(cfg).quant
    hf = backends.for_quant(q).hf_config(q, torch.float16)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=hf, dtype=torch.float16, device_map="cpu")


@pytest.mark.parametrize("quant", SCHEMES)
def test_backend_load_equals_from_pretrained(load, checkpoint, quant):
    model_type, path = checkpoint
    ours, record, _ = load(f"model.path={path}", f"quant={quant}", "dtype=fp16")
    assert record["status"] == "ok"
    stream = entry(record, "stream")
    assert stream["target"].endswith("BoundedStreamer")
    ref = reference(path, quant)
    a, b = logits(ours), logits(ref)
    assert torch.isfinite(a).all()
    assert (a - b).abs().max().item() == 0, f"{model_type} {quant}: logits differ"
    assert ours.get_memory_footprint() == ref.get_memory_footprint()
    quantized = [n for n, p in ours.named_parameters() if type(p.data).__module__.startswith(("torchao", "optimum"))]
    quantized += [n for n, m in ours.named_modules() if type(m).__module__.startswith("optimum.quanto")]
    assert quantized, f"{quant}: nothing was quantized"
    facts = entry(record, "preprocess")["facts"]
    assert "note" not in facts  # the backend found the layers it quantizes


def test_backends_table_is_closed():
    assert set(backends.BACKENDS) == {"bnb", "torchao", "quanto", "hqq"}
    for name, cls in backends.BACKENDS.items():
        assert cls.__module__.startswith("stages.backends."), name


def test_torchao_checkpoint_saved_by_save_pretrained_loads_as_saved(load, tmp_path):
    """torchao can save: transformers' save_pretrained writes it, we load it as saved (quant=none) through the
    transformers streamer and get transformers' own load of it; the bounded streamer says it has no reader."""
    path = save("llama", tmp_path / "ck")
    ours, *_ = load(f"model.path={path}", "quant=torchao/int8_weight_only", "dtype=fp16")
    saved = tmp_path / "saved"
    ours.save_pretrained(saved)
    reloaded, record, _ = load(f"model.path={saved}", "quant=none", "stages/stream=transformers")
    assert entry(record, "config_merge")["facts"]["backend"] == "torchao"
    reference = AutoModelForCausalLM.from_pretrained(saved, device_map="cpu")
    assert (logits(reloaded) - logits(reference)).abs().max().item() == 0
    assert (logits(reloaded) - logits(ours)).abs().max().item() == 0
    from pipeline.runner import StageError

    with pytest.raises(
        StageError, match="which the bounded streamer has no reader for: use stages/stream=transformers"
    ):
        load(f"model.path={saved}", "quant=none")


def test_quanto_says_it_cannot_save():
    assert "cannot serialize" in backends.BACKENDS["quanto"].cannot_save
