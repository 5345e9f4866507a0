"""What a config may ask for: configs, experiment YAML, sweep overrides and run records are untrusted input.

They select from this project's closed set of components and never name code to run:
- a stage is a key of `stages.registry.STAGES` (looked up, never resolved or imported from the string), and its
  arguments must fit that stage's schema;
- no other `_target_`, `_partial_`, `_args_`, `_recursive_` or `_convert_` key anywhere, except Hydra's own
  launcher and sweeper, which must be one of the plugins below with no nested targets;
- no Hydra callbacks, no logging factories (`()`) or handler classes outside the standard library's, no
  `pkg://` config search path (it imports a package), no shell `setup` lines for a launcher, and no
  environment variable that changes what code a process loads (LD_*, PYTHON*, ...).

`check` runs on every composed config (the runner, replay, the Python API); `check_argv` runs in
`python -m pipeline` before Hydra acts on anything, composing each job of a sweep as Hydra will.
"""

from __future__ import annotations

import re
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline.core.schema import STAGE_KINDS, StageConfig, is_schema_option
from pipeline.search.settings import SWEEPER_TARGET, check_storage
from stages.registry import UnknownStage, lookup

SPECIAL_KEYS = ("_target_", "_partial_", "_args_", "_recursive_", "_convert_")
LAUNCHERS = (
    "hydra._internal.core_plugins.basic_launcher.BasicLauncher",
    "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher",
    "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher",
    "hydra_plugins.qload_slurm.QloadSlurmLauncher",
)
SWEEPERS = (
    "hydra._internal.core_plugins.basic_sweeper.BasicSweeper",
    SWEEPER_TARGET,  # the budget search (pipeline/search/): its space and storage are checked below
)
LOGGING_CLASSES = (
    "logging.StreamHandler",
    "logging.FileHandler",
    "logging.NullHandler",
    "logging.Formatter",
    "logging.handlers.RotatingFileHandler",
    "logging.handlers.WatchedFileHandler",
)
LOGGING_STREAMS = ("ext://sys.stdout", "ext://sys.stderr")
CODE_LOADING_ENV = re.compile(r"^(LD_|DYLD_|PYTHON|BASH_ENV$|ENV$|PERL5|RUBY|NODE_OPTIONS$)")


class UntrustedConfig(ValueError):
    """A config asks for something outside the closed set; the message names the key and what is valid."""


def check(cfg: DictConfig) -> None:
    """Refuse any config that names code to run; validate every stage's arguments against its schema."""
    job = {k: v for k, v in OmegaConf.to_container(cfg, resolve=False).items() if k != "hydra"}
    stages = job.get("stages") or {}
    if not isinstance(stages, dict):
        raise UntrustedConfig(f"stages={stages!r}: expected a mapping of stage kinds ({', '.join(STAGE_KINDS)})")
    for kind in stages:
        if kind not in STAGE_KINDS:
            raise UntrustedConfig(f"stages.{kind}: unknown stage kind; the kinds are {', '.join(STAGE_KINDS)}")
    _no_special_keys(job, "", allowed={f"stages.{kind}._target_" for kind in STAGE_KINDS})
    for kind, node in stages.items():
        stage_config(kind, node)
    if "hydra" in cfg:
        _check_hydra(OmegaConf.to_container(cfg.hydra, resolve=False))


def stage_config(kind: str, node: Any) -> tuple[str, StageConfig]:
    """The registry's target for stage `kind` and its config, checked against the stage's schema (unknown
    keys, types, cross-field rules): the schema object the stage is built from. Nothing named by the config
    is imported or called."""
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)
    if not isinstance(node, dict):
        raise UntrustedConfig(f"stages.{kind}={node!r}: expected a mapping with a _target_")
    _no_special_keys(node, f"stages.{kind}", allowed={f"stages.{kind}._target_"})
    try:
        target, config_class = lookup(kind, node.get("_target_"))
    except UnknownStage as err:
        raise UntrustedConfig(str(err)) from None
    try:
        config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(config_class), node))
    except OmegaConfBaseException as err:
        raise UntrustedConfig(f"stages.{kind}.{err.full_key} ({target}): {str(err).splitlines()[0]}") from None
    except ValueError as err:
        raise UntrustedConfig(f"stages.{kind} ({target}): {err}") from None
    return target, config


