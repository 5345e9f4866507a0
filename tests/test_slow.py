"""The canonical case at full size: Llama-2-7B's exact shapes and shard layout, nf4 with double quant."""

from __future__ import annotations

import pytest

from tests.helpers import cli_with_maxrss, entry


@pytest.mark.slow
def test_llama2_7b_synthetic_nf4_double_loads_in_bounded_memory(tmp_path):
    # the default cache, so the 13.5 GB checkpoint is built once per machine, not once per test session
    code, out, record, outside_mb = cli_with_maxrss(
        tmp_path,
        "${oc.env:HOME}/.cache/qload",
        "model=llama2_7b",
        "quant=nf4_double",
        "model.source=synthetic",
        "stages.stream.progress=false",
    )
    assert code == 0, out[-3000:]
    stream = entry(record, "stream")
    assert stream["facts"]["shards"] == 2 and stream["facts"]["tensors"] == 291
    full_precision = record["checkpoint"]["bytes"]
    footprint = record["footprint_bytes"]
    assert 3.5e9 < footprint < 4.0e9
    # never the full-precision model: the load's peak stays under the quantized model plus one GB
    peak = stream["metrics"]["rss_peak_mb"] * 2**20
    assert abs(max(s["metrics"]["rss_peak_mb"] for s in record["stages"]) - outside_mb) <= 0.10 * outside_mb
    assert peak < footprint + stream["metrics"]["rss_start_mb"] * 2**20 + 1e9 < full_precision
