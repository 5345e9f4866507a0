"""Our load against a plain `from_pretrained` script, each timed as the whole command a user waits for.

    python benchmarks/load.py                                  # the default command, warm and cold, 3 pairs
    python benchmarks/load.py --case 1.1b-nf4 1.1b-nf4_double 1.1b-fp4 1.1b-int8 --mode warm
    python benchmarks/load.py --case 7b-nf4_double 7b-int8 7b-none --pairs 1   # from_pretrained peaks at ~20 GB
    python benchmarks/load.py --model tinyllama_1_1b --quant torchao/int8_weight_only   # any model and quant
    python benchmarks/load.py --model tinyllama_1_1b --quant cpu --mode warm --pairs 1  # every scheme a CPU runs
    python benchmarks/load.py --device cuda --model tinyllama_1_1b --quant nf4_double int8 none --mode warm

The cases are issue #13's table (`--case`, see CASES). For each, ours (`python -m pipeline ...`) and the
reference (this file run with `--child`: import torch and transformers, one `from_pretrained` with the
quantization config our pipeline builds, the same dtype, `device_map="cpu"`; with `--device cuda`, ours
`device_map=sequential` and theirs `device_map="cuda"`, both onto GPU 0) run alternately, each as a fresh
process started by a small go-between that times it and reads its peak RSS from the kernel (`wait4`, what
`/usr/bin/time -v` reports; a child of this process would inherit this process's high-water mark). Before
every run the checkpoint is read into the page cache. Per run:

- whole: the wall time of the command, from its start to its exit: interpreter, imports, load, records
- load: the load as measured inside the process: ours is run.json's total (setup, imports included, and
  every stage); the reference's is the `from_pretrained` call alone
- whole - stream: ours, the whole command less its stream stage (reading and quantizing the weights,
  loading or compiling the kernel): the start-up, setup and the records around the load
- gpu peak: with `--device cuda`, the most GPU memory allocated (ours: the highest stage's
  `cuda_max_allocated_mb` of GPU 0; theirs: `torch.cuda.max_memory_allocated()` after the load)
- private: the private (anonymous) memory at the end (RSS less its file-backed and shared pages), after the
  forward pass when there is one: a tensor kept as a view of a mapped shard is a file page, not private
- gen: with a case's `forward`, one forward pass after the load (a one-token greedy generation from the same
  ids, both), since a tensor mapped from the file is only read when it is first used; it is in `whole` too

`--mode warm`: the user's own HOME and TMPDIR, after one untimed run of ours (its kernel cache filled; the
reference reads a local folder and compiles nothing);
`--mode cold`: a fresh, empty HOME and TMPDIR for every run, as a first run on a new machine (no inductor
cache, no Hugging Face cache); the checkpoint still comes from `--cache`, except in the default case, which
runs `python -m pipeline` with no flags at all and so builds its tiny checkpoint in the fresh HOME, as a first
run does. Prints the medians, the ratios ours / reference, the memory bound, and the physical references:
how fast this machine copies the checkpoint out of the page cache, how fast bitsandbytes quantizes, and (warm)
the start-up floor: a fresh process that imports what our load process imports (torch, transformers, the
backend's library, the model class, with the same start-up steps) and exits, loading nothing. Whatever loads
with transformers in its own process takes at least that, so floor / reference bounds the whole ratio from below.
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
from dataclasses import dataclass, replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.helpers import TORCHAO_QUANTO_SCHEMES  # noqa: E402

# The go-between: it times its child from start to exit and reads the child's peak RSS from the kernel.
TIMED = (
    "import os, subprocess, sys, time; t = time.perf_counter(); p = subprocess.Popen(sys.argv[2:]); "
    "_, status, ru = os.wait4(p.pid, 0); wall = time.perf_counter() - t; "
    "open(sys.argv[1], 'w').write(f'{ru.ru_maxrss * 1024} {wall}'); sys.exit(os.waitstatus_to_exitcode(status))"
)
# variables that would point a cold run at the user's warm caches
CACHE_VARS = ("QLOAD_CACHE", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "HF_HOME", "XDG_CACHE_HOME")
# The start-up floor: a fresh process importing what every load of a model and backend imports, with the steps
# our load process takes (pipeline/startup.py's, and compile_on_first_call around the backend's library), and
# exiting at once; argv: what to hide (startup.load_backend), library, model class
FLOOR = (
    "import importlib, sys; from pipeline import startup; startup.hide_unused(sys.argv[1])\n"
    "with startup.imports_uncollected(), startup.import_structure_cache():\n"
    "    import torch, transformers; from pipeline.core.lazy_compile import compile_on_first_call\n"
    "    with compile_on_first_call(): sys.argv[2] and importlib.import_module(sys.argv[2])\n"
    "    getattr(transformers, sys.argv[3])\n"
    "startup.exit_without_teardown(0)"
)
LIBRARY = {"bnb": "bitsandbytes", "torchao": "torchao", "quanto": "optimum.quanto", "hqq": "hqq", "none": ""}
PROMPT = "Hi"  # the forward pass's input: its UTF-8 bytes as token ids, as pipeline/quality/generate.py does


@dataclass(frozen=True)
class Case:
    model: str
    quant: str
    dtype: str = "fp16"
    forward: bool = False  # also one forward pass after the load, in both
    default: bool = False  # ours is `python -m pipeline` with no flags (tiny_llama, nf4, everything default)
    device: str = "cpu"  # or "cuda": both load onto GPU 0


CASES = {
    "default": Case("tiny_llama", "nf4", default=True),
    "1.1b-nf4": Case("tinyllama_1_1b", "nf4"),
    "1.1b-nf4_double": Case("tinyllama_1_1b", "nf4_double"),
    "1.1b-fp4": Case("tinyllama_1_1b", "fp4"),
    "1.1b-int8": Case("tinyllama_1_1b", "int8"),
    "7b-nf4_double": Case("llama2_7b", "nf4_double"),
    "7b-int8": Case("llama2_7b", "int8"),
    "7b-none": Case("llama2_7b", "none", forward=True),
}


# every backend's schemes that quantize on a CPU (torchao int4 needs CUDA or XPU: env_check refuses it here)
CPU = ("bnb/nf4", "bnb/nf4_double", "bnb/fp4", "bnb/int8", *TORCHAO_QUANTO_SCHEMES, "hqq/b4_g64", "hqq/b8_g64")


def timed(args: list[str], env: dict[str, str], cwd: Path, workdir: Path) -> tuple[float, int, str]:
    """Run a command through the go-between; return its whole wall time (s), peak RSS (bytes) and stdout."""
    out = workdir / "timed"
    proc = subprocess.run(
        [sys.executable, "-c", TIMED, str(out), *args], capture_output=True, text=True, cwd=cwd, env=env
    )
    if proc.returncode != 0:
        raise SystemExit(
            f"benchmark child failed ({' '.join(args[:7])} ...):\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}"
        )
    peak, wall = out.read_text().split()
    return float(wall), int(peak), proc.stdout


def environment(cold: bool, workdir: Path) -> dict[str, str]:
    """This process's environment, offline, with this checkout first on the path; cold: a fresh HOME and TMPDIR
    and none of the variables that name a cache (the default case's checkpoint cache included)."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env = os.environ | {"HF_HUB_OFFLINE": "1", "PYTHONPATH": path}
    if not cold:
        return env
    env = {k: v for k, v in env.items() if k not in CACHE_VARS}
    home, tmp = (Path(tempfile.mkdtemp(prefix=p, dir=workdir)) for p in ("home-", "tmp-"))
    return env | {"HOME": str(home), "TMPDIR": str(tmp)}


def ours(case: Case, cache: str, env: dict[str, str], workdir: Path, extra: list[str]) -> dict:
    if case.default:
        args = [sys.executable, "-m", "pipeline"]
    else:
        args = [
            sys.executable,
            "-m",
            "pipeline",
            f"model={case.model}",
            "model.source=synthetic",
            f"quant={case.quant}",
            f"dtype={case.dtype}",
            f"cache_dir={cache}",
            "device_map=cpu" if case.device == "cpu" else "device_map=sequential",
            "stages.stream.progress=false",
            f"hydra.run.dir={workdir / f'ours-{time.time_ns()}'}",
            *extra,
        ]
        args += [f"prompt={PROMPT}", "max_new_tokens=1"] if case.forward else []
    run_dir = workdir / f"cwd-{time.time_ns()}"  # the default command writes runs/<date>/<time>... here
    run_dir.mkdir()
    wall, peak, out = timed(args, env, run_dir, workdir)
    where = next(line for line in out.splitlines() if line.startswith("record: ")).removeprefix("record: ")
    rec = json.loads(Path(where).read_text())
    return {
        "whole_s": wall,
        "load_s": rec["total"]["wall_s"],
        "outside_stream_s": wall - next(e["metrics"]["wall_s"] for e in rec["stages"] if e["stage"] == "stream"),
        "gen_s": (rec.get("generation") or {}).get("wall_s"),
        "gpu_peak": max((e["metrics"]["cuda_max_allocated_mb"].get("0", 0) for e in rec["stages"]), default=0) * 2**20
        if case.device == "cuda"
        else None,
        "peak": peak,
        # private memory at the end: after the forward pass when there is one, else after the last stage
        "anon": (rec.get("generation") or rec["stages"][-1]["metrics"])["rss_anon_end_mb"] * 2**20,
        # when the stream stage starts: every library imported, no weight read
        "rss_before": next(e["metrics"]["rss_start_mb"] for e in rec["stages"] if e["stage"] == "stream") * 2**20,
        "footprint": rec["footprint_bytes"],
    }


def theirs(spec: dict, env: dict[str, str], workdir: Path) -> dict:
    args = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    wall, peak, out = timed(args, env, REPO, workdir)
    return json.loads(out.strip().splitlines()[-1]) | {"whole_s": wall, "peak": peak}


def reference_spec(case: Case, path: Path) -> dict:
    """What the reference script needs, as JSON: it imports torch and transformers, none of this project."""
    from pipeline import compose
    from pipeline.core.dtypes import torch_dtype
    from stages.config_merge import requested_quantization

    quant = compose([f"quant={case.quant}"]).quant
    hqq = quant.backend == "hqq"  # transformers 5 cannot quantize HQQ at load time: load, then hqq's own code
    q = requested_quantization(quant, torch_dtype(case.dtype, "dtype")) if not hqq else None
    return {
        "path": str(path),
        "dtype": case.dtype,
        "quantization_config": q.to_dict() if q is not None else None,
        "hqq": {k: quant[k] for k in ("nbits", "group_size", "axis")} if hqq else None,
        "forward": case.forward,
        "device": case.device,
    }


def child(spec: dict) -> None:
    """The reference: a `from_pretrained` script as a user writes it (and one forward pass when asked)."""
    import psutil
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.quantizers.auto import AutoQuantizationConfig

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[spec["dtype"]]
    q = AutoQuantizationConfig.from_dict(spec["quantization_config"]) if spec["quantization_config"] else None
    before = psutil.Process().memory_info().rss
    t0 = time.perf_counter()
    device = spec["device"]
    model = AutoModelForCausalLM.from_pretrained(spec["path"], quantization_config=q, dtype=dtype, device_map=device)
    if spec["hqq"]:
        from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

        settings = BaseQuantizeConfig(**spec["hqq"])
        for name, module in list(model.named_modules()):
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                parent, _, leaf = name.rpartition(".")
                layer = HQQLinear(module, settings, del_orig=True, compute_dtype=dtype, device=device)
                setattr(model.get_submodule(parent), leaf, layer)
    if device == "cuda":
        torch.cuda.synchronize()
    load = time.perf_counter() - t0
    gen = None
    if spec["forward"]:
        ids = torch.tensor([[b % model.config.vocab_size for b in PROMPT.encode()]], device=device)
        t1 = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, max_new_tokens=1, do_sample=False, pad_token_id=0)
        gen = time.perf_counter() - t1
    gpu_peak = torch.cuda.max_memory_allocated(0) if device == "cuda" else None
    info = psutil.Process().memory_info()  # private memory at the end, as ours records it (Linux: rss - shared)
    facts = {"load_s": load, "gen_s": gen, "rss_before": before, "footprint": model.get_memory_footprint()}
    facts["anon"] = info.rss - info.shared
    print(json.dumps(facts | {"gpu_peak": gpu_peak}))


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
    quant = quant.removeprefix("bnb/")
    if quant.startswith(("nf4", "fp4")):
        F.quantize_4bit(w, quant_type=quant[:3], compress_statistics=quant.endswith("double"))
    elif quant == "int8":
        F.int8_vectorwise_quant(w)
    else:
        return None
    return w.numel() * 2 / (time.perf_counter() - t0) / 1e9


