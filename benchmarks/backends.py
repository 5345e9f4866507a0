"""Load time and peak RSS per backend x scheme on one model shape: ours against the reference, in fresh processes.

    python benchmarks/backends.py                                  # tinyllama_1_1b, every CPU scheme, 1 pair
    python benchmarks/backends.py --schemes hqq/b4_g64 torchao/int8_weight_only --pairs 3

For each scheme: `python -m pipeline model=<model> model.source=synthetic quant=<scheme> dtype=fp16 device_map=cpu`
and transformers' `from_pretrained` with the same quantization config (for HQQ, which transformers cannot
quantize at load time: a full-precision `from_pretrained`, then hqq's own `HQQLinear` layer by layer), each
in its own process, alternately, the checkpoint read into the page cache before each. The measuring is
benchmarks/load.py's (peak RSS from `wait4`; our time is the run record's total, setup included; theirs the
`from_pretrained` call, plus hqq's quantization for HQQ). Prints one markdown table with the ratios and the
bound the issue sets, peak <= 1.15 x footprint + RSS before the load, with that RSS taken two ways: when the
load process starts (benchmarks/load.py's) and when the stream stage starts (imports done, no weight read).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.load import measured, theirs, warm  # noqa: E402

# the schemes that quantize on a CPU (torchao int4 needs CUDA or XPU, env_check refuses it here)
SCHEMES = [
    "bnb/nf4",
    "bnb/nf4_double",
    "bnb/fp4",
    "bnb/int8",
    "torchao/int8_weight_only",
    "torchao/int8_dynamic",
    "torchao/float8_weight_only",
    "quanto/int8",
    "quanto/int4",
    "quanto/int2",
    "quanto/float8",
    "hqq/b4_g64",
    "hqq/b8_g64",
]


def ours(model: str, quant: str, dtype: str, cache: str, workdir: Path) -> dict:
    """benchmarks/load.py's run of `python -m pipeline`, also keeping the RSS when the stream stage began (the
    process's imports and the skeleton done, no weight read yet)."""
    run_dir = workdir / f"ours-{time.time_ns()}"
    args = [sys.executable, "-m", "pipeline", f"model={model}", "model.source=synthetic", f"quant={quant}",
            f"dtype={dtype}", f"cache_dir={cache}", "device_map=cpu", "stages.stream.progress=false",
            f"hydra.run.dir={run_dir}"]  # fmt: skip
    peak, _ = measured(args, workdir)
    rec = json.loads((run_dir / "run.json").read_text())
    stream = next(s for s in rec["stages"] if s["stage"] == "stream")
    return {
        "wall_s": rec["total"]["wall_s"],
        "peak": peak,
        "rss_before": rec["stages"][0]["metrics"]["rss_start_mb"] * 2**20,
        "rss_before_stream": stream["metrics"]["rss_start_mb"] * 2**20,
        "footprint": rec["footprint_bytes"],
    }


def row(scheme: str, o: dict, t: dict) -> str:
    bounds = [1.15 * o["footprint"] + o[k] for k in ("rss_before", "rss_before_stream")]
    within = ["yes" if o["peak"] <= b else "**no**" for b in bounds]
    return (
        f"| {scheme} | {o['wall_s']:.1f} | {t['wall_s']:.1f} | {o['wall_s'] / t['wall_s']:.2f} | "
        f"{o['peak'] / 1e9:.2f} | {t['peak'] / 1e9:.2f} | {o['peak'] / t['peak']:.2f} | "
        f"{o['footprint'] / 1e9:.3f} | {t['footprint'] / 1e9:.3f} | "
        f"{bounds[0] / 1e9:.2f} {within[0]} | {bounds[1] / 1e9:.2f} {within[1]} |"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tinyllama_1_1b")
    p.add_argument("--schemes", nargs="+", default=SCHEMES)
    p.add_argument("--dtype", default="fp16")
    p.add_argument("--pairs", type=int, default=1)
    p.add_argument("--cache", default=os.environ.get("QLOAD_CACHE", str(Path.home() / ".cache" / "qload")))
    a = p.parse_args()

    from pipeline import compose
    from pipeline.checkpoints import checkpoint

    cfg = compose([f"model={a.model}", "model.source=synthetic", f"cache_dir={a.cache}"])
    ckpt = checkpoint.scan(checkpoint.locate(cfg.model, a.cache))
    size = sum(f.stat().st_size for f in ckpt.files)
    print(f"checkpoint {ckpt.path} ({size / 1e9:.2f} GB, {len(ckpt.files)} shards); load average {os.getloadavg()}")
    print(
        f"\n{a.model} dtype={a.dtype} device_map=cpu, median of {a.pairs} pair(s); time s, peak RSS GB, "
        "footprint GB (get_memory_footprint); bound = 1.15 x our footprint + our RSS before the load, taken when "
        "the load process starts (imports not done) and when the stream stage starts (imports and skeleton done)\n"
    )
    print(
        "| scheme | ours s | reference s | time ratio | ours peak | reference peak | peak ratio | "
        "ours footprint | reference footprint | bound (start), within | bound (stream), within |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for scheme in a.schemes:
            runs: dict[str, list[dict]] = {"ours": [], "theirs": []}
            for _ in range(a.pairs):
                warm(ckpt.files)
                runs["ours"].append(ours(a.model, scheme, a.dtype, a.cache, Path(tmp)))
                warm(ckpt.files)
                runs["theirs"].append(theirs(ckpt.path, scheme, a.dtype, Path(tmp)))
            o, t = ({m: statistics.median(r[m] for r in v) for m in v[0]} for v in runs.values())
            print(row(scheme, o, t), flush=True)
    print(f"\nload average at the end {os.getloadavg()}")


if __name__ == "__main__":
    main()
