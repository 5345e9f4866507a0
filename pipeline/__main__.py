"""`python -m pipeline [group=option ...] [key=value ...]`: load a model as the config says, record the run."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from pipeline import schema
from pipeline.generate import generate
from pipeline.runner import StageError, run

schema.register()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        model, _ = run(cfg, out_dir)
    except StageError as err:
        print(f"\nerror: {err}\nrecord: {out_dir / 'run.json'}", file=sys.stderr)
        sys.exit(1)
    print(f"record: {out_dir / 'run.json'}")
    if cfg.prompt:
        print(generate(model, cfg.prompt, cfg.max_new_tokens))


if __name__ == "__main__":
    main()
