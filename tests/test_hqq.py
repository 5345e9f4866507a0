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


# shapes x settings for the fast path alone: odd block counts, several blocks a thread, one block, 3-bit padding
FAST_CASES = [
    ((256, 512), 4, 64),
    ((384, 320), 3, 64),
    ((96, 512), 2, 16),
    ((640, 256), 8, 128),
    ((64, 256), 1, 8),
    ((1024, 768), 4, 32),
    ((128, 4096), 4, 128),
]


def awkward_weight(shape, dtype, seed):
    """Random weights with the cases that take other branches: a constant group (hqq's small-range scale),
    exact zeros and negative zeros, and a wide outlier."""
    torch.manual_seed(seed)
    w = torch.randn(shape) * 0.02
    w[0, :64] = 0.5
    w[1, ::7] = 0.0
    w[2, ::5] = -0.0
    w[3, 3] = 4.0
    return w.to(dtype)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,nbits,group", FAST_CASES, ids=[f"{s[0]}x{s[1]}-b{n}-g{g}" for s, n, g in FAST_CASES])
def test_fast_quantizer_equals_hqqlinear_bit_for_bit(shape, nbits, group, dtype, threads, monkeypatch):
    from stages.backends.hqq import quantize as fast

    monkeypatch.setattr(fast, "BLOCK_ELEMENTS", 4096)  # many blocks even on these small weights
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        w = awkward_weight(shape, dtype, seed=nbits * 1000 + group)
        bias = torch.randn(shape[0]).to(dtype)
        config = BaseQuantizeConfig(nbits=nbits, group_size=group, axis=1)
        assert fast.fast_settings(config, "cpu") is not None
        linear = torch.nn.Linear(shape[1], shape[0])
        linear.weight.data, linear.bias.data = w.clone(), bias.clone()
        ref = HQQLinear(linear, config, del_orig=True, compute_dtype=dtype, device="cpu")
        ours = fast.make_layer(w, bias, config, dtype)
    finally:
        torch.set_num_threads(before)
    assert ours.W_q.dtype == ref.W_q.dtype and torch.equal(ours.W_q, ref.W_q)
    assert set(ours.meta) == set(ref.meta)
    for key, value in ref.meta.items():
        if isinstance(value, torch.Tensor):
            assert value.dtype == ours.meta[key].dtype and torch.equal(value, ours.meta[key]), key
        else:
            assert value == ours.meta[key], key
    assert torch.equal(ours.bias, ref.bias)
    x = torch.randn(3, shape[1]).to(dtype)
    assert torch.equal(ours(x), ref(x))
    assert set(vars(ours)) == set(vars(ref)) and ours.quant_config == ref.quant_config


def test_fast_quantizer_leaves_other_settings_to_hqq():
    from stages.backends.hqq.quantize import fast_settings

    assert fast_settings(BaseQuantizeConfig(nbits=4, group_size=64, axis=1), "cpu") is not None
    assert fast_settings(BaseQuantizeConfig(nbits=4, group_size=64, axis=0), "cpu") is None  # column means
    assert fast_settings(BaseQuantizeConfig(nbits=4, group_size=64, axis=1), "cuda") is None  # hqq's fp16 path
    assert fast_settings(BaseQuantizeConfig(nbits=4, group_size=None, axis=1), "cpu") is None
