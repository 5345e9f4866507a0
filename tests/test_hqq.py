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
from tests.helpers import entry

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


# Pre-quantized HQQ checkpoints: written by transformers' save_pretrained, read as saved by the bounded streamer.


@pytest.fixture(scope="module")
def saved_hqq(tmp_path_factory):
    """tiny Qwen2 (biases, tied embeddings) quantized by us in 3 bits (int32 packing), then save_pretrained."""
    from pipeline import load as api_load

    tmp = tmp_path_factory.mktemp("hqq-saved")
    path = save("qwen2", tmp / "ck")
    model, _ = api_load([f"model.path={path}", "quant=hqq/b3_g64", "dtype=fp16"], run_dir=tmp / "run")
    model.save_pretrained(tmp / "saved")
    return model, tmp / "saved"


def hqq_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, HQQLinear)}


def test_hqq_checkpoint_loads_as_saved_by_the_bounded_streamer(load, saved_hqq):
    """Each layer equals the saved model's and what hqq's own load_state_dict makes of the same tensors; the
    logits equal the saved model's. (transformers 5.24's own load of it on a CPU is no reference: it skips every
    HQQ tensor and leaves the weights random, asserted last, so this test says when that changes.)"""
    from safetensors.torch import load_file

    saved_model, path = saved_hqq
    ours, record, _ = load(f"model.path={path}", "quant=none", "dtype=fp16")
    assert record["status"] == "ok" and entry(record, "quantizer")["facts"]["pre_quantized"] is True
    assert entry(record, "stream")["target"].endswith("BoundedStreamer")
    layers, saved_layers = hqq_layers(ours), hqq_layers(saved_model)
    assert layers.keys() == saved_layers.keys() and len(layers) == 7 * ours.config.num_hidden_layers
    tensors = load_file(next(path.glob("*.safetensors")))
    for name, layer in layers.items():
        config = {**saved_layers[name].quant_config, "offload_meta": False}  # its constructor pops the key
        own = HQQLinear(None, config, compute_dtype=torch.float16, device="cpu", initialize=False)
        own.load_state_dict({k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(name + ".")})
        for other in (saved_layers[name], own):
            assert torch.equal(layer.W_q, other.W_q) and layer.W_q.dtype == other.W_q.dtype == torch.int32
            assert (layer.bias is None and other.bias is None) or torch.equal(layer.bias, other.bias), name
            # hqq's own load keeps the stored weight settings in meta too; the saved layer's keys are a subset
            assert layer.meta.keys() == other.meta.keys() if other is own else other.meta.keys() <= layer.meta.keys()
            for key, value in other.meta.items():
                same = (
                    torch.equal(value, layer.meta[key]) if isinstance(value, torch.Tensor) else value == layer.meta[key]
                )
                assert same, f"{name}: meta {key}"
            assert layer.quant_config == other.quant_config
    assert (logits(ours) - logits(saved_model)).abs().max().item() == 0

    theirs, info = AutoModelForCausalLM.from_pretrained(path, device_map="cpu", output_loading_info=True)
    assert not hqq_layers(theirs) and any(k.endswith("q_proj.weight") for k in info["missing_keys"])


def test_transformers_streamer_refuses_an_hqq_checkpoint(load, saved_hqq):
    from pipeline.runner import StageError

    with pytest.raises(StageError, match="transformers' loader cannot read .* use stages/stream=bounded"):
        load(f"model.path={saved_hqq[1]}", "quant=none", "stages/stream=transformers")


def rewrite(src, dst, change):
    """A copy of the saved checkpoint folder with `change(name, tensor)` applied to its one shard."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    shard = next(dst.glob("*.safetensors"))
    tensors = {k: change(k, v) for k, v in load_file(shard).items()}
    save_file({k: v for k, v in tensors.items() if v is not None}, shard, metadata={"format": "pt"})
    return dst


def encoded(text: str) -> torch.Tensor:
    return torch.tensor([ord(c) for c in text], dtype=torch.uint8)


def test_hqq_checkpoint_settings_are_decoded_by_table_never_evaluated(load, saved_hqq, tmp_path):
    """hqq's own load_state_dict `eval`s the stored compute_dtype string: a checkpoint could run code. Ours
    refuses any name outside its table, naming the layer, the key and the valid names; the code never runs."""
    from pipeline.runner import StageError

    marker = tmp_path / "code-ran"
    code = f"__import__('pathlib').Path('{marker}').touch() or torch.float16"
    layer = "model.layers.0.self_attn.q_proj"
    bad = rewrite(saved_hqq[1], tmp_path / "bad", lambda k, v: encoded(code) if k == f"{layer}.compute_dtype" else v)
    with pytest.raises(StageError, match=f"{layer}.compute_dtype: .*valid: torch.float16, torch.bfloat16") as err:
        load(f"model.path={bad}", "quant=none")
    assert err.value.stage == "stream" and not marker.exists()


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda k, v: None if k.endswith("layers.1.mlp.up_proj.W_q") else v, "lack their HQQ tensors, e.g. "),
        (lambda k, v: torch.tensor(5, dtype=torch.int32) if k.endswith("q_proj.nbits") else v, "nbits: 5"),
        (lambda k, v: v[:-1] if k.endswith("layers.0.mlp.down_proj.W_q") else v, "down_proj.W_q: "),
        (lambda k, v: encoded("4bit_u8") if k.endswith("k_proj.packing") else v, "hqq packs them as '3bit_32'"),
    ],
    ids=["missing-W_q", "nbits", "W_q-shape", "packing"],
)
def test_broken_hqq_checkpoint_is_refused_with_the_layer_and_key(load, saved_hqq, tmp_path, change, message):
    from pipeline.runner import StageError

    bad = rewrite(saved_hqq[1], tmp_path / "bad", change)
    with pytest.raises(StageError, match=message):
        load(f"model.path={bad}", "quant=none")
