"""A budget search's report: `python -m pipeline.report <sweep dir>` on a folder that holds trials.

Reads each trial's `trial.json` (written by `pipeline.search`, beside the trial's plan and load records),
prints one row per trial and the answer: the best setting that fits the budget, and the command that loads
it, checked by composing it and comparing with the config that trial loaded. Writes into the sweep folder
(or `--out`):

- `study.csv`: one row per trial (number, state, setting, planned memory, objective values, why pruned)
- `study.png`: quality against planned memory: the loaded trials, the Pareto front among them, the pruned
  settings at their planned memory along the top, the budget line, and the chosen setting starred
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pipeline.search.answer import best, pareto, quality_key
from pipeline.search.settings import BudgetOn
from pipeline.search.trial import TRIAL_JSON, read_trials

STUDY_CSV, STUDY_PNG = "study.csv", "study.png"
STATES = ("complete", "pruned", "failed", "interrupted")
LABELS = {
    "kl_mean": "mean KL divergence from the reference (lower is better)",
    "kl_max": "max KL divergence from the reference (lower is better)",
    "perplexity": "perplexity on the eval text (lower is better)",
    "top1_agreement": "top-1 agreement with the reference (higher is better)",
}


def is_study(path: str | Path) -> bool:
    """Whether `path` is a budget search's sweep folder (it holds `<n>/trial.json`)."""
    return Path(path).is_dir() and any(Path(path).glob(f"*/{TRIAL_JSON}"))


def short(setting: list[str]) -> str:
    """quant=bnb/nf4 quant.bnb_4bit_use_double_quant=true -> bnb/nf4 bnb_4bit_use_double_quant=true"""
    return " ".join(s.removeprefix("quant=").removeprefix("quant.") for s in setting)


def label(on: str) -> str:
    """A study's `budget_on` as messages name it (studies run before `held` existed say `footprint`)."""
    return BudgetOn(on).label if on in {b.value for b in BudgetOn} else on


def _mib(n: int | None) -> float | None:
    return None if n is None else round(n / 2**20, 1)


def table(trials: list[dict[str, Any]], key: str | None) -> list[list[str]]:
    on = trials[0]["budget"]["on"] if trials else "footprint"
    head = ["trial", "state", "setting", f"planned {label(on)} MiB", *([key] if key else []), "note"]
    rows = [head]
    for t in trials:
        value = (t.get("values") or {}).get(key) if key else None
        note = t.get("reason") or ""
        rows.append(
            [
                str(t["number"]),
                t["state"],
                short(t["setting"]),
                "" if t.get("memory_bytes") is None else f"{_mib(t['memory_bytes']):.1f}",
                *([("" if value is None else f"{value:.4g}")] if key else []),
                note,
            ]
        )
    return rows


def text_table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def write_csv(path: Path, trials: list[dict[str, Any]]) -> None:
    keys = list(dict.fromkeys(k for t in trials for k in t.get("values") or {}))
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["trial", "state", "setting", "memory_bytes", *keys, "same_as", "reason", "command"])
        for t in trials:
            values = t.get("values") or {}
            out.writerow(
                [t["number"], t["state"], " ".join(t["setting"]), t.get("memory_bytes")]
                + [values.get(k) for k in keys]
                + [t.get("same_as"), t.get("reason"), t["command"]]
            )


