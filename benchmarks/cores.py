"""How the stream stage scales with cores: the same load pinned to 1, 2, ... cores (`taskset`), side by side.

    python benchmarks/cores.py                                   # 7B nf4_double, 1 core against every core
    python benchmarks/cores.py --model tinyllama_1_1b --quant int8 --cores 1 2 --runs 3

Each run is the whole command (`python -m pipeline ... device_map=cpu`) in a fresh process under
`taskset -c 0..N-1`, alternating core counts, the checkpoint read into the page cache before each. The rate is
the checkpoint's bytes over the stream stage's wall time from run.json (reading, quantizing and placing every
tensor; the kernel's threads follow the process's affinity, `stages/backends/bnb/kernels.threads`). Prints the
median rate per core count and its ratio to one core.
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

from benchmarks.load import environment, warm  # noqa: E402


def stream(model: str, quant: str, cores: int, cache: str, workdir: Path) -> dict:
    run_dir = workdir / f"run-{time.time_ns()}"
    args = ["taskset", "-c", f"0-{cores - 1}", sys.executable, "-m", "pipeline", f"model={model}"]
    args += ["model.source=synthetic", f"quant={quant}", "dtype=fp16", f"cache_dir={cache}", "device_map=cpu"]
    args += ["stages.stream.progress=false", f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(args, capture_output=True, text=True, cwd=workdir, env=environment(False, workdir))
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    rec = json.loads((run_dir / "run.json").read_text())
    entry = next(e for e in rec["stages"] if e["stage"] == "stream")
    wall, nbytes = entry["metrics"]["wall_s"], entry["facts"]["bytes_read"]
    return {"wall_s": wall, "gb_s": nbytes / wall / 1e9, "kernel": entry["facts"]["kernel"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama2_7b")
    p.add_argument("--quant", default="nf4_double")
    p.add_argument("--cores", type=int, nargs="+", default=[1, len(os.sched_getaffinity(0))])
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--cache", default=os.environ.get("QLOAD_CACHE", str(Path.home() / ".cache" / "qload")))
    a = p.parse_args()
    from pipeline import compose
    from pipeline.checkpoints import checkpoint

    ckpt = checkpoint.scan(checkpoint.locate(compose([f"model={a.model}", "model.source=synthetic"]).model, a.cache))
    rows: dict[int, list[dict]] = {n: [] for n in a.cores}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(a.runs):
            for n in a.cores:
                warm(ckpt.files)
                rows[n].append(stream(a.model, a.quant, n, a.cache, Path(tmp)))
                r = rows[n][-1]
                print(
                    f"  run {i + 1}, {n} core(s): stream {r['wall_s']:.2f} s, {r['gb_s']:.2f} GB/s ({r['kernel']}); "
                    f"load average {os.getloadavg()[0]:.1f}",
                    flush=True,
                )
    base = statistics.median(r["gb_s"] for r in rows[a.cores[0]])
    print(f"\n{a.model} {a.quant}, medians of {a.runs} runs; ratio = rate / rate on {a.cores[0]} core(s)\n")
    print("| cores | stream s | GB/s | ratio |\n|---|---|---|---|")
    for n, rs in rows.items():
        rate = statistics.median(r["gb_s"] for r in rs)
        print(f"| {n} | {statistics.median(r['wall_s'] for r in rs):.2f} | {rate:.2f} | {rate / base:.2f} |")


if __name__ == "__main__":
    main()
