"""`python -m pipeline.plan.capacity DIR...`: the capacity table of planned runs (plan=true), in Markdown.

One row per run folder under DIR whose run.json has status `planned`: the footprint, the quantization state
beside it, the predicted peak RSS of a load into CPU memory, the predicted peak of a load onto one GPU, and
which common GPU sizes that fits.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipeline.plan.step import GPU_SIZES_GIB
from pipeline.report.runs import RunsError, find_runs


def rows(paths: list[Path]) -> list[dict]:
    """Every planned run.json under `paths`, sorted by model then footprint."""
    found = []
    for run_dir in find_runs(paths):
        rec = json.loads((run_dir / "run.json").read_text())
        if rec.get("status") == "planned" and rec.get("plan"):
            found.append(rec)
    return sorted(found, key=lambda r: (r["config"]["model"]["name"], -r["plan"]["footprint_bytes"]))


def table(records: list[dict]) -> str:
    head = ["model", "quant", "footprint GiB", "+ quant state GiB", "peak RSS GiB (CPU load)", "one-GPU peak GiB"]
    head += [f"fits {g} GiB" for g in GPU_SIZES_GIB]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        p = r["plan"]
        cells = [r["config"]["model"]["name"], r["config"]["quant"]["name"]]
        cells += [f"{p[k] / 2**30:.2f}" for k in ("footprint_bytes", "quant_state_bytes", "predicted_peak_bytes")]
        cells.append(f"{p['single_gpu_peak_bytes'] / 2**30:.2f}")
        cells += ["yes" if p["fits_single_gpu_gib"][str(g)] else "no" for g in GPU_SIZES_GIB]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path, help="run folders or folders above them (a sweep)")
    try:
        found = rows(parser.parse_args(argv).paths)
    except RunsError as err:
        raise SystemExit(str(err)) from None
    if not found:
        raise SystemExit("no planned runs (run.json with status 'planned') under the given folders")
    print(table(found))


if __name__ == "__main__":
    main()
