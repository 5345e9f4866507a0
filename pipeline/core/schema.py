"""Structured configs: the schema every YAML file in `conf/` is checked against at compose time.

Each YAML option names its group's schema in its `defaults:` list, so a misspelled key or a value outside
an enum fails when Hydra composes the config, before any weight is read, with the allowed values in the
message. Cross-field checks live in `__post_init__`, which `OmegaConf.to_object` runs.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from omegaconf import MISSING, OmegaConf, open_dict

from pipeline.core.sizes import parse_size


class Source(str, Enum):
    hub = "hub"
    local = "local"
    synthetic = "synthetic"
    package = "package"  # a model shipped inside a PyPI wheel, converted once (pipeline/packaged.py)


class DtypeName(str, Enum):
    fp16 = "fp16"
    bf16 = "bf16"
    fp32 = "fp32"
    auto = "auto"


class QuantBackend(str, Enum):
    """The quantization backends (stages/backends/): the closed set a `quant.backend` may name."""

    none = "none"
    bnb = "bnb"
    torchao = "torchao"
    quanto = "quanto"
    hqq = "hqq"


class QuantMethod(str, Enum):
    """bitsandbytes' two methods (`none` kept for records written before the backends existed)."""

    none = "none"
    bnb_4bit = "bnb_4bit"
    bnb_8bit = "bnb_8bit"


class QuantType(str, Enum):
    nf4 = "nf4"
    fp4 = "fp4"


class QuantStorage(str, Enum):
    """The dtype bitsandbytes packs 4-bit weights into (`bnb_4bit_quant_storage`)."""

    uint8 = "uint8"
    fp16 = "fp16"
    bf16 = "bf16"
    fp32 = "fp32"


class TorchaoScheme(str, Enum):
    """torchao configs by name (each maps to one torchao config class in stages/backends/torchao.py)."""

    int8_weight_only = "int8_weight_only"
    int8_dynamic_activation_int8_weight = "int8_dynamic_activation_int8_weight"
    float8_weight_only = "float8_weight_only"
    int4_weight_only = "int4_weight_only"  # refused on a CPU by env_check: every packing needs CUDA/XPU


class QuantoWeights(str, Enum):
    int8 = "int8"
    int4 = "int4"
    int2 = "int2"
    float8 = "float8"


class Policy(str, Enum):
    auto = "auto"
    balanced = "balanced"
    balanced_low_0 = "balanced_low_0"
    sequential = "sequential"
    cpu = "cpu"
    explicit = "explicit"


@dataclass
class SyntheticConfig:
    """How a `source: synthetic` checkpoint is materialized: seeded random weights, real layout."""

    seed: int = 0
    dtype: DtypeName = DtypeName.fp16
    shard_size: str = "10GB"
    init_std: float = 0.02


@dataclass
class ModelConfig:
    """A model: where its weights come from and, for synthetic or planned loads, its architecture."""

    name: str = MISSING
    source: Source = Source.hub
    hub_id: str | None = None
    revision: str | None = None
    path: str | None = None
    trust_remote_code: bool = False  # run Python code shipped in the model repo (auto_map); recorded
    allow_pickle: bool = False  # load pickle weights (*.bin) when no safetensors exist; pickle can run code
    architecture: dict[str, Any] = field(default_factory=dict)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    def __post_init__(self) -> None:
        if self.source == Source.hub and not self.hub_id and not self.path:
            raise ValueError(
                f"model.hub_id: model {self.name!r} has source=hub but no hub_id; set one, or model.path=DIR"
            )
        if self.source == Source.local and not self.path:
            raise ValueError(f"model.path: model {self.name!r} has source=local but no path; pass model.path=DIR")
        if self.source == Source.synthetic and not self.path and not self.architecture.get("model_type"):
            raise ValueError(
                f"model.architecture.model_type: synthetic model {self.name!r} needs an architecture with a "
                "model_type (e.g. llama, mistral, qwen2)"
            )


@dataclass
class QuantConfig:
    """A quantization setting: `backend` picks the backend (stages/backends/); each backend's own keys live in
    its subclass below. `quant=none` is this class alone (backend none: every weight in the run's dtype)."""

    name: str = MISSING
    backend: QuantBackend = QuantBackend.none

    @property
    def quantized(self) -> bool:
        return self.backend != QuantBackend.none


