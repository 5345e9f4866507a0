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
from tests.families import logits, save
from tests.helpers import TORCHAO_QUANTO_SCHEMES, entry

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


TORCHAO_CPU = [q for q in SCHEMES if q.startswith("torchao/")]


@pytest.fixture(scope="module")
def torchao_saved(tmp_path_factory):
    """Per torchao CPU scheme: the tiny Llama we loaded quantized, and its save_pretrained folder."""
    from pipeline import load as api_load

    tmp = tmp_path_factory.mktemp("torchao-saved")
    path = save("llama", tmp / "ck")
    saved = {}
    for quant in TORCHAO_CPU:
        name = quant.replace("/", "-")
        model, _ = api_load([f"model.path={path}", f"quant={quant}", "dtype=fp16"], run_dir=tmp / f"run-{name}")
        model.save_pretrained(tmp / name)
        saved[quant] = (model, tmp / name)
    return saved


@pytest.mark.parametrize("stream", ["bounded", "transformers"])
@pytest.mark.parametrize("quant", TORCHAO_CPU)
def test_torchao_checkpoint_saved_by_save_pretrained_loads_as_saved(load, torchao_saved, quant, stream):
    """torchao can save: transformers' save_pretrained writes it; both our streamers load it as saved
    (quant=none: the checkpoint's own config), with transformers' own load's logits and footprint."""
    original, saved = torchao_saved[quant]
    reloaded, record, _ = load(f"model.path={saved}", "quant=none", f"stages/stream={stream}")
    assert entry(record, "config_merge")["facts"]["backend"] == "torchao"
    assert entry(record, "quantizer")["facts"]["pre_quantized"] is True
    reference = AutoModelForCausalLM.from_pretrained(saved, device_map="cpu")
    assert (logits(reloaded) - logits(reference)).abs().max().item() == 0
    assert (logits(reloaded) - logits(original)).abs().max().item() == 0
    assert reloaded.get_memory_footprint() == reference.get_memory_footprint()
    weight = reloaded.model.layers[0].self_attn.q_proj.weight
    assert type(weight) is type(original.model.layers[0].self_attn.q_proj.weight)
    assert type(weight).__module__.startswith("torchao")


def test_torchao_checkpoint_metadata_naming_another_torch_attribute_is_refused(load, torchao_saved, tmp_path):
    """torchao resolves a metadata `torch.dtype` node with getattr(torch, name): a checkpoint could name any
    attribute of torch. Ours checks each name against the dtypes torchao writes, before anything is read."""
    import json
    import shutil

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from pipeline.runner import StageError

    bad = tmp_path / "bad"
    shutil.copytree(torchao_saved["torchao/int8_weight_only"][1], bad)
    shard = next(bad.glob("*.safetensors"))
    with safe_open(str(shard), framework="pt") as f:
        metadata = f.metadata()
    key = next(k for k, v in metadata.items() if '"torch.dtype"' in v)
    metadata[key] = metadata[key].replace('"_data": "float16"', '"_data": "load"')
    assert '"load"' in metadata[key]
    save_file(load_file(shard), shard, metadata=metadata)
    with pytest.raises(StageError, match=f"metadata '{key}' names dtype 'load'; valid: float16, bfloat16") as err:
        load(f"model.path={bad}", "quant=none")
    assert err.value.stage == "stream"
    assert json.loads(metadata[key])  # still valid JSON: the check, not a parse error, refused it


def test_quanto_says_it_cannot_save(load, tmp_path):
    """quanto's reason is on the backend (--help and README show it) and is what transformers says when asked:
    save_pretrained of a quanto model refuses; every other backend's quantizer serializes."""
    assert "cannot serialize" in backends.BACKENDS["quanto"].cannot_save
    model, _, _ = load(f"model.path={save('llama', tmp_path / 'ck')}", "quant=quanto/int8", "dtype=fp16")
    assert not model.hf_quantizer.is_serializable()
    with pytest.raises(ValueError, match="quanto"):
        model.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved" / "model.safetensors").exists()
    for name, cls in backends.BACKENDS.items():
        assert (cls.cannot_save is None) == (name != "quanto"), name


@pytest.mark.parametrize(
    ("cuda", "mslk", "says"),
    [
        (False, True, "packs int4 weights for CUDA or XPU kernels only"),
        (True, False, "quantizes on CUDA with the mslk package's kernels, which is not installed: pip install mslk"),
        (True, True, None),
    ],
)
def test_torchao_int4_is_refused_where_its_kernels_are_missing(monkeypatch, cuda, mslk, says):
    """int4 needs a GPU, and on CUDA torchao's default packing needs the mslk package (on an H200 without it,
    torchao raised 'Requires mslk >= 1.0.0' mid-stream): env_check says so before any weight is read."""
    import importlib.util
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: object() if n == "mslk" and mslk else find_spec(n, *a)
    )
    quant = OmegaConf.to_object(compose(["quant=torchao/int4_weight_only"])).quant
    backend = backends.for_quant(quant)
    reason = backend.cannot_run(SimpleNamespace(cfg=SimpleNamespace(quant=quant)))
    assert reason == says if says is None else says in reason, reason
    other = OmegaConf.to_object(compose(["quant=torchao/int8_weight_only"])).quant
    assert backend.cannot_run(SimpleNamespace(cfg=SimpleNamespace(quant=other))) is None
