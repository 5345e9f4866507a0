"""On a GPU: the default streamer's quantized weights are byte-identical to transformers' own `from_pretrained`
onto cuda, and every stage records its GPU peaks. Marked requires_cuda: skipped, with the reason, where torch
sees no GPU (conftest.py); the last test checks that skip on any machine."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from pipeline.core.schema import SETUP, STAGE_KINDS
from tests.helpers import assert_same_weights, entry, run_cli, stage_facts

# What conf/quant/<name>.yaml asks for, spelled out for transformers: tiny_llama's checkpoint is fp16, so
# dtype=auto makes fp16 the compute dtype of the 4-bit layers.
BNB = {
    "nf4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float16),
    "nf4_double": BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float16,
    ),
    "int8": BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0),
}
MODULE_TYPE = {"nf4": "Linear4bit", "nf4_double": "Linear4bit", "int8": "Linear8bitLt"}


@pytest.mark.requires_cuda
@pytest.mark.parametrize("quant", list(BNB))
def test_a_cuda_load_equals_from_pretrained_onto_cuda_and_records_gpu_peaks(load, quant):
    # sequential: GPU 0 first, where all of the tiny model fits, however many GPUs there are (auto would
    # balance it over all of them)
    model, record, _ = load(f"quant={quant}", "device_map=sequential")
    assert record["status"] == "ok"
    assert stage_facts(record, "device_map")["device_map"] == {"": 0}
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    assert MODULE_TYPE[quant] in {type(m).__name__ for m in model.modules()}

    reference = AutoModelForCausalLM.from_pretrained(
        record["checkpoint"]["path"], device_map="cuda", dtype=torch.float16, quantization_config=BNB[quant]
    )
    assert_same_weights(model, reference)
    ids = torch.arange(3, 15, device="cuda").unsqueeze(0)
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()

    gpus = {str(i) for i in range(torch.cuda.device_count())}
    assert [s["stage"] for s in record["stages"]] == [SETUP, *STAGE_KINDS]
    for s in record["stages"]:  # every stage measures every GPU, its peak reset at the stage's start
        m = s["metrics"]
        assert set(m["cuda_max_allocated_mb"]) == set(m["cuda_max_reserved_mb"]) == gpus, s["stage"]
        assert all(m["cuda_max_reserved_mb"][g] >= m["cuda_max_allocated_mb"][g] >= 0 for g in gpus), s["stage"]
    stream = entry(record, "stream")["metrics"]
    # the weights arrive on GPU 0 during the stream: its peak holds at least the whole quantized model
    assert stream["cuda_max_allocated_mb"]["0"] >= record["footprint_bytes"] / 2**20 - 0.1


def test_requires_cuda_tests_are_skipped_with_the_reason_where_torch_sees_no_gpu():
    """Run in a child that sees no GPU (CUDA_VISIBLE_DEVICES empty), on any machine: the tests above are
    reported skipped with the marker's reason, none passed or failed."""
    proc = run_cli(
        "tests/test_cuda.py", "-q", "-rs", "-p", "no:cacheprovider", "-k", "cuda_load",
        module="pytest",
        env={"CUDA_VISIBLE_DEVICES": ""},
    )  # fmt: skip
    report = proc.stdout + proc.stderr
    assert proc.returncode == 0, report
    assert re.search(rf"\b{len(BNB)} skipped\b", report) and not re.search(r"\b(passed|failed|error)", report), report
    assert f"SKIPPED [{len(BNB)}] tests/test_cuda.py" in report, report
    assert "requires_cuda: torch.cuda.is_available() is False on this machine" in report, report
