"""The report's plots, as PNG files.

Figures are made with matplotlib's object API and rendered by its Agg canvas: no pyplot, so no display, no
global figure state, nothing left open between plots.

- `report_stage_times.png`: each run as a bar of its stages' wall times, stacked in order
- `report_memory.png`: each run's peak RSS while loading next to the loaded model's footprint (and GPU peak)
- `report_quality.png`: only when a `verify` stage recorded quality figures: each figure against load peak
"""

from __future__ import annotations

from pathlib import Path

from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pipeline.report.runs import RunSummary

STAGE_TIMES, MEMORY, QUALITY = "report_stage_times.png", "report_memory.png", "report_quality.png"
# the rest of QUALITY_FACTS goes in the table only
PLOTTED_QUALITY = {
    "kl_mean": "mean KL divergence from the reference\n(lower is better)",
    "top1_agreement": "top-1 agreement with the reference\n(higher is better)",
    "perplexity": "perplexity on the eval text\n(lower is better)",
}


def _label(run: RunSummary) -> str:
    return run.label + ("" if run.status == "ok" else f"  [{run.status}]")


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _height(n_runs: int) -> float:
    return 1.6 + 0.45 * n_runs


def stage_times(runs: list[RunSummary], path: Path) -> None:
    """One horizontal bar per run, one coloured segment per stage, in order."""
    stages = list(dict.fromkeys(s for r in runs for s in r.stage_s))
    colors = colormaps["tab10"].colors
    fig = _figure(10, _height(len(runs)))
    ax = fig.subplots()
    y = range(len(runs))
    left = [0.0] * len(runs)
    for i, stage in enumerate(stages):
        widths = [r.stage_s.get(stage, 0.0) for r in runs]
        ax.barh(y, widths, left=left, color=colors[i % len(colors)], label=stage, height=0.6)
        left = [a + b for a, b in zip(left, widths, strict=True)]
    for yi, total in zip(y, left, strict=True):
        ax.annotate(f"{total:.2f} s", (total, yi), xytext=(4, 0), textcoords="offset points", va="center", fontsize=8)
    ax.set_yticks(list(y), [_label(r) for r in runs])
    ax.invert_yaxis()  # first run on top, as in the table
    ax.set_xlabel("wall time (s)")
    ax.set_xlim(0, max(left, default=1) * 1.15 or 1)
    fig.suptitle("Wall time per stage")
    fig.legend(title="stage", loc="outside right upper", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    fig.savefig(path, dpi=120)


def memory(runs: list[RunSummary], path: Path) -> None:
    """Per run: peak RSS while loading, the model's footprint, and the GPU peak when there was one."""
    series = [
        ("RSS before the first stage", lambda r: r.start_mb),
        ("peak RSS while loading", lambda r: r.load_peak_mb),
        ("loaded model's footprint", lambda r: r.footprint_mb),
    ]
    if any(r.load_gpu_mb for r in runs):
        series.append(("peak GPU memory allocated while loading", lambda r: r.load_gpu_mb))
    fig = _figure(10, _height(len(runs)) + 0.3 * len(runs))
    ax = fig.subplots()
    bar = 0.8 / len(series)
    top = 0.0
    for i, (name, get) in enumerate(series):
        ys = [k + (i - (len(series) - 1) / 2) * bar for k in range(len(runs))]
        values = [get(r) or 0.0 for r in runs]
        ax.barh(ys, values, height=bar, label=name)
        for yi, v in zip(ys, values, strict=True):
            if v:
                ax.annotate(f"{v:,.0f}", (v, yi), xytext=(3, 0), textcoords="offset points", va="center", fontsize=7)
        top = max(top, *values)
    ax.set_yticks(range(len(runs)), [_label(r) for r in runs])
    ax.invert_yaxis()
    ax.set_xlabel("memory (MiB)")
    ax.set_xlim(0, top * 1.15 or 1)
    fig.suptitle("Peak memory while loading vs model footprint")
    fig.legend(loc="outside right upper", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    fig.savefig(path, dpi=120)


def quality(runs: list[RunSummary], path: Path) -> None:
    """One panel per quality figure: the figure against the load's peak memory; a marker and key per run."""
    names = [q for q in PLOTTED_QUALITY if any(q in r.quality for r in runs)]
    gpu = any(r.load_gpu_mb for r in runs)
    fig = _figure(5 * len(names) + 1, 4.5 + 0.2 * len(runs))
    axes = fig.subplots(1, len(names), squeeze=False)
    markers = "osD^vP*Xh<>p"
    colors = colormaps["tab10"].colors
    for ax, name in zip(axes[0], names, strict=True):
        for i, r in enumerate(runs):
            x, y = (r.load_gpu_mb if gpu else r.load_peak_mb), r.quality.get(name)
            if x is None or y is None:
                continue
            style = {"marker": markers[i % len(markers)], "color": colors[i % len(colors)], "s": 50, "zorder": 3}
            ax.scatter([x], [y], label=_label(r), **style)
        ax.set_xlabel(f"load peak {'GPU allocated' if gpu else 'RSS'} (MiB)")
        ax.set_ylabel(PLOTTED_QUALITY[name])
        ax.set_title(name)
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, title="run", loc="outside lower center", ncols=min(2, len(labels)), fontsize=8)
    fig.suptitle("Quality after load vs memory to load")
    fig.savefig(path, dpi=120)


def draw(runs: list[RunSummary], out_dir: Path) -> dict[str, Path]:
    """Draw every plot these runs have data for into `out_dir`; return them by kind."""
    written = {"stage_times": out_dir / STAGE_TIMES, "memory": out_dir / MEMORY}
    stage_times(runs, written["stage_times"])
    memory(runs, written["memory"])
    if any(q in r.quality for r in runs for q in PLOTTED_QUALITY):
        written["quality"] = out_dir / QUALITY
        quality(runs, written["quality"])
    return written
