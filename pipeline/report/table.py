"""`python -m pipeline.report PATH [PATH ...] [--out DIR]`: compare runs in one table, as CSV, Markdown, plots.

PATH is a run folder or any folder above run folders (a sweep, `runs/`); every folder holding a run.json
is a run. One row per run: the settings that differ between the runs, status, per-stage wall time and peak
RSS, load time and peak, the load process's peak as the kernel kept it, the model's footprint (as
`get_memory_footprint()` counts it) and what it holds (every storage, measured: torchao's and quanto's weights at
their real size), and the quality figures a `verify` stage recorded. Writes `report.csv`, `report.md` and the plots (see
`pipeline.report.plots`) into the runs' common folder, or into `--out`. A budget search's sweep folder also
gets its study report (`pipeline.report.study`): the trials, the best setting that fits and its command.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.report.runs import QUALITY_STAGE, RunsError, RunSummary, common_dir, find_runs, label_runs, summarize

CSV_NAME, MARKDOWN_NAME = "report.csv", "report.md"


@dataclass
class Column:
    """A report column: its header, how to read it off a run, and how to print it."""

    name: str
    get: Callable[[RunSummary], Any]
    fmt: str = "{}"

    @property
    def numeric(self) -> bool:
        return self.fmt.endswith(("f}", "g}"))

    def text(self, run: RunSummary) -> str:
        value = self.get(run)
        return "" if value is None else self.fmt.format(value)


def columns(runs: list[RunSummary], differing: list[str]) -> list[Column]:
    """The columns this set of runs has data for, in reading order."""
    stages = list(dict.fromkeys(s for r in runs for s in r.stage_s))
    quality = list(dict.fromkeys(q for r in runs for q in r.quality))
    has_gpu = any(r.stage_gpu_mb for r in runs)
    root = common_dir(runs)
    cols = [Column("run", lambda r: r.path.relative_to(root) if r.path != root else r.path.name)]
    cols += [Column(k, lambda r, k=k: r.settings.get(k)) for k in differing]
    if any(r.slurm for r in runs):  # a cluster sweep: which job, where, and how Slurm ended the ones it killed
        cols += [Column("slurm job", lambda r: r.slurm.get("id")), Column("node", lambda r: r.slurm.get("node"))]
        if any(r.slurm.get("state") for r in runs):
            cols += [Column("slurm state", lambda r: r.slurm.get("state"))]
    cols += [
        Column("status", lambda r: r.status),
        Column("load s", lambda r: r.load_s, "{:.3f}"),
        Column("total s", lambda r: r.total_s, "{:.3f}"),
    ]
    cols += [Column(f"{s} s", lambda r, s=s: r.stage_s.get(s), "{:.3f}") for s in stages]
    cols += [
        Column("start MB", lambda r: r.start_mb, "{:.0f}"),
        Column("load peak MB", lambda r: r.load_peak_mb, "{:.0f}"),
    ]
    cols += [Column(f"{s} MB", lambda r, s=s: r.stage_peak_mb.get(s), "{:.0f}") for s in stages]
    cols += [Column("process peak MB", lambda r: r.process_peak_mb, "{:.0f}")]
    if has_gpu:
        cols += [Column("load GPU peak MB", lambda r: r.load_gpu_mb, "{:.0f}")]
        cols += [Column(f"{s} GPU MB", lambda r, s=s: r.stage_gpu_mb.get(s), "{:.0f}") for s in stages]
    cols += [
        Column("footprint MB", lambda r: r.footprint_mb, "{:.1f}"),
        Column("held MB", lambda r: r.held_mb, "{:.1f}"),
    ]
    cols += [Column(q, lambda r, q=q: r.quality.get(q), "{:.4g}") for q in quality]
    if any(r.error for r in runs):
        cols += [Column("error", lambda r: r.error.splitlines()[0] if r.error else None, "{:.100}")]
    return cols


def write_csv(path: Path, runs: list[RunSummary], cols: list[Column]) -> None:
    """Full-precision values, one row per run."""
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow([c.name for c in cols])
        for r in runs:
            out.writerow(["" if (v := c.get(r)) is None else v for c in cols])


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(runs: list[RunSummary], cols: list[Column], plots: list[Path]) -> str:
    """The table as GitHub Markdown, with the plots below it."""
    root = common_dir(runs)
    lines = [
        f"# Load report: {len(runs)} run(s) under `{root}`",
        "",
        f"Made {time.strftime('%Y-%m-%d %H:%M:%S')} by `python -m pipeline.report`. Times are wall seconds; "
        f"memory is RSS in MiB; `load` is every stage but `{QUALITY_STAGE}`; `process peak` is the kernel's "
        "ru_maxrss of the process that loaded.",
        "",
        "| " + " | ".join(_md_cell(c.name) for c in cols) + " |",
        "|" + "|".join("--:" if c.numeric else "---" for c in cols) + "|",
    ]
    lines += ["| " + " | ".join(_md_cell(c.text(r)) for c in cols) + " |" for r in runs]
    for p in plots:
        lines += ["", f"![{p.stem}]({p.name})"]
    return "\n".join(lines) + "\n"


def text_table(runs: list[RunSummary], cols: list[Column]) -> str:
    """The table aligned for a terminal."""
    rows = [[c.name for c in cols]] + [[c.text(r) for c in cols] for r in runs]
    widths = [max(len(row[i]) for row in rows) for i in range(len(cols))]
    lines = [
        "  ".join(
            cell.rjust(w) if c.numeric else cell.ljust(w) for c, cell, w in zip(cols, row, widths, strict=True)
        ).rstrip()
        for row in rows
    ]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def report(paths: list[str | Path], out: str | Path | None = None) -> dict[str, Path]:
    """Find the runs under `paths`, write the CSV, the Markdown and the plots; return what was written."""
    from pipeline.report import plots

    runs = [summarize(p) for p in find_runs(paths)]
    differing = label_runs(runs)
    out_dir = Path(out) if out else common_dir(runs)
    out_dir.mkdir(parents=True, exist_ok=True)
    cols = columns(runs, differing)
    written = {"csv": out_dir / CSV_NAME}
    write_csv(written["csv"], runs, cols)
    written |= plots.draw(runs, out_dir)
    pngs = [p for k, p in written.items() if k != "csv"]
    written["markdown"] = out_dir / MARKDOWN_NAME
    written["markdown"].write_text(markdown(runs, cols, pngs))
    print(text_table(runs, cols))
    return written


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", help="run folders, or folders to search for run.json")
    parser.add_argument("--out", help="folder for the report files (default: the runs' common folder)")
    args = parser.parse_args(argv)
    from pipeline.report import study  # matplotlib, as the plots: imported when a report is made

    try:
        written = report(args.paths, args.out)
        for path in filter(study.is_study, args.paths):  # a budget search: its trials and its answer too
            print()
            written |= study.report(path, args.out)
    except RunsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n" + "\n".join(f"{kind}: {path}" for kind, path in written.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
