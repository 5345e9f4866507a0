"""The closed set of stage classes a config may select, and the schema each one's arguments must fit.

A config names a stage by its `_target_` string, but that string is only ever a key into this table: it is
never imported, resolved through module attributes, or handed to `hydra.utils.instantiate`. The table is
plain strings, so reading it imports nothing heavy (the launching process checks configs with it); `load`
imports a class only after the string has been found here, for the kind asked.
"""

from __future__ import annotations

import importlib
from typing import Any

from pipeline.core import schema

# target -> (stage kind, the conf/stages/<kind>/ option that selects it, the schema of its arguments)
STAGES: dict[str, tuple[str, str, type[schema.StageConfig]]] = {
    "stages.config_merge.ConfigMerge": ("config_merge", "default", schema.StageConfig),
    "stages.quantizer.AutoQuantizer": ("quantizer", "auto", schema.StageConfig),
    "stages.env_check.EnvCheck": ("env_check", "default", schema.StageConfig),
    "stages.preprocess.MetaSkeleton": ("preprocess", "meta", schema.StageConfig),
    "stages.device_map.AccelerateDeviceMap": ("device_map", "accelerate", schema.StageConfig),
    "stages.stream.BoundedStreamer": ("stream", "bounded", schema.BoundedStreamConfig),
    "stages.stream.TransformersStreamer": ("stream", "transformers", schema.StreamConfig),
    "stages.postprocess.Finalize": ("postprocess", "default", schema.PostprocessConfig),
    "stages.verify.NoVerify": ("verify", "none", schema.StageConfig),
    "stages.verify.LogitsVerify": ("verify", "logits", schema.VerifyConfig),
}


class UnknownStage(ValueError):
    """A config names a stage class outside the closed set (or one of another kind)."""


def choices(kind: str) -> list[str]:
    """The valid `_target_` values for a stage kind, each with the option that selects it."""
    return [f"{target} (stages/{kind}={option})" for target, (k, option, _) in STAGES.items() if k == kind]


def lookup(kind: str, target: Any) -> tuple[str, type[schema.StageConfig]]:
    """The table's own target string and argument schema for `target`, or UnknownStage naming the key, the
    value and the valid choices. Nothing is imported or called."""
    entry = STAGES.get(target) if isinstance(target, str) else None
    if entry is None or entry[0] != kind:
        raise UnknownStage(
            f"stages.{kind}._target_={target!r}: a config may only select one of this project's {kind} stages: "
            f"{', '.join(choices(kind))}"
        )
    key = next(t for t in STAGES if t == target)  # the table's string, not the caller's
    return key, entry[2]


def load(kind: str, target: Any) -> type:
    """The stage class `target` names, after `lookup` has found it in the table."""
    from stages.base import Stage

    key, _ = lookup(kind, target)
    module, name = key.rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)
    assert isinstance(cls, type) and issubclass(cls, Stage) and cls.__module__.startswith("stages."), key
    return cls
