"""Every option of every config group composes; bad values fail at compose time naming the valid ones."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from pipeline import compose
from pipeline.core.schema import QUANT_SCHEMAS, STAGE_KINDS, DeviceMapConfig, DtypeConfig, ModelConfig
from pipeline.runner import build_stage
from stages import registry
from tests.helpers import REPO

CONF = REPO / "conf"
GROUPS = ["model", "quant", "device_map", "dtype"] + [f"stages/{k}" for k in STAGE_KINDS]
# every option file, those in a group's sub-folders too (quant/bnb/nf4), schemas aside
OPTIONS = [
    (g, p.relative_to(CONF / g).with_suffix("").as_posix())
    for g in GROUPS
    for p in sorted((CONF / g).rglob("*.yaml"))
    if p.stem != "schema"
]
SCHEMAS = {"model": ModelConfig, "device_map": DeviceMapConfig, "dtype": DtypeConfig} | {
    "quant": lambda node: QUANT_SCHEMAS[node.backend]  # each backend's own schema
}


def test_every_stage_kind_has_a_config_group_and_a_module():
    for kind in STAGE_KINDS:
        assert list((CONF / "stages" / kind).glob("*.yaml")), kind
        assert (REPO / "stages" / f"{kind}.py").exists() or (REPO / "stages" / kind).is_dir(), kind


def yaml_values(group: str, option: str) -> dict:
    """What an option's file sets, over the option it builds on (`defaults: [nf4, _self_]`, or an absolute
    `/quant/bnb/nf4@_here_`): read from the YAML itself, not through Hydra, so that composing has something
    independent to be compared with. Schemas in `defaults:` set no values and are passed over."""
    data = OmegaConf.load(CONF / group / f"{option}.yaml")
    bases = []
    for d in data.get("defaults", []):
        name = str(d).split("@")[0]
        if name == "_self_" or name.rsplit("/", 1)[-1] == "schema" or name.startswith("/_schemas_/"):
            continue
        if name.startswith("/"):  # absolute: /<group>/<option>
            bases.append((group, name.removeprefix(f"/{group}/")))
        else:  # relative: a sibling in the same folder
            bases.append((group, "/".join([*option.split("/")[:-1], name])))
    own = OmegaConf.masked_copy(data, [k for k in data if k != "defaults"])
    merged = OmegaConf.merge(*(yaml_values(g, o) for g, o in bases), own)
    return OmegaConf.to_container(merged, resolve=True)


def assert_sets(expected: dict, composed: dict, where: str) -> None:
    """Every value `expected` names is in `composed` (which also holds the schema's defaults for the rest)."""
    for key, value in expected.items():
        assert key in composed, f"{where}.{key} missing"
        if isinstance(value, dict):
            assert_sets(value, composed[key], f"{where}.{key}")
        else:
            assert composed[key] == value, f"{where}.{key}: {composed[key]!r}, the file says {value!r}"


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_option_composes_to_its_schema_and_its_values(group, option):
    cfg = compose([f"{group}={option}"])
    typed = OmegaConf.to_object(cfg)  # the schemas' __post_init__ checks run here
    expected = yaml_values(group, option)
    if group.startswith("stages/"):
        kind = group.split("/")[1]
        node, raw, target = typed.stages[kind], cfg.stages[kind], expected["_target_"]
        assert registry.STAGES[target][:2] == (kind, option), f"{option}.yaml selects {target}"
        assert type(node) is registry.STAGES[target][2]  # the argument schema the registry gives that class
        assert node._target_ == target
        stage = build_stage(kind, raw)
        assert type(stage) is registry.load(kind, target) and stage.kind == kind
    else:
        node, raw = getattr(typed, group), cfg[group]
        schema = SCHEMAS[group]
        assert type(node) is (schema if isinstance(schema, type) else schema(node))
        named = {"device_map": lambda n: n.policy.value, "dtype": lambda n: n.name.value}.get(group, lambda n: n.name)
        # a backend's scheme is named bnb/nf4 -> nf4 (the short names' own) or hqq/b4_g64 -> hqq-b4_g64
        assert named(node) in (option, option.rsplit("/", 1)[-1], option.replace("/", "-"))
    assert_sets(expected, OmegaConf.to_container(raw, resolve=True, enum_to_str=True), group)


def test_quant_variants_build_on_a_sibling():
    nf4, double = compose(["quant=nf4"]).quant, compose(["quant=nf4_double"]).quant
    assert double.bnb_4bit_use_double_quant and not nf4.bnb_4bit_use_double_quant
    assert {k: v for k, v in double.items() if k not in ("name", "bnb_4bit_use_double_quant")} == {
        k: v for k, v in nf4.items() if k not in ("name", "bnb_4bit_use_double_quant")
    }
    assert compose(["quant=fp4_double"]).quant.bnb_4bit_quant_type == "fp4"


@pytest.mark.parametrize(
    "override,expected",
    [
        ("quant.bnb_4bit_quant_type=nf5", "expected one of [nf4, fp4]"),
        ("quant.method=bnb_3bit", "expected one of [none, bnb_4bit, bnb_8bit]"),
        ("dtype.name=fp8", "expected one of [fp16, bf16, fp32, auto]"),
        (
            "device_map.policy=everywhere",
            "expected one of [auto, balanced, balanced_low_0, sequential, cpu, explicit]",
        ),
        ("model.sourec=synthetic", "Key 'sourec' not in 'ModelConfig'"),
        ("dtype=fp8", "Could not find 'dtype/fp8'"),
    ],
)
def test_bad_values_fail_at_compose_time_naming_valid_ones(override, expected):
    with pytest.raises(ConfigCompositionException) as err:
        compose([override])
    text = str(err.value) + str(err.value.__cause__)
    assert expected in text


@pytest.mark.parametrize(
    "overrides,expected",
    [
        (["quant=int8", "quant.bnb_4bit_use_double_quant=true"], "contradicts quant.method=bnb_8bit"),
        (["device_map=explicit", "device_map.map=null"], "policy=explicit needs a map"),
        (["model=llama2_7b", "model.hub_id=null"], "model.hub_id"),
    ],
)
def test_contradictions_rejected_before_any_work(overrides, expected):
    with pytest.raises(ValueError, match=expected):
        OmegaConf.to_object(compose(overrides))
