"""HQQ through our streamer equals hqq's own quantization of the same weights.

transformers 5 cannot quantize with HQQ at load time, so the reference is a full-precision load followed by
hqq's own `HQQLinear` on each linear layer with the same settings: every quantized layer's W_q, scale and zero
must be equal, and the logits of the two models identical.
"""

from __future__ import annotations

import pytest
import torch
from hqq.core.quantize import BaseQuantizeConfig, HQQLinear
from transformers import AutoModelForCausalLM

from tests.families import logits, save

SCHEMES = {"hqq/b4_g64": (4, 64), "hqq/b8_g64": (8, 64), "hqq/b3_g64": (3, 64), "hqq/b2_g16": (2, 16)}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save("llama", tmp_path_factory.mktemp("llama"))


def hqq_reference(path, nbits: int, group_size: int):
    """Full precision, then hqq's own HQQLinear on every linear layer but lm_head (HqqConfig's default skip)."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float16, device_map="cpu")
    config = BaseQuantizeConfig(nbits=nbits, group_size=group_size, axis=1)
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            parent, _, child = name.rpartition(".")
            layer = HQQLinear(module, config, del_orig=True, compute_dtype=torch.float16, device="cpu")
            setattr(model.get_submodule(parent), child, layer)
    return model


@pytest.mark.parametrize("quant", list(SCHEMES))
def test_hqq_layers_equal_hqq_own_quantization(load, checkpoint, quant):
    ours, record, _ = load(f"model.path={checkpoint}", f"quant={quant}", "dtype=fp16")
    assert record["status"] == "ok"
    ref = hqq_reference(checkpoint, *SCHEMES[quant])
    layers = {n: m for n, m in ours.named_modules() if isinstance(m, HQQLinear)}
    ref_layers = {n: m for n, m in ref.named_modules() if isinstance(m, HQQLinear)}
    assert layers.keys() == ref_layers.keys() and len(layers) == 7 * ours.config.num_hidden_layers
    for name, layer in layers.items():
        other = ref_layers[name]
        assert torch.equal(layer.W_q, other.W_q), f"{name}: W_q differs"
        for key in ("scale", "zero"):
            assert torch.equal(layer.meta[key], other.meta[key]), f"{name}: {key} differs"
        assert layer.meta["shape"] == other.meta["shape"]
    assert (logits(ours) - logits(ref)).abs().max().item() == 0
