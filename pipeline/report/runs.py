"""Read run records back: find run folders, and sum each one up in the figures a report compares."""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

QUALITY_STAGE = "verify"
# the facts of the verify stage that are quality figures (it also records counts, seeds and notes)
QUALITY_FACTS = ("perplexity", "kl_mean", "kl_max", "top1_agreement", "logit_abs_mean", "logit_abs_max")


class RunsError(Exception):
    """No runs where the user pointed, or a run record that cannot be read."""


@dataclass
class RunSummary:
    """One run as a report sees it: where it is, what was chosen, how long each stage took, memory, quality."""

    path: Path
    status: str
    settings: dict[str, str]  # Hydra's group choices and command-line overrides, "key" -> "value"
    stage_s: dict[str, float] = field(default_factory=dict)
    stage_peak_mb: dict[str, float] = field(default_factory=dict)
    stage_gpu_mb: dict[str, float] = field(default_factory=dict)
    start_mb: float | None = None  # RSS when the first stage began: the interpreter and its libraries
    total_s: float | None = None
    process_peak_mb: float | None = None  # the kernel's ru_maxrss of the load process, verify included
    footprint_mb: float | None = None  # as get_memory_footprint() counts it (torchao, quanto: at the logical dtype)
    held_mb: float | None = None  # measured: every storage the loaded model holds (pipeline/core/held.py)
    quality: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    slurm: dict[str, Any] = field(default_factory=dict)  # a cluster job's ids, node, allocation, how Slurm ended it
    label: str = ""  # filled in by `label_runs`: the settings that tell this run from the others

    @property
    def load_s(self) -> float:
        """Wall time of the load's stages (a quality check after it is not part of the load)."""
        return sum(v for k, v in self.stage_s.items() if k != QUALITY_STAGE)

    @property
    def load_peak_mb(self) -> float | None:
        """Peak RSS while loading: the highest stage peak, the quality check's excluded."""
        peaks = [v for k, v in self.stage_peak_mb.items() if k != QUALITY_STAGE]
        return max(peaks) if peaks else None

    @property
    def load_gpu_mb(self) -> float | None:
        peaks = [v for k, v in self.stage_gpu_mb.items() if k != QUALITY_STAGE]
        return max(peaks) if peaks else None


def _natural_key(path: Path) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def find_runs(paths: list[str | Path]) -> list[Path]:
    """Every run folder (one holding a run.json) given directly or anywhere under the given folders."""
    found: set[Path] = set()
    for p in map(Path, paths):
        if not p.exists():
            raise RunsError(f"{p}: no such file or folder; give run folders or folders that hold them")
        if p.is_file():
            p = p.parent
        found.update(r.parent.resolve() for r in p.rglob("run.json"))
    if not found:
        raise RunsError(f"no run.json under {', '.join(map(str, paths))}; is this a runs/ folder?")
    return sorted(found, key=_natural_key)


def _hydra_settings(path: Path) -> dict[str, str]:
    """The command-line overrides, then the group choices (`hydra.runtime.choices`, Hydra's own left out)."""
    settings: dict[str, str] = {}
    overrides = path / ".hydra" / "overrides.yaml"
    if overrides.exists():
        for item in OmegaConf.load(overrides) or []:
            key, _, value = str(item).partition("=")
            settings[key.lstrip("+~")] = value
    hydra_yaml = path / ".hydra" / "hydra.yaml"
    if hydra_yaml.exists():
        choices = OmegaConf.select(OmegaConf.load(hydra_yaml), "hydra.runtime.choices", default=None)
        for key, value in sorted((choices or {}).items()):
            if value is not None and not key.startswith("hydra/"):
                settings.setdefault(key, str(value))
    return settings


def _config_settings(config: dict[str, Any]) -> dict[str, str]:
    """For a run Hydra did not write (a replay, the Python API): the main choices, read off its config."""
    pick = {
        "model": ("model", "name"),
        "quant": ("quant", "name"),
        "dtype": ("dtype", "name"),
        "device_map": ("device_map", "policy"),
    }
    out = {}
    for key, (group, name) in pick.items():
        value = (config.get(group) or {}).get(name)
        if value is not None:
            out[key] = str(value)
    return out


def summarize(path: Path) -> RunSummary:
    """Read one run folder's run.json (and Hydra's files beside it)."""
    try:
        rec = json.loads((path / "run.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise RunsError(f"{path / 'run.json'}: not a readable run record ({err})") from None
    settings = _hydra_settings(path) or _config_settings(rec.get("config") or {})
    loaded = ((rec.get("config") or {}).get("model") or {}).get("name")
    if loaded:  # the model the run loaded (with model.path, the checkpoint's name), not the group's choice
        settings["model"] = str(loaded)
    run = RunSummary(path=path, status=str(rec.get("status")), settings=settings, error=rec.get("error"))
    run.slurm = rec.get("slurm") or {}
    for stage in rec.get("stages") or []:
        m, name = stage.get("metrics") or {}, stage["stage"]
        if run.start_mb is None:
            run.start_mb = m.get("rss_start_mb")
        run.stage_s[name] = m.get("wall_s", 0.0)
        if m.get("rss_peak_mb") is not None:
            run.stage_peak_mb[name] = m["rss_peak_mb"]
        if m.get("cuda_max_allocated_mb"):
            run.stage_gpu_mb[name] = max(m["cuda_max_allocated_mb"].values())
        if name == "postprocess" and (stage.get("facts") or {}).get("held_bytes") is not None:
            run.held_mb = round(stage["facts"]["held_bytes"] / 2**20, 1)
        if name == QUALITY_STAGE:
            facts = stage.get("facts") or {}
            run.quality = {
                k: float(facts[k])
                for k in QUALITY_FACTS
                if isinstance(facts.get(k), (int, float)) and not isinstance(facts[k], bool)
            }
    total = rec.get("total") or {}
    run.total_s = total.get("wall_s")
    run.process_peak_mb = total.get("ru_maxrss_mb")
    if rec.get("footprint_bytes"):
        run.footprint_mb = round(rec["footprint_bytes"] / 2**20, 1)
    return run


def label_runs(runs: list[RunSummary]) -> list[str]:
    """Set each run's label to the settings that differ between the runs; return those keys.

    Runs with the same settings (repeats of one config) are told apart by their folder below the common one."""
    keys = list(dict.fromkeys(k for r in runs for k in r.settings))  # overrides first, as typed
    differing = [k for k in keys if len({r.settings.get(k, "") for r in runs}) > 1]
    root = common_dir(runs)
    for r in runs:
        r.label = ", ".join(f"{k}={r.settings.get(k, '')}" for k in differing)
    counts = Counter(r.label for r in runs)
    for r in runs:
        folder = str(r.path.relative_to(root)) if r.path != root else r.path.name
        if not r.label:
            r.label = folder
        elif counts[r.label] > 1:
            r.label += f" ({folder})"
    return differing


def common_dir(runs: list[RunSummary]) -> Path:
    """The deepest folder that holds every run (the sweep folder for one sweep)."""
    paths = [r.path for r in runs]
    root = paths[0]
    while not all(p == root or root in p.parents for p in paths):
        root = root.parent
    return root