def plot(path: Path, trials: list[dict[str, Any]], key: str, chosen: dict[str, Any] | None) -> None:
    """Quality against planned memory, with the Pareto front, the budget line and the pruned settings."""
    fig = Figure(figsize=(9, 6.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    distinct = [t for t in trials if t.get("same_as") is None]
    loaded = [t for t in distinct if t["state"] == "complete"]
    pruned = [t for t in distinct if t["state"] == "pruned" and t.get("memory_bytes") is not None]
    markers = "osD^vP*Xh<>p"
    for i, t in enumerate(loaded):
        ax.scatter(
            [_mib(t["memory_bytes"])],
            [t["values"][key]],
            marker=markers[i % len(markers)],
            s=45,
            zorder=3,
            label=f"trial {t['number']}: {short(t['setting'])}",
        )
    front = pareto(trials, key)
    if front:
        xs = [_mib(t["memory_bytes"]) for t in front]
        ys = [t["values"][key] for t in front]
        ax.step(xs, ys, where="post", color="black", alpha=0.5, linewidth=1.2, zorder=2, label="Pareto front")
    if pruned:
        ax.scatter(
            [_mib(t["memory_bytes"]) for t in pruned],
            [0.96] * len(pruned),
            transform=ax.get_xaxis_transform(),
            marker="x",
            color="grey",
            s=40,
            zorder=3,
            label="pruned by plan, not loaded: " + ", ".join(str(t["number"]) for t in pruned),
        )
    budget = trials[0]["budget"] if trials else {}
    if budget.get("bytes") is not None:
        ax.axvline(budget["bytes"] / 2**20, color="tab:red", linestyle="--", label=f"budget={budget['text']}")
    if chosen is not None:
        ax.scatter(
            [_mib(chosen["memory_bytes"])],
            [chosen["values"][key]],
            marker="*",
            s=320,
            facecolor="none",
            edgecolor="tab:red",
            linewidth=1.5,
            zorder=4,
            label=f"chosen: trial {chosen['number']}",
        )
    values = [t["values"][key] for t in loaded if t["values"][key] > 0]
    if values and max(values) / min(values) > 20:
        ax.set_yscale("log")
    xs = [_mib(t["memory_bytes"]) for t in [*loaded, *pruned]]
    if budget.get("bytes") is not None:
        xs.append(budget["bytes"] / 2**20)
    ax.set_xlim(0, max(xs, default=1) * 1.08)  # from zero: memory is compared by ratio; the pruned row included
    ax.set_xlabel(f"planned {label(budget.get('on', 'footprint'))} (MiB)")
    ax.set_ylabel(LABELS.get(key, key))
    ax.grid(alpha=0.3)
    ax.set_ylim(top=ax.get_ylim()[1] * (1.6 if ax.get_yscale() == "log" else 1.12))  # room for the pruned row
    fig.legend(loc="outside lower center", ncols=2, fontsize=7)
    name = trials[0]["study"] if trials else ""
    fig.suptitle(f"Budget search {name}: quality after load vs planned memory")
    fig.savefig(path, dpi=110)


def command_check(trial: dict[str, Any], sweep_dir: Path) -> list[str]:
    """Keys where the config `trial['command']` composes to differs from the one the trial loaded (its
    run.json): quant, dtype, device map, the load's stages and the model's source. Empty: it loads the same."""
    from omegaconf import OmegaConf

    from pipeline import compose
    from pipeline.search.command import arguments_of

    loaded = json.loads((sweep_dir / str(trial["number"]) / "run.json").read_text())["config"]
    composed = OmegaConf.to_container(compose(arguments_of(trial["command"])), resolve=True)
    differing = []
    for section in ("quant", "dtype", "device_map", "stages", "model"):
        a, b = dict(composed.get(section) or {}), dict(loaded.get(section) or {})
        if section == "stages":
            a.pop("verify", None), b.pop("verify", None)
        if section == "model":  # the record names a checkpoint loaded by path, and the architecture it built
            for k in ("name", "architecture"):
                a.pop(k, None), b.pop(k, None)
        differing += [f"{section}.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return differing


def report(sweep_dir: str | Path, out: str | Path | None = None) -> dict[str, Path]:
    """Print the trials and the answer; write study.csv and study.png. Returns what was written."""
    sweep_dir = Path(sweep_dir)
    trials = read_trials(sweep_dir)
    out_dir = Path(out) if out else sweep_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    key = quality_key(trials)
    written = {"study_csv": out_dir / STUDY_CSV}
    write_csv(written["study_csv"], trials)
    print(text_table(table(trials, key)))
    chosen = best(trials, key) if key else None
    if key:
        written["study_plot"] = out_dir / STUDY_PNG
        plot(written["study_plot"], trials, key, chosen)
    counts = {s: sum(1 for t in trials if t["state"] == s and t.get("same_as") is None) for s in STATES}
    repeats = sum(1 for t in trials if t.get("same_as") is not None)
    budget = trials[0]["budget"]
    print(
        f"\n{len(trials)} trial(s): {counts['complete']} loaded, {counts['pruned']} pruned by plan, "
        f"{counts['failed']} failed, {counts['interrupted']} interrupted, {repeats} repeat(s) of an earlier "
        "setting (answered by it, nothing run); "
        + (f"budget={budget['text']} on the planned {label(budget['on'])}" if budget.get("text") else "no budget")
    )
    if chosen is None:
        print("no setting tried fits the budget: nothing was loaded")
        return written
    differing = command_check(chosen, sweep_dir)
    print(
        f"best that fits: trial {chosen['number']}, {' '.join(chosen['setting'])}: {key} "
        f"{chosen['values'][key]:.4g}, planned {label(chosen['budget']['on'])} {_mib(chosen['memory_bytes']):.1f} MiB"
    )
    print(f"load it: {chosen['command']}")
    if differing:
        print(f"warning: that command composes a config that differs from trial {chosen['number']}'s in {differing}")
    return written
