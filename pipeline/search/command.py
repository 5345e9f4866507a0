"""The command that loads one setting of a study alone: `python -m pipeline model=... quant=...`.

A trial loads with the study's whole config: the experiment's group choices (model, dtype, device map,
stages), the command line's keys, and its own setting. The command keeps what shapes the load and drops what
belongs to the study: the experiment itself, `budget=`, the verify stage (a plain load measures the load
alone; add `stages/verify=logits` to see its quality again), Hydra's own settings and `plan=`.
"""

from __future__ import annotations

import shlex
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser

# group choices and keys that belong to the study, not to the load it found
STUDY_GROUPS = ("experiment", "quant", "stages/verify")
STUDY_KEYS = ("budget", "plan", "progress", "prompt", "max_new_tokens")
STUDY_PREFIXES = ("hydra.", "hydra/", "stages.verify.", "quant.", "_schemas_")
FIRST = ("model", "dtype", "device_map")  # the order a person writes them in
ALWAYS = ("model",)  # named even when it is the default, so that the command says what it loads


def _is_study_key(key: str) -> bool:
    return key in STUDY_GROUPS or key in STUDY_KEYS or key.startswith(STUDY_PREFIXES) or key.startswith("hydra")


def load_arguments(choices: dict[str, Any], defaults: dict[str, Any], arguments: list[str]) -> list[str]:
    """What every trial loads with besides its setting: the model, each other group choice
    (`hydra.runtime.choices`) that differs from the root config's default (`defaults`, the same for no
    overrides), then each command-line override of a plain key, as typed."""
    groups = sorted(choices, key=lambda g: FIRST.index(g) if g in FIRST else len(FIRST))
    args = [
        f"{group}={choices[group]}"
        for group in groups
        if choices[group] is not None
        and not _is_study_key(group)
        and (group in ALWAYS or defaults.get(group) != choices[group])
    ]
    for override in OverridesParser.create().parse_overrides(arguments):
        key = override.key_or_group.lstrip("+~")
        if key in choices or _is_study_key(key):
            continue  # a group choice is in `args` already when it differs from the default
        args.append(override.input_line)
    return args


def command(load_args: list[str], setting: list[str]) -> str:
    """The shell command, each argument quoted as a shell needs it."""
    return shlex.join(["python", "-m", "pipeline", *load_args, *setting])


def arguments_of(text: str) -> list[str]:
    """The overrides of a command `command` made (for loading it from Python, as the tests do)."""
    words = shlex.split(text)
    if words[:3] != ["python", "-m", "pipeline"]:
        raise ValueError(f"not a qload command: {text!r}")
    return words[3:]