def _no_special_keys(node: Any, path: str, allowed: set[str]) -> None:
    """Refuse Hydra's instantiation keys (and any `_name_` key, so look-alikes cannot slip by) below `node`."""
    if isinstance(node, dict):
        for key, value in node.items():
            where = f"{path}.{key}" if path else str(key)
            if isinstance(key, str) and _looks_special(key) and where not in allowed:
                raise UntrustedConfig(
                    f"{where}: a config may not ask for objects to be built ({', '.join(SPECIAL_KEYS)}); "
                    "only stages.<kind>._target_ selects a stage, from this project's own stage classes"
                )
            _no_special_keys(value, where, allowed)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _no_special_keys(value, f"{path}[{i}]", allowed)


def _looks_special(key: str) -> bool:
    stripped = key.strip()
    return stripped in SPECIAL_KEYS or (len(stripped) > 2 and stripped[0] in "_\uff3f" and stripped[-1] in "_\uff3f")


def _check_hydra(hydra: dict[str, Any]) -> None:
    """Hydra's own node: the launcher and sweeper from a closed set, no callbacks, no code in logging or env."""
    for part, known in (("launcher", LAUNCHERS), ("sweeper", SWEEPERS)):
        node = hydra.get(part) or {}
        if node.get("_target_") not in known:
            raise UntrustedConfig(f"hydra.{part}._target_={node.get('_target_')!r}: valid are {', '.join(known)}")
        _no_special_keys(node, f"hydra.{part}", allowed={f"hydra.{part}._target_"})
    if (hydra.get("sweeper") or {}).get("_target_") == SWEEPER_TARGET:
        _check_search(hydra["sweeper"])
    if (hydra.get("launcher") or {}).get("setup"):
        raise UntrustedConfig(
            "hydra.launcher.setup: shell lines in a config run code on every node; set up the environment in "
            "your shell profile or job template instead"
        )
    if hydra.get("callbacks"):
        raise UntrustedConfig(f"hydra.callbacks: {', '.join(hydra['callbacks'])}: callbacks run code; none allowed")
    for entry in hydra.get("searchpath") or []:
        if not str(entry).startswith("file://"):
            raise UntrustedConfig(f"hydra.searchpath: {entry!r}: only file:// folders (pkg:// imports a package)")
    for name in ("job_logging", "hydra_logging"):
        _check_logging(hydra.get(name), f"hydra.{name}")
    for key in (hydra.get("job") or {}).get("env_set") or {}:
        if CODE_LOADING_ENV.match(str(key)):
            raise UntrustedConfig(f"hydra.job.env_set.{key}: it changes which code a process loads; not allowed")
    rest = {k: v for k, v in hydra.items() if k not in ("launcher", "sweeper")}
    _no_special_keys(rest, "hydra", allowed=set())


def _check_search(sweeper: dict[str, Any]) -> None:
    """The budget search's own inputs: its storage names one of SQLAlchemy's built-in databases, and its space
    only quant options of this project with plain keys and values (`check_argv` checks the space against
    the backends' schemas too, composing each option)."""
    from pipeline import CONF_DIR
    from pipeline.search.space import SpaceError, check_untrusted

    try:
        check_storage(sweeper.get("storage"))
        check_untrusted(sweeper.get("space") or {}, CONF_DIR, "hydra.sweeper.space")
    except (SpaceError, ValueError) as err:
        raise UntrustedConfig(str(err)) from None


