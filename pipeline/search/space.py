"""The search space: quant options, and for each the hyperparameters of its backend with their choices.

Declared in the experiment YAML as `hydra.sweeper.space`, e.g.

    space:
      none: {}
      bnb/nf4: {bnb_4bit_use_double_quant: [false, true]}
      hqq/b4_g64: {nbits: [3, 4], group_size: [32, 64]}

It is untrusted, as every config: each key must be a quant option of this project (a file
`conf/quant/<option>.yaml`), each hyperparameter a key of that option's backend schema
(`pipeline/core/schema.py`), each choice a value the schema accepts, and every combination one the schema's
cross-field checks pass. `parse` refuses anything else before the first trial, naming the key and what is
valid; a trial then only ever sets `quant=<option>` and `quant.<key>=<value>` with those checked values.

Choices are lists (Optuna's categorical distributions): the backends' hyperparameters are few discrete
values (bits, group sizes, flags), and a finite space lets the search stop once every setting was tried.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline.core.schema import quant_schema
from pipeline.quant_options import every_option

OPTION = re.compile(r"^[a-z0-9_]+(/[a-z0-9_]+)?$")
KEY = re.compile(r"^[a-z][a-z0-9_]*$")
NOT_SWEPT = ("name", "backend")  # what a quant option is, not a hyperparameter of it
QUANT_PARAM = "quant"  # the Optuna parameter that picks the option; an option's keys are "<option>.<key>"
_PLAIN = re.compile(r"^[A-Za-z0-9_.\-/]+$")


class SpaceError(ValueError):
    """The search space asks for something that is not there; the message names the key and what is valid."""


@dataclass
class Space:
    """option -> {hyperparameter: [choices]}, in the order declared (checked by `parse`)."""

    options: dict[str, dict[str, list[Any]]]

    def size(self) -> int:
        """How many distinct settings the space holds."""
        return sum(math.prod(len(c) for c in params.values()) for params in self.options.values())

    def suggest(self, trial: Any) -> dict[str, Any]:
        """Ask the Optuna trial for a setting, define-by-run: the option first, then that option's keys."""
        option = trial.suggest_categorical(QUANT_PARAM, list(self.options))
        for key, choices in self.options[option].items():
            trial.suggest_categorical(f"{option}.{key}", choices)
        return dict(trial.params)

    def setting(self, params: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """A trial's Optuna params as (option, {key: value})."""
        option = params[QUANT_PARAM]
        return option, {key: params[f"{option}.{key}"] for key in self.options.get(option, {})}

    def overrides(self, params: dict[str, Any]) -> list[str]:
        """The Hydra overrides that select this setting: quant=<option>, then quant.<key>=<value>."""
        option, values = self.setting(params)
        return [f"quant={option}", *(f"quant.{key}={override_value(v)}" for key, v in values.items())]


def override_value(value: Any) -> str:
    """A checked choice as Hydra's override grammar reads it back as the same value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value)
    if _PLAIN.match(text) and text.lower() not in ("true", "false", "null") and not _is_number(text):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def check_untrusted(space: Any, conf_dir: Path, where: str) -> None:
    """What can be checked without composing (the guard's part): a mapping of existing quant options to
    mappings of plain keys to lists of plain values (strings, numbers, booleans, null)."""
    if not isinstance(space, dict):
        raise SpaceError(f"{where}={space!r}: expected a mapping of quant options to their hyperparameters")
    valid = every_option(conf_dir / "quant")
    for option, params in space.items():
        if not isinstance(option, str) or not OPTION.match(option) or option not in valid:
            raise SpaceError(f"{where}.{option}: not a quant option; valid: {', '.join(valid)}")
        if params is None:
            params = {}
        if not isinstance(params, dict):
            raise SpaceError(
                f"{where}.{option}={params!r}: expected a mapping of hyperparameters to lists of choices ({{}}: none)"
            )
        for key, choices in params.items():
            if not isinstance(key, str) or not KEY.match(key):
                raise SpaceError(f"{where}.{option}.{key}: not a hyperparameter name")
            if not isinstance(choices, list) or not choices:
                raise SpaceError(f"{where}.{option}.{key}={choices!r}: expected a non-empty list of choices")
            for value in choices:
                if not (value is None or isinstance(value, (str, int, float, bool))):
                    raise SpaceError(f"{where}.{option}.{key}: choice {value!r} is not a string, number or boolean")
            if len({repr(v) for v in choices}) != len(choices):
                raise SpaceError(f"{where}.{option}.{key}={choices}: a choice is listed twice")


def parse(space: Any, quant_of: Callable[[str], DictConfig], conf_dir: Path, where: str) -> Space:
    """Check the whole space against the backends' schemas and return it.

    `quant_of(option)` is the quant node Hydra composes for `quant=<option>` (typed by its backend's schema):
    the guard composes it before Hydra starts, the sweeper through Hydra's own config loader."""
    if isinstance(space, DictConfig):
        space = OmegaConf.to_container(space, resolve=True)
    check_untrusted(space, conf_dir, where)
    if not space:
        raise SpaceError(f"{where} is empty: give at least one quant option, e.g. {{bnb/nf4: {{}}}}")
    options: dict[str, dict[str, list[Any]]] = {}
    for option, params in space.items():
        params = params or {}
        base = quant_of(option)
        schema = quant_schema(OmegaConf.to_container(base))
        valid = [f.name for f in fields(schema) if f.name not in NOT_SWEPT]
        for key, choices in params.items():
            if key not in valid:
                backend = getattr(base.get("backend"), "value", base.get("backend", "none"))
                raise SpaceError(
                    f"{where}.{option}.{key}: not a hyperparameter of quant={option} (backend {backend}, "
                    f"{schema.__name__}); valid: {', '.join(valid) or 'none (this option has no hyperparameters)'}"
                )
            for value in choices:
                try:
                    OmegaConf.merge(base, {key: value})
                except OmegaConfBaseException as err:
                    raise SpaceError(f"{where}.{option}.{key}: choice {value!r}: {str(err).splitlines()[0]}") from None
        for combo in itertools.product(*params.values()):
            values = dict(zip(params, combo, strict=True))
            try:
                OmegaConf.to_object(OmegaConf.merge(base, values))
            except (OmegaConfBaseException, ValueError) as err:
                shown = " ".join(f"quant.{k}={override_value(v)}" for k, v in values.items())
                raise SpaceError(
                    f"{where}.{option}: the combination quant={option} {shown} is not a valid setting: "
                    f"{str(err).splitlines()[0]}; narrow the choices so that every combination is valid"
                ) from None
        options[option] = {key: list(choices) for key, choices in params.items()}
    return Space(options)
