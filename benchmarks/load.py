"""Our streaming load against transformers' `from_pretrained`, side by side, in fresh processes.

    python benchmarks/load.py                                   # Llama-2-7B shape, nf4_double, 3 pairs
    python benchmarks/load.py --model tinyllama_1_1b --quant fp4 --pairs 3

Builds (or reuses) the synthetic checkpoint, then runs `python -m pipeline` and a plain `from_pretrained`
with the same quantization config, dtype and device map alternately, each in its own process, and reads
each process's peak RSS from the kernel (`wait4`, what `/usr/bin/time -v` reports, file-backed pages
included). Prints medians, the two ratios, the memory bound, and the physical reference figures: how
fast this machine copies the checkpoint out of the page cache, and how fast bitsandbytes quantizes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# A go-between that reports its child's max RSS: a child of this (large) process would inherit its
# high-water mark across fork and exec.
MAXRSS = (
    "import os, subprocess, sys; p = subprocess.Popen(sys.argv[2:]); _, status, ru = os.wait4(p.pid, 0); "
    "open(sys.argv[1], 'w').write(str(ru.ru_maxrss * 1024)); sys.exit(os.waitstatus_to_exitcode(status))"
)


def measured(args: list[str], workdir: Path) -> tuple[int, str]:
    """Run a command through the go-between; return its peak RSS in bytes and its output."""
    out = workdir / "maxrss"
    proc = subprocess.run([sys.executable, "-c", MAXRSS, str(out), *args], capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(
            f"benchmark child failed ({' '.join(args[:6])} ...):\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}"
        )
    return int(out.read_text()), proc.stdout


def ours(model: str, quant: str, dtype: str, cache: str, workdir: Path, extra: list[str]) -> dict:
    run_dir = workdir / f"ours-{time.time_ns()}"
    args = [sys.executable, "-m", "pipeline", f"model={model}", "model.source=synthetic", f"quant={quant}",
            f"dtype={dtype}", f"cache_dir={cache}", "device_map=cpu", "stages.stream.progress=false",
            f"hydra.run.dir={run_dir}", *extra]  # fmt: skip
    peak, _ = measured(args, workdir)
    rec = json.loads((run_dir / "run.json").read_text())
    return {
        "wall_s": rec["total"]["wall_s"],
        "peak": peak,
        "rss_before": rec["stages"][0]["metrics"]["rss_start_mb"] * 2**20,
        "footprint": rec["footprint_bytes"],
    }


def theirs(path: Path, quant: str, dtype: str, workdir: Path) -> dict:
    args = [sys.executable, str(Path(__file__).resolve()), "--child", str(path), "--quant", quant, "--dtype", dtype]
    peak, out = measured(args, workdir)
    return json.loads(out.strip().splitlines()[-1]) | {"peak": peak}


def child(path: str, quant: str, dtype: str) -> None:
    """The reference: one `from_pretrained` call with the quantization config our pipeline builds."""
    import psutil
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline import compose
    from pipeline.core.dtypes import torch_dtype
    from stages.config_merge import requested_quantization

    cfg = compose([f"quant={quant}"])
    dt = torch_dtype(dtype, "dtype")
    hqq = cfg.quant.backend == "hqq"  # transformers 5 cannot quantize HQQ at load time: load, then hqq's own code
    q = requested_quantization(cfg.quant, dt) if quant != "none" and not hqq else None
    before = psutil.Process().memory_info().rss
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=q, dtype=dt, device_map="cpu")
    if hqq:
        from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

        settings = BaseQuantizeConfig(nbits=cfg.quant.nbits, group_size=cfg.quant.group_size, axis=cfg.quant.axis)
        for name, module in list(model.named_modules()):
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                parent, _, leaf = name.rpartition(".")
                layer = HQQLinear(module, settings, del_orig=True, compute_dtype=dt, device="cpu")
                setattr(model.get_submodule(parent), leaf, layer)
    wall = time.perf_counter() - t0
    print(json.dumps({"wall_s": wall, "rss_before": before, "footprint": model.get_memory_footprint()}))


def warm(files: list[Path]) -> None:
    """Read the checkpoint so it is in the page cache: a previous run's 18 GB peak may have evicted it, and
    each loader should start from the same cache state."""
    buf = bytearray(64 * 2**20)
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass


def page_cache_rate(files: list[Path]) -> float:
    """GB/s copying the checkpoint out of the page cache (second pass, so the files are cached)."""
    buf = bytearray(64 * 2**20)
    for _ in range(2):
        t0, n = time.perf_counter(), 0
        for f in files:
            with open(f, "rb", buffering=0) as fh:
                while k := fh.readinto(buf):
                    n += k
        rate = n / (time.perf_counter() - t0) / 1e9
    return rate


def quantize_rate(quant: str) -> float | None:
    """GB/s of fp16 input through bitsandbytes' own quantizer on this CPU (a Llama-7B MLP matrix)."""
    import bitsandbytes.functional as F
    import torch

    w = torch.randn(11008, 4096, dtype=torch.float16) * 0.02
    t0 = time.perf_counter()
    if quant.startswith(("nf4", "fp4")):
        F.quantize_4bit(w, quant_type=quant[:3], compress_statistics=quant.endswith("double"))
    elif quant == "int8":
        F.int8_vectorwise_quant(w)
    else:
        return None
    return w.numel() * 2 / (time.perf_counter() - t0) / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama2_7b")
    p.add_argument("--quant", default="nf4_double")
    p.add_argument("--dtype", default="fp16")
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--cache", default=os.environ.get("QLOAD_CACHE", str(Path.home() / ".cache" / "qload")))
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("extra", nargs="*", help="extra overrides for our pipeline, e.g. stages.stream.kernel=quantizer")
    a = p.parse_args()
    if a.child:
        return child(a.child, a.quant, a.dtype)

    from pipeline import compose
    from pipeline.checkpoints import checkpoint

    cfg = compose([f"model={a.model}", "model.source=synthetic", f"cache_dir={a.cache}"])
    ckpt = checkpoint.scan(checkpoint.locate(cfg.model, a.cache))
    size = sum(f.stat().st_size for f in ckpt.files)
    print(f"checkpoint {ckpt.path} ({size / 1e9:.2f} GB, {len(ckpt.files)} shards)")
    print(f"page-cache copy rate {page_cache_rate(ckpt.files):.2f} GB/s; "
          f"bitsandbytes {a.quant} quantize rate {quantize_rate(a.quant) or 0:.3f} GB/s (fp16 input)")  # fmt: skip

    rows: dict[str, list[dict]] = {"ours": [], "from_pretrained": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(a.pairs):
            warm(ckpt.files)
            rows["ours"].append(ours(a.model, a.quant, a.dtype, a.cache, Path(tmp), a.extra))
            warm(ckpt.files)
            rows["from_pretrained"].append(theirs(ckpt.path, a.quant, a.dtype, Path(tmp)))
            o, t = rows["ours"][-1], rows["from_pretrained"][-1]
            print(f"pair {i + 1}: ours {o['wall_s']:.1f} s {o['peak'] / 1e9:.2f} GB | "
                  f"from_pretrained {t['wall_s']:.1f} s {t['peak'] / 1e9:.2f} GB", flush=True)  # fmt: skip

    med = {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in rows.items()}
    o, t = med["ours"], med["from_pretrained"]
    bound = 1.15 * o["footprint"] + o["rss_before"]
    print(f"\n{a.model} {a.quant} dtype={a.dtype} device_map=cpu, medians of {a.pairs} pairs\n")
    print("| loader | load time s | peak RSS GB | RSS before load GB | footprint GB |")
    print("|---|---|---|---|---|")
    for name, m in med.items():
        print(f"| {name} | {m['wall_s']:.1f} | {m['peak'] / 1e9:.2f} | {m['rss_before'] / 1e9:.2f} | "
              f"{m['footprint'] / 1e9:.2f} |")  # fmt: skip
    print(f"\ntime ratio ours/from_pretrained: {o['wall_s'] / t['wall_s']:.3f}")
    print(f"peak RSS ratio ours/from_pretrained: {o['peak'] / t['peak']:.3f}")
    print(f"peak RSS bound 1.15 x footprint + RSS before load = {bound / 1e9:.2f} GB; "
          f"ours {o['peak'] / 1e9:.2f} GB ({'within' if o['peak'] <= bound else 'OVER'})")  # fmt: skip
    if abs(o["footprint"] - t["footprint"]) > 0.01 * t["footprint"]:
        print(f"warning: footprints differ: ours {o['footprint']} vs from_pretrained {t['footprint']}")


if __name__ == "__main__":
    main()