@dataclass
class BnbQuantConfig(QuantConfig):
    """bitsandbytes; the keys keep the names of transformers' `BitsAndBytesConfig`."""

    backend: QuantBackend = QuantBackend.bnb
    method: QuantMethod = QuantMethod.bnb_4bit
    bnb_4bit_quant_type: QuantType = QuantType.nf4
    bnb_4bit_use_double_quant: bool = False
    bnb_4bit_compute_dtype: DtypeName = DtypeName.auto
    bnb_4bit_quant_storage: QuantStorage = QuantStorage.uint8
    llm_int8_threshold: float = 6.0
    llm_int8_has_fp16_weight: bool = False
    llm_int8_skip_modules: list[str] | None = None
    llm_int8_enable_fp32_cpu_offload: bool = False

    def __post_init__(self) -> None:
        if self.method == QuantMethod.none:
            raise ValueError("quant.method=none under quant.backend=bnb: use quant=none, or bnb_4bit / bnb_8bit")
        if self.method == QuantMethod.bnb_8bit and self.bnb_4bit_use_double_quant:
            raise ValueError(
                "quant.bnb_4bit_use_double_quant=true contradicts quant.method=bnb_8bit: double quantization is "
                "a 4-bit setting; use quant=nf4_double or fp4_double, or drop the key"
            )
        if self.llm_int8_threshold < 0:
            raise ValueError(f"quant.llm_int8_threshold must be >= 0, got {self.llm_int8_threshold}")


@dataclass
class TorchaoQuantConfig(QuantConfig):
    """torchao: `config` names the torchao config; `group_size` only for the schemes that take one (int4)."""

    backend: QuantBackend = QuantBackend.torchao
    config: TorchaoScheme = TorchaoScheme.int8_weight_only
    group_size: int | None = None

    def __post_init__(self) -> None:
        if self.group_size is not None and self.config != TorchaoScheme.int4_weight_only:
            raise ValueError(
                f"quant.group_size={self.group_size}: torchao's {self.config.value} has no group size "
                "(int8 and float8 are per-channel); drop the key, or use quant.config=int4_weight_only"
            )
        if self.group_size is not None and self.group_size not in (32, 64, 128, 256):
            raise ValueError(f"quant.group_size={self.group_size}: torchao int4 takes 32, 64, 128 or 256")


@dataclass
class QuantoQuantConfig(QuantConfig):
    """optimum-quanto (`QuantoConfig`): weights int8/int4/int2/float8, activations unquantized."""

    backend: QuantBackend = QuantBackend.quanto
    weights: QuantoWeights = QuantoWeights.int8


HQQ_NBITS = (1, 2, 3, 4, 8)


@dataclass
class HqqQuantConfig(QuantConfig):
    """HQQ (half-quadratic quantization), done by our streamer with hqq's own code: `nbits` per weight, one
    scale and zero per `group_size` weights along `axis`."""

    backend: QuantBackend = QuantBackend.hqq
    nbits: int = 4
    group_size: int = 64
    axis: int = 1

    def __post_init__(self) -> None:
        if self.nbits not in HQQ_NBITS:
            raise ValueError(f"quant.nbits={self.nbits}: HQQ takes one of {', '.join(map(str, HQQ_NBITS))}")
        if self.group_size < 8 or self.group_size & (self.group_size - 1):
            raise ValueError(f"quant.group_size={self.group_size}: a power of two from 8 (8, 16, 32, 64, 128, ...)")
        if self.axis not in (0, 1):
            raise ValueError(f"quant.axis={self.axis}: 0 or 1")


# backend -> its schema: the YAML options name `quant/<backend>/schema` (quant=none: `quant/schema`)
QUANT_SCHEMAS: dict[QuantBackend, type[QuantConfig]] = {
    QuantBackend.none: QuantConfig,
    QuantBackend.bnb: BnbQuantConfig,
    QuantBackend.torchao: TorchaoQuantConfig,
    QuantBackend.quanto: QuantoQuantConfig,
    QuantBackend.hqq: HqqQuantConfig,
}


def quant_schema(node: Any) -> type[QuantConfig]:
    """The schema of a recorded quant node (a dict), by its `backend` (records before backends: bnb unless
    method none); an unknown backend names the valid ones."""
    backend = node.get("backend") if hasattr(node, "get") else None
    if backend is None:
        method = node.get("method", "none") if hasattr(node, "get") else "none"
        return QuantConfig if method in (None, "none") else BnbQuantConfig
    try:
        return QUANT_SCHEMAS[QuantBackend(backend)]
    except ValueError:
        raise ValueError(
            f"quant.backend={backend!r}: not a backend; valid: {', '.join(b.value for b in QuantBackend)}"
        ) from None


MEMORY_DEVICES = ("cpu", "disk", "mps")


