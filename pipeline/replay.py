"""`python -m pipeline.replay RUN_DIR [--out DIR] [key=value ...]`: run a recorded run again, same config.

The config is the one the run resolved, as its run.json recorded it (`config`), or else Hydra's
`.hydra/config.yaml` beside it; it is checked against the schema again, loaded in a fresh process like any
run, and recorded in a new folder (default `runs/replay/<date>/<time>_<model>_<quant>/`). The new
run.json says what it replays under `replay_of`: the folder, the recorded git commit and dirty flag, and
any `key=value` overrides given here (for what must differ on another machine, such as `cache_dir`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline import ctrl_c, guard
from pipeline.core import record, schema
from pipeline.isolate import run_isolated


class ReplayError(Exception):
    """The run folder has no config that can be replayed."""


def recorded_config(run_dir: Path) -> tuple[dict[str, Any], str]:
    """The run's resolved config and which file it came from."""
    run_json = run_dir / "run.json"
    if run_json.exists():
        config = json.loads(run_json.read_text()).get("config")
        if config:
            return config, str(run_json)
    hydra_config = run_dir / ".hydra" / "config.yaml"
    if hydra_config.exists():
        return OmegaConf.to_container(OmegaConf.load(hydra_config), resolve=True), str(hydra_config)
    raise ReplayError(f"{run_dir}: neither run.json with a `config` nor .hydra/config.yaml; is it a run folder?")


def build_config(config: dict[str, Any], overrides: list[str]) -> DictConfig:
    """The recorded config on the run schema (so it is validated as at compose time), then the overrides."""
    try:
        guard.check(OmegaConf.create(config))  # a record from elsewhere is untrusted: nothing in it may run
        base = OmegaConf.structured(schema.RunConfig)
        if isinstance(config.get("quant"), dict):  # each backend has its own quant schema
            base.quant = OmegaConf.structured(schema.quant_schema(config["quant"]))
        cfg = OmegaConf.merge(base, config, OmegaConf.from_dotlist(overrides))
        guard.check(cfg)
        OmegaConf.to_object(cfg)  # the schemas' cross-field checks, before any work
    except guard.UntrustedConfig as err:
        raise ReplayError(f"the recorded config, with overrides {overrides}: {err}") from None
    except (OmegaConfBaseException, ValueError) as err:
        raise ReplayError(
            f"the recorded config, with overrides {overrides}, does not validate against pipeline/schema.py: {err}"
        ) from None
    return cfg


def default_out(cfg: DictConfig) -> Path:
    """`runs/replay/<date>/<time>_<model>_<quant>`, the single-run layout under `replay/`."""
    return record.run_folder(Path("runs") / "replay", f"_{cfg.model.name}_{cfg.quant.name}")


def replay(run_dir: str | Path, out: str | Path | None = None, overrides: list[str] | None = None) -> tuple[int, Path]:
    """Re-run the run recorded in `run_dir`; return the exit status and the new run folder."""
    run_dir = Path(run_dir)
    config, source = recorded_config(run_dir)
    cfg = build_config(config, list(overrides or []))
    out_dir = Path(out) if out else default_out(cfg)
    original = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").exists() else {}
    now = record.git_state()
    if original.get("git") and (original["git"].get("commit") != now["commit"] or original["git"].get("dirty")):
        print(
            f"note: recorded at commit {original['git'].get('commit')} (dirty: {original['git'].get('dirty')}), "
            f"replayed at {now['commit']} (dirty: {now['dirty']}): the code may differ, the config does not",
            file=sys.stderr,
        )
    ctrl_c.exit_if_seen()  # a Ctrl-C that a library swallowed while the config was built (pipeline/ctrl_c.py)
    replay_of = {"run_dir": str(run_dir.resolve()), "config_from": source, "git": original.get("git")}
    outcome = run_isolated(cfg, out_dir, extra={"replay_of": replay_of | {"overrides": list(overrides or [])}})
    if not outcome.ok:
        print(f"\nerror: {outcome.message}", file=sys.stderr)
    print(f"record: {out_dir / 'run.json'}")
    return outcome.exit_status, out_dir


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.replay", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a run folder (holding run.json or .hydra/config.yaml)")
    parser.add_argument("--out", help="folder for the new run (default: runs/replay/<date>/<time>_<model>_<quant>)")
    parser.add_argument("overrides", nargs="*", help="key=value changes, e.g. cache_dir=/scratch/qload")
    args = parser.parse_intermixed_args(argv)
    try:
        status, _ = replay(args.run_dir, args.out, args.overrides)
    except ReplayError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return status


if __name__ == "__main__":
    ctrl_c.remember()
    sys.exit(main())