def start_up_floor(case: Case, env: dict[str, str], workdir: Path, runs: int = 3) -> float:
    """Median wall time (s) of FLOOR for the case's model and backend: no load, no config, no record. Any loader
    that imports transformers in its own process (ours, the reference) takes at least this before it reads a
    byte; the rest of a whole command is the load itself."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from pipeline import compose, startup

    cfg = compose([f"model={case.model}", "model.source=synthetic", f"quant={case.quant}"])
    cls = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[cfg.model.architecture.model_type]
    library = LIBRARY.get(cfg.quant.backend.value, "")
    args = [sys.executable, "-c", FLOOR, startup.load_backend(cfg), library, cls]
    return statistics.median(timed(args, env, REPO, workdir)[0] for _ in range(runs))


def bench(name: str, case: Case, mode: str, pairs: int, cache: str, extra: list[str], tmp: Path) -> dict:
    """`pairs` alternating runs of ours and the reference (after one untimed run of ours when warm); medians."""
    from pipeline import compose
    from pipeline.checkpoints import checkpoint

    cfg = compose([f"model={case.model}", "model.source=synthetic", f"cache_dir={cache}"])
    ckpt = checkpoint.scan(checkpoint.locate(cfg.model, cache))
    spec = reference_spec(case, ckpt.path)
    rows: dict[str, list[dict]] = {"ours": [], "from_pretrained": []}
    if mode == "warm":  # fills our kernel cache; the reference reads a local folder and has no cache to fill
        warm(ckpt.files)
        ours(case, cache, environment(False, tmp), tmp, extra)
    for i in range(pairs):
        warm(ckpt.files)
        rows["ours"].append(ours(case, cache, environment(mode == "cold", tmp), tmp, extra))
        warm(ckpt.files)
        rows["from_pretrained"].append(theirs(spec, environment(mode == "cold", tmp), tmp))
        o, t = rows["ours"][-1], rows["from_pretrained"][-1]
        print(
            f"  {name} {mode} pair {i + 1}: ours {o['whole_s']:.1f} s whole, {o['load_s']:.1f} s load, "
            f"{o['peak'] / 1e9:.2f} GB | from_pretrained {t['whole_s']:.1f} s whole, {t['load_s']:.1f} s load, "
            f"{t['peak'] / 1e9:.2f} GB | load average {os.getloadavg()[0]:.1f}",
            flush=True,
        )
    med = {
        k: {m: statistics.median(r[m] for r in v) if v[0][m] is not None else None for m in v[0]}
        for k, v in rows.items()
    }
    floor = start_up_floor(case, environment(False, tmp), tmp) if mode == "warm" else None
    return {"case": name, "mode": mode, "ckpt": ckpt, "floor": floor, **med}


def report(results: list[dict], pairs: int) -> None:
    def cell(x: float | None, digits: int = 2) -> str:
        return "-" if x is None else f"{x:.{digits}f}"

    print(f"\nmedians of {pairs} pairs; ratio = ours / from_pretrained; load average now {os.getloadavg()[0]:.1f}\n")
    head = [
        "case",
        "mode",
        "ours whole s",
        "ours whole - stream s",
        "theirs whole s",
        "whole ratio",
        "ours load s",
        "theirs load s",
        "load ratio",
        "ours gen s",
        "theirs gen s",
        "ours peak GB",
        "theirs peak GB",
        "peak ratio",
        "ours private GB",
        "theirs private GB",
    ]
    gpu = any(r["ours"]["gpu_peak"] is not None for r in results)
    head += ["ours GPU peak GB", "theirs GPU peak GB"] if gpu else []
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in results:
        o, t = r["ours"], r["from_pretrained"]
        row = [
            r["case"],
            r["mode"],
            cell(o["whole_s"]),
            cell(o["outside_stream_s"]),
            cell(t["whole_s"]),
            cell(o["whole_s"] / t["whole_s"], 3),
            cell(o["load_s"]),
            cell(t["load_s"]),
            cell(o["load_s"] / t["load_s"], 3),
            cell(o["gen_s"]),
            cell(t["gen_s"]),
            cell(o["peak"] / 1e9),
            cell(t["peak"] / 1e9),
            cell(o["peak"] / t["peak"], 3),
            cell(o["anon"] / 1e9, 3),
            cell(t["anon"] / 1e9, 3),
        ]
        if gpu:
            row += [cell((o["gpu_peak"] or 0) / 1e9), cell((t["gpu_peak"] or 0) / 1e9)]
        print("| " + " | ".join(row) + " |")
    print()
    for r in results:
        o, t = r["ours"], r["from_pretrained"]
        if o["footprint"] < 0.1e9:
            continue  # a tiny model's footprint is smaller than the allocator's noise: no bound to check
        if o["gpu_peak"] is not None:  # the weights are on the GPU: its peak against the footprint
            print(
                f"{r['case']} {r['mode']}: GPU peak {o['gpu_peak'] / 1e9:.2f} GB (from_pretrained "
                f"{t['gpu_peak'] / 1e9:.2f} GB), footprint {o['footprint'] / 1e9:.2f} GB"
            )
        else:
            bound = 1.15 * o["footprint"] + o["rss_before"]
            print(
                f"{r['case']} {r['mode']}: peak RSS bound 1.15 x footprint + RSS before load = {bound / 1e9:.2f} GB; "
                f"ours {o['peak'] / 1e9:.2f} GB ({'within' if o['peak'] <= bound else 'OVER'})"
            )
        if abs(o["footprint"] - t["footprint"]) > 0.01 * t["footprint"]:
            print(f"  warning: footprints differ: ours {o['footprint']} vs from_pretrained {t['footprint']}")
    for r in results:
        if r["floor"] is not None:
            theirs = r["from_pretrained"]["whole_s"]
            print(
                f"{r['case']} {r['mode']}: start-up floor {r['floor']:.2f} s (a fresh process importing torch, "
                f"transformers, the backend and the model class, as our load process does, then exiting) = "
                f"{r['floor'] / theirs:.3f} of from_pretrained's whole command; ours adds "
                f"{r['ours']['whole_s'] - r['floor']:.2f} s to it"
            )
    by = {(r["case"], r["mode"]): r["ours"]["whole_s"] for r in results}
    for case in dict.fromkeys(r["case"] for r in results):
        if (case, "warm") in by and (case, "cold") in by:
            print(
                f"{case}: a first run on a fresh machine takes {by[case, 'cold'] - by[case, 'warm']:+.2f} s "
                "over a warm one (ours, whole command)"
            )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", nargs="+", choices=list(CASES), help="cases of issue #13's table (default: default)")
    p.add_argument("--model", help="a case of your own: this model (synthetic) with --quant, warm or cold")
    p.add_argument(
        "--quant", nargs="+", default=["nf4_double"], help=f"with --model: quant options, or 'cpu' ({' '.join(CPU)})"
    )
    p.add_argument("--dtype", default="fp16", help="with --model")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where both loads place the model")
    p.add_argument("--mode", nargs="+", choices=["warm", "cold"], default=["warm", "cold"])
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--cache", default=os.environ.get("QLOAD_CACHE", str(Path.home() / ".cache" / "qload")))
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("extra", nargs="*", help="extra overrides for our pipeline, e.g. stages.stream.kernel=quantizer")
    a = p.parse_args()
    if a.child:
        return child(json.loads(a.child))
    from pipeline.core import noise

    noise.quiet()  # this process imports transformers and bitsandbytes too (the reference's config, the rates)

    cases = {name: CASES[name] for name in a.case or ([] if a.model else ["default"])}
    if a.device == "cuda":
        if any(c.default for c in cases.values()):
            p.error("--device cuda: the default case runs `python -m pipeline` with no flags; name --model or --case")
        cases = {f"{name} cuda": replace(c, device="cuda") for name, c in cases.items()}
    for quant in CPU if a.quant == ["cpu"] else a.quant if a.model else []:
        where = " cuda" if a.device == "cuda" else ""
        cases[f"{a.model}-{quant}{where}"] = Case(a.model, quant, a.dtype, device=a.device)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, case in cases.items():
            for mode in a.mode:
                results.append(bench(name, case, mode, a.pairs, a.cache, a.extra, Path(tmp)))
            ckpt = results[-1]["ckpt"]
            size = sum(f.stat().st_size for f in ckpt.files)
            print(
                f"{name}: checkpoint {ckpt.path} ({size / 1e9:.2f} GB, {len(ckpt.files)} shards); page-cache copy "
                f"{page_cache_rate(ckpt.files):.2f} GB/s; bitsandbytes {case.quant} quantize rate "
                f"{quantize_rate(case.quant) or 0:.3f} GB/s (fp16 input)"
            )
    report(results, a.pairs)


if __name__ == "__main__":
    main()