def _check_logging(node: Any, path: str) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            where = f"{path}.{key}"
            if key == "()":
                raise UntrustedConfig(f"{where}: a logging factory calls any function; not allowed")
            if key == "class" and value not in LOGGING_CLASSES:
                raise UntrustedConfig(f"{where}={value!r}: valid are {', '.join(LOGGING_CLASSES)}")
            if isinstance(value, str) and value.startswith("ext://") and value not in LOGGING_STREAMS:
                raise UntrustedConfig(f"{where}={value!r}: valid are {', '.join(LOGGING_STREAMS)}")
            _check_logging(value, where)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _check_logging(value, f"{path}[{i}]")


def refuse_schema_choice(group: str, value: Any) -> None:
    """`quant=schema` (any `<group>=<schema>`): a schema is what an option is checked against, not an option;
    refused with the group's options (the YAML files in conf/<group>/)."""
    from pipeline import CONF_DIR

    folder = CONF_DIR / group
    if "." in group or not folder.is_dir():
        return
    values = value.list if hasattr(value, "list") else [value]
    for v in values:
        if isinstance(v, str) and is_schema_option(v.rpartition("/")[2]):
            valid = ", ".join(sorted(p.stem for p in folder.glob("*.yaml")))
            raise UntrustedConfig(f"{group}={v}: a schema, not an option of {group}; valid options: {valid}")


def check_argv(argv: list[str]) -> None:
    """Compose what `python -m pipeline ARGV` will run, each job of a sweep as the basic sweeper expands it
    (command-line sweeps and `hydra.sweeper.params`), and `check` each one, before Hydra builds anything."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from pipeline import compose

    args = get_args_parser().parse_args(argv)
    if args.experimental_rerun:
        raise UntrustedConfig(
            "--experimental-rerun unpickles a file, which can run code; use python -m pipeline.replay"
        )
    if args.config_path or args.config_dir or args.config_name:
        raise UntrustedConfig(
            "--config-path/--config-dir/--config-name: qload composes from its own conf/; put a study into "
            "conf/experiment/ and select it with experiment=NAME"
        )
    parser = OverridesParser.create()
    overrides = parser.parse_overrides(args.overrides)
    for o in overrides:
        refuse_schema_choice(o.key_or_group.lstrip("+~"), o.value())
    fixed = [o.input_line for o in overrides if not o.is_sweep_override()]
    primary = compose(fixed, hydra_config=True)
    check(primary)
    if not args.multirun:
        return
    if primary.hydra.sweeper.get("_target_") == SWEEPER_TARGET:
        _check_search_jobs(primary, [o.input_line for o in overrides])
        return
    params = OmegaConf.to_container(primary.hydra.sweeper, resolve=False).get("params") or {}
    from_config = parser.parse_overrides([f"{k}={v}" for k, v in params.items()])
    for batch in BasicSweeper.split_arguments(from_config + overrides, None):
        for job in batch:
            check(compose(job, hydra_config=True))


def _check_search_jobs(primary: DictConfig, argv_overrides: list[str]) -> None:
    """A budget search's jobs: its space checked against the backends' schemas (an unknown hyperparameter or
    a value its schema refuses is an error here, before Hydra starts), and each option's job composed and
    checked as a trial will compose it."""
    from pipeline import CONF_DIR, compose
    from pipeline.search.space import SpaceError, parse

    experiment = OmegaConf.select(primary, "hydra.runtime.choices.experiment", default=None)
    where = "hydra.sweeper.space" + (f" (conf/experiment/{experiment}.yaml or an override)" if experiment else "")
    jobs: dict[str, DictConfig] = {}

    def quant_of(option: str) -> DictConfig:
        jobs[option] = compose([*argv_overrides, f"quant={option}"], hydra_config=True)
        return jobs[option].quant

    try:
        parse(primary.hydra.sweeper.space, quant_of, CONF_DIR, where)
    except SpaceError as err:
        raise UntrustedConfig(str(err)) from None
    for job in jobs.values():
        check(job)