def check_max_memory(budget: Any) -> None:
    """device_map.max_memory: keys are GPU indices or cpu/disk/mps, values sizes (24GiB, 500MB, bytes)."""
    if budget is None:
        return
    if not isinstance(budget, dict):
        raise ValueError(f"device_map.max_memory={budget!r}: expected a mapping such as {{0: 24GiB, cpu: 64GiB}}")
    for key, size in budget.items():
        if not (isinstance(key, int) or str(key).isdigit() or key in MEMORY_DEVICES):
            raise ValueError(
                f"device_map.max_memory: unknown device {key!r}; use a GPU index (0, 1, ...) or one of "
                f"{', '.join(MEMORY_DEVICES)}"
            )
        parse_size(size, f"device_map.max_memory.{key}")


@dataclass
class DeviceMapConfig:
    """Where each module goes: an accelerate policy, `cpu`, or an explicit map; optional per-device budget."""

    policy: Policy = Policy.auto
    # `Any`, checked below: Hydra merges a dict override into a typed dict node, which fails for a None
    # default, for GPU-index keys (Hydra parses `0` as an int) and, in struct mode, for any new key
    map: Any = None
    max_memory: Any = None  # {GPU index | cpu | disk: size}, e.g. {0: 24GiB, 1: 24GiB, cpu: 64GiB}
    offload_folder: str | None = None

    def __post_init__(self) -> None:
        check_max_memory(self.max_memory)
        if self.map is not None and not isinstance(self.map, dict):
            raise ValueError(f"device_map.map={self.map!r}: expected a module -> device mapping")
        if self.policy == Policy.explicit and not self.map:
            raise ValueError(
                "device_map.map: policy=explicit needs a map, e.g. device_map.map='{model.embed_tokens: 0, "
                "model.layers: 0, lm_head: cpu}'"
            )
        if self.policy != Policy.explicit and self.map:
            raise ValueError(f"device_map.map is only read with policy=explicit, not policy={self.policy.value}")


@dataclass
class DtypeConfig:
    """The dtype of the layers that stay unquantized (embeddings, norms, lm_head)."""

    name: DtypeName = DtypeName.auto


@dataclass
class StageConfig:
    """Base of every stage's config: `_target_` names the stage class (it must live in `stages`)."""

    _target_: str = MISSING


@dataclass
class StreamConfig(StageConfig):
    progress: bool = True


class Kernel(str, Enum):
    auto = "auto"  # fast for weights placed on the CPU, the quantizer's own op elsewhere
    quantizer = "quantizer"  # always the quantizer's own op (transformers' convert, the backend's kernel)
    fast = "fast"  # our byte-identical compiled CPU kernels (CPU-placed weights only)


@dataclass
class BoundedStreamConfig(StreamConfig):
    kernel: Kernel = Kernel.auto
    # tensors read ahead on a thread while the current one is quantized; 0 (default) reads in line: on 2 cores
    # the reader thread slowed the 2-thread kernel more than it hid
    prefetch: int = 0

    def __post_init__(self) -> None:
        if self.prefetch < 0:
            raise ValueError(f"stages.stream.prefetch={self.prefetch}; use 0 (no read-ahead) or more")


@dataclass
class PostprocessConfig(StageConfig):
    # checkpoint tensors the model has no place for mean another model or size; true: record and load anyway
    allow_unexpected_keys: bool = False


@dataclass
class VerifyConfig(StageConfig):
    """Quality after load: perplexity on a bundled text, logits against the unquantized reference."""

    text: str | None = None  # a UTF-8 file; None: the bundled pipeline/quality/data/eval.txt
    max_tokens: int = 512
    random_tokens: int = 256  # seeded token ids instead of text when the checkpoint has no tokenizer
    seed: int = 0
    reference: bool = True
    prompt: str = "Once upon a time"
    max_new_tokens: int = 16

    def __post_init__(self) -> None:
        for key in ("max_tokens", "random_tokens"):
            if getattr(self, key) < 2:
                raise ValueError(f"stages.verify.{key} must be >= 2 (next-token figures need two tokens)")
        if self.max_new_tokens < 0:
            raise ValueError(f"stages.verify.max_new_tokens must be >= 0, got {self.max_new_tokens}")


