"""Load a Hugging Face causal LM with quantization applied while the weights stream in.

from pipeline import load
model, record = load(["model=tiny_llama", "quant=nf4"])
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

_PACKAGE = Path(__file__).resolve().parent


def _conf_dir() -> Path:
    """The Hydra configs: `pipeline/conf` in an installed package (the wheel maps the repository's conf/ there,
    see setup.py), else conf/ at the top of the checkout this package runs from (also an editable install)."""
    for candidate in (_PACKAGE / "conf", _PACKAGE.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    return _PACKAGE / "conf"  # neither: check_conf_dir() says so, naming both places


CONF_DIR = _conf_dir()


def check_conf_dir() -> None:
    """Raise FileNotFoundError, naming both places looked in, when neither holds the configs."""
    if not (CONF_DIR / "config.yaml").is_file():
        raise FileNotFoundError(
            f"no config.yaml in {_PACKAGE / 'conf'} (an installed package) nor in {_PACKAGE.parent / 'conf'} "
            "(a checkout): reinstall qload, or run from the repository"
        )


def compose(overrides: list[str] | None = None, hydra_config: bool = False):
    """The composed config for these overrides, as `python -m pipeline` would build it (with `hydra_config`,
    Hydra's own node too)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from pipeline.core import schema

    check_conf_dir()
    schema.register()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides or []), return_hydra_config=hydra_config)


def load(overrides: list[str] | None = None, run_dir: str | Path | None = None) -> tuple[Any, dict]:
    """Run the pipeline from Python: returns the loaded model and its run record (also written to run_dir)."""
    from pipeline.runner import run

    cfg = compose(overrides)
    if run_dir is None:
        stamp = time.strftime("%H-%M-%S") + f"-{time.time_ns() % 10**9:09d}"
        run_dir = Path("runs") / "api" / time.strftime("%Y-%m-%d") / stamp
    return run(cfg, Path(run_dir))