@dataclass
class RunConfig:
    model: ModelConfig = MISSING
    quant: QuantConfig = MISSING
    device_map: DeviceMapConfig = MISSING
    dtype: DtypeConfig = MISSING
    stages: dict[str, Any] = field(default_factory=dict)
    cache_dir: str = MISSING
    prompt: str | None = None
    max_new_tokens: int = 8
    plan: bool = False  # stop after device_map and predict the load's memory (pipeline/plan.py); no weight read
    progress: bool = True  # progress bars and lines on long steps (pipeline/core/progress.py); false: none at all
    # the memory a budget search must fit into (experiment=fit_budget, pipeline/search/): 200MB, 24GiB or bytes;
    # `Any`, checked below, as device_map.max_memory: Hydra parses `budget=200000000` as an int
    budget: Any = None

    def __post_init__(self) -> None:
        if self.budget is not None:
            parse_size(self.budget, "budget")
        if self.prompt is not None and not self.prompt.strip():
            raise ValueError(f"prompt={self.prompt!r}: give some text to generate from, or leave prompt unset (null)")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens}: must be >= 1 (the tokens generated after prompt=)")


# a run's entries (run.json's `stages`, stages.jsonl, the table): the runner's `setup` (the config checked, the stages
# built), then the stages in this order
SETUP = "setup"
STAGE_KINDS = ("config_merge", "quantizer", "env_check", "preprocess", "device_map", "stream", "postprocess", "verify")

# Schemas live in a group nobody selects: each YAML option names its schema as `/_schemas_/<group>/<name>@_here_`
# in `defaults:`, so `model=`, `dtype=`, `stages/stream=` ... offer only real options. (quant's schema is still
# `quant/schema`; `refuse_schema_choices` keeps it from being picked.)
SCHEMA_GROUP = "_schemas_"


def register() -> None:
    """Register each schema under `_schemas_/`, and the resolver the run folder's name uses."""
    from hydra.core.config_store import ConfigStore  # here: the load process uses the schemas, not Hydra

    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
    cs.store(group="quant", name="schema", node=QuantConfig)
    for backend, node in QUANT_SCHEMAS.items():
        if backend != QuantBackend.none:
            cs.store(group=f"quant/{backend.value}", name="schema", node=node)
    for group, node in (("model", ModelConfig), ("device_map", DeviceMapConfig), ("dtype", DtypeConfig)):
        cs.store(group=SCHEMA_GROUP, name=group, node=node)
    for kind in STAGE_KINDS:
        cs.store(group=f"{SCHEMA_GROUP}/stages/{kind}", name="base", node=StageConfig)
    cs.store(group=f"{SCHEMA_GROUP}/stages/stream", name="base", node=StreamConfig)
    cs.store(group=f"{SCHEMA_GROUP}/stages/stream", name="bounded", node=BoundedStreamConfig)
    cs.store(group=f"{SCHEMA_GROUP}/stages/verify", name="logits", node=VerifyConfig)
    cs.store(group=f"{SCHEMA_GROUP}/stages/postprocess", name="finalize", node=PostprocessConfig)
    if not OmegaConf.has_resolver("qload_model"):
        OmegaConf.register_new_resolver("qload_model", model_name)


def is_schema_option(option: str) -> bool:
    """An option of a group that is a schema, not a choice: `schema`, `bounded_schema`, ..."""
    return option == "schema" or option.endswith("_schema")


_HASH = re.compile(r"^[0-9a-f]{40}$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")


def model_name(path: Any, fallback: Any = None) -> str:
    """The name of the model at `path` for records and folder names: the folder's name (a hub cache's snapshot
    folder: its repo's name), else config.json's `_name_or_path`, else its `model_type`; `fallback` (the model
    YAML's name) without a path. Only config.json is read, as JSON, and only when the folder name says nothing."""
    if path is None or str(path) in ("", "None"):
        return str(fallback)
    folder = Path(str(path)).expanduser()
    name = folder.name
    if _HASH.match(name) and folder.parent.name == "snapshots":  # .../models--Qwen--Qwen2-0.5B/snapshots/<sha>
        name = folder.parent.parent.name.removeprefix("models--").rpartition("--")[2]
    if not name or name in (".", ".."):
        name = ""
        try:
            raw = json.loads((folder / "config.json").read_text()[: 1 << 20])
        except (OSError, ValueError):
            raw = {}
        if isinstance(raw, dict):
            name = str(raw.get("_name_or_path") or "").rstrip("/").rpartition("/")[2]
            name = name or str(raw.get("model_type") or "")
    return _UNSAFE.sub("_", name).strip("_.") or str(fallback)


def name_model(cfg: Any) -> None:
    """With `model.path`, the run's `model.name` is the checkpoint's (`model_name`), in place."""
    model = cfg.get("model") if hasattr(cfg, "get") else None
    if model is not None and model.get("path"):
        with open_dict(cfg):
            model.name = model_name(model.path, model.get("name"))
